"""``TrainConfig``: the one configuration object for the CLI, JSON config files, presets and the ComfyUI nodes.

Every field carries its help text in ``metadata`` so the argparse options are generated from the dataclass and the
CLI can never drift from the config. Fields in ``RUN_ONLY_FIELDS`` (paths, devices, resume) describe one run on one
machine; presets must never store them (``to_dict(include_run=False)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ADAPTERS = ("lora", "dora", "lokr", "loha", "oft")
ATTENTION = ("both", "self", "cross", "none")
TIMESTEP_MODES = ("continuous", "logit_normal", "discrete", "uniform")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
SCHEDULERS = ("cosine", "cosine_restarts", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("bf16", "fp16", "fp32")
BASE_PRECISIONS = ("bf16", "fp8", "int8", "nf4")  # storage of the frozen decoder projections (sidestep_core.device)
MEMORY_MODES = ("manual", "auto")
TRAIN_MODELS = ("dit", "lm", "both")  # which adapters a run trains: the DiT's, the planner LM's, or both at once
LM_LOSSES = ("codes", "codes_and_metadata")

# Paths, devices and resume: specific to one run on one machine; never part of a preset.
RUN_ONLY_FIELDS = frozenset(
    {"checkpoint", "dataset", "out", "resume", "device", "base_variant", "preview_prompts", "lm"}
)
# A run needs these; they may come from a --config file, so the parser cannot enforce them itself.
REQUIRED_RUN_FIELDS = ("checkpoint", "dataset", "out")


def _f(default: Any, help: str, *, choices: Optional[tuple] = None, group: str = "training", factory=None):
    meta = {"help": help, "choices": choices, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ----- run (paths and devices; never stored in presets) -----
    checkpoint: str = _f("", "ACE-Step 1.5 model: DiT folder, checkpoints root, or ComfyUI file", group="run")
    dataset: str = _f("", "preprocessed dataset (tensor cache folder)", group="run")
    out: str = _f("", "output folder (final/, checkpoints/, runs/, loss.csv, training_config.json)", group="run")
    resume: str = _f(
        "none", "'auto' continues from the newest valid checkpoint in OUT, a path resumes from that checkpoint, "
        "'none' starts fresh (refused if OUT already holds checkpoints)", group="run")
    device: str = _f("auto", "torch device (auto: the accelerate process's device, CUDA if present)", group="run")
    base_variant: str = _f("", "base variant when the checkpoint does not tell (turbo, base, sft, xl-*)", group="run")

    # ----- adapter -----
    adapter: str = _f("lora", "adapter type", choices=ADAPTERS, group="adapter")
    rank: int = _f(64, "rank (LoRA/DoRA r, LoKR/LoHA linear dim)", group="adapter")
    alpha: float = _f(128.0, "alpha (scale = alpha / rank)", group="adapter")
    dropout: float = _f(0.1, "adapter dropout (LoRA and DoRA; LoKR, LoHA and OFT train without it, with a warning)",
                        group="adapter")
    attention: str = _f("both", "attention projections to adapt (q/k/v/o of self-, cross- or both attentions)",
                        choices=ATTENTION, group="adapter")
    target_mlp: bool = _f(False, "also adapt the MLP projections (gate/up/down)", group="adapter")
    target_modules: list = _f(None, "explicit module names or suffixes (e.g. 'self_attn.q_proj', "
                              "'layers.3.mlp.up_proj'); overrides --attention/--target-mlp", group="adapter",
                              factory=list)
    rank_pattern: dict = _f(None, "JSON map module-regex -> rank (e.g. from gradient estimation)", group="adapter",
                            factory=dict)
    alpha_pattern: dict = _f(None, "JSON map module-regex -> alpha", group="adapter", factory=dict)
    lokr_factor: int = _f(-1, "LoKR Kronecker factor (-1 = automatic)", group="adapter")
    lokr_decompose_both: bool = _f(False, "LoKR: low-rank decompose both Kronecker factors", group="adapter")
    lokr_use_tucker: bool = _f(False, "LoKR: Tucker decomposition", group="adapter")
    lokr_use_scalar: bool = _f(False, "LoKR: train an extra scalar", group="adapter")
    lokr_full_matrix: bool = _f(False, "LoKR: full (not low-rank) second factor", group="adapter")
    loha_use_tucker: bool = _f(False, "LoHA: Tucker decomposition", group="adapter")
    loha_use_scalar: bool = _f(False, "LoHA: train an extra scalar", group="adapter")
    oft_block_size: int = _f(32, "OFT: largest block size; LyCORIS uses the factor of each layer's output width "
                             "nearest to it that is not larger than width/block (32 on a 2048-wide layer)",
                             group="adapter")
    oft_constraint: float = _f(0.0, "OFT: norm constraint on the rotation (0 = none)", group="adapter")
    oft_rescaled: bool = _f(False, "OFT: also learn a per-output rescale", group="adapter")
    trigger_tag: str = _f("", "trigger tag recorded in the adapter metadata (default: the dataset's)",
                          group="adapter")

    # ----- planner LM (sidestep_core.planner.training) -----
    train_models: str = _f(
        "dit", "adapters to train: dit (the DiT's, as always), lm (a LoRA on the 5 Hz planner LM only) or both in "
        "one run (one resume, one TensorBoard, both adapters in every checkpoint)", choices=TRAIN_MODELS, group="lm")
    lm: str = _f("", "the 5 Hz planner LM, needed when train_models is lm or both: its original folder "
                 "(acestep-5Hz-lm-1.7B) or ComfyUI's text-encoder file (qwen_1.7b_ace15.safetensors)", group="run")
    lm_rank: int = _f(16, "rank of the planner LM's LoRA", group="lm")
    lm_alpha: float = _f(32.0, "alpha of the planner LM's LoRA (scale = alpha / rank)", group="lm")
    lm_dropout: float = _f(0.05, "dropout of the planner LM's LoRA", group="lm")
    lm_target_mlp: bool = _f(False, "also adapt the LM's MLP projections (gate/up/down), not only q/k/v/o",
                             group="lm")
    lm_learning_rate: float = _f(1e-4, "peak learning rate of the planner LM's LoRA (same schedule as the DiT's)",
                                 group="lm")
    lm_loss: str = _f("codes", "tokens the LM is trained to write: the audio codes (and the end), or also the "
                      "metadata block (bpm, key, time signature, duration, language) before them",
                      choices=LM_LOSSES, group="lm")

    # ----- objective -----
    timestep_mode: str = _f(
        "continuous", "continuous: the model's own sample_t_r (logit-normal with the checkpoint's mu/sigma, "
        "t = max of two draws, r = t); logit_normal: one logit-normal draw; discrete: the 8 turbo shift-3 "
        "timesteps; uniform: U(0,1)", choices=TIMESTEP_MODES, group="objective")
    timestep_mu: Optional[float] = _f(None, "override the checkpoint's timestep_mu", group="objective")
    timestep_sigma: Optional[float] = _f(None, "override the checkpoint's timestep_sigma", group="objective")
    cfg_ratio: float = _f(0.15, "probability that a sample's condition is replaced by null_condition_emb",
                          group="objective")

    # ----- data -----
    crop_seconds: float = _f(60.0, "random crop length in seconds (0 = whole clips)", group="data")
    batch_size: int = _f(1, "clips per micro-batch (length-bucketed, loss masked to real frames)", group="data")
    val_split: float = _f(0.0, "fraction of clips held out for a deterministic validation loss", group="data")
    val_every: int = _f(0, "validate every N steps (0 = at each checkpoint)", group="data")

    # ----- optimisation -----
    optimizer: str = _f("adamw", "optimizer", choices=OPTIMIZERS)
    learning_rate: float = _f(1e-4, "peak learning rate (Prodigy: usually 1.0)")
    weight_decay: float = _f(0.01, "weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    scheduler: str = _f("cosine", "learning-rate schedule (all start with a linear warmup)", choices=SCHEDULERS)
    warmup_steps: int = _f(100, "linear warmup steps (capped at a tenth of the run)")
    min_lr_ratio: float = _f(0.01, "final learning rate of cosine/linear schedules, as a fraction of the peak")
    scheduler_cycles: int = _f(4, "number of cycles of cosine_restarts")
    gradient_accumulation: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(42, "random seed (adapter init, data order, crops, noise)")
    max_steps: int = _f(0, "optimizer steps to train (0 = use --epochs)")
    epochs: int = _f(100, "passes over the dataset when --max-steps is 0")
    save_every: int = _f(100, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(3, "checkpoints to keep (0 = all)")
    ema_decay: float = _f(0.0, "also keep an exponential moving average of the adapter weights with this decay "
                          "(e.g. 0.999), saved as ema/ beside every checkpoint and final/ (0 = off)")
    ema_start_step: int = _f(0, "the average follows the weights until this step and averages after it")

    # ----- memory and precision -----
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory", group="memory")
    checkpointing_ratio: float = _f(1.0, "fraction of decoder layers checkpointed", group="memory")
    selective_checkpointing: bool = _f(
        False, "checkpointed layers keep their attention outputs instead of recomputing them: faster steps for more "
        "activation memory (see bench/RESULTS.md for the measured cost)", group="memory")
    torch_compile: bool = _f(
        False, "torch.compile the decoder layers (inductor; needs a C compiler): the first steps take minutes to "
        "compile; meant for CUDA (CPU measurement in bench/RESULTS.md)", group="memory")
    precision: str = _f("bf16", "dtype of the frozen base weights and of autocast (adapters stay fp32)",
                        choices=PRECISIONS, group="memory")
    base_precision: str = _f("bf16", "storage of the frozen decoder projections: bf16 as --precision, fp8 (e4m3, "
                             "per-channel scales), int8 (row-wise) or nf4 (bitsandbytes); computed in --precision, "
                             "adapters stay fp32", choices=BASE_PRECISIONS, group="memory")
    offload_layers: str = _f("0", "keep the first N frozen decoder layers in host memory and stream each to the "
                             "device ahead of use (exact; those layers are checkpointed); auto: as few as fit",
                             group="memory")
    fused_backward: bool = _f(
        False, "update each adapter tensor as soon as its gradient is complete and free the gradient, so only one "
        "layer's gradients are alive (saves the adapter's fp32 gradients: 4 bytes per trainable parameter). "
        "max_grad_norm then clips each tensor's gradient on its own (the global norm is known only after the "
        "updates); needs gradient_accumulation 1, one process, bf16 or fp32, not prodigy, train_models dit",
        group="memory")
    memory: str = _f("manual", "auto: choose base_precision, offload_layers and fused_backward (where the settings "
                     "allow it) from the memory plan for the device's free memory before loading",
                     choices=MEMORY_MODES, group="memory")

    # ----- logging -----
    log_every: int = _f(1, "TensorBoard scalars every N steps", group="logging")
    histogram_every: int = _f(50, "timestep histogram every N steps (0 = off)", group="logging")
    tensorboard: bool = _f(True, "write TensorBoard events to OUT/runs", group="logging")
    estimate_steps: int = _f(2, "micro-batches timed before training to estimate time and memory (0 = skip)",
                             group="logging")

    # ----- audio previews -----
    preview_every: int = _f(0, "render preview audio with the current adapter every N steps (0 = off)",
                            group="previews")
    preview_prompts: str = _f("", "preview prompts: a JSON file or inline JSON list of {caption, lyrics, seconds, "
                              "seed, bpm, key, timesignature, language}", group="previews")
    preview_steps: Optional[int] = _f(None, "sampler steps of previews (default: the model's recommendation)",
                                      group="previews")
    preview_shift: Optional[float] = _f(None, "sampler shift of previews (default: the model's recommendation)",
                                        group="previews")
    preview_guidance: Optional[float] = _f(None, "guidance of previews on base/SFT (default: the model's)",
                                           group="previews")
    preview_codes: bool = _f(False, "previews: the planner LM (lm) writes each prompt's audio codes first, with its "
                             "LoRA as it trains when the run trains it, and the DiT renders on them (ComfyUI's "
                             "generate_audio_codes)", group="previews")

    # ------------------------------------------------------------------------------------------------------
    @property
    def trains_dit(self) -> bool:
        return self.train_models in ("dit", "both")

    @property
    def trains_lm(self) -> bool:
        return self.train_models in ("lm", "both")

    def check_lm(self) -> None:
        """A run that trains the planner LM needs one (a run field, so presets cannot hold it: checked per run)."""
        if self.preview_every and self.preview_codes and not str(self.lm).strip():
            raise ValueError("lm: preview_codes has the planner LM write the previews' audio codes, but no LM is "
                             "given: pass the LM's folder (checkpoints/acestep-5Hz-lm-1.7B) or ComfyUI's file")
        if self.trains_lm and not str(self.lm).strip():
            raise ValueError(
                f"lm: train_models {self.train_models} trains the planner LM, but no LM is given: pass the LM's "
                "folder (checkpoints/acestep-5Hz-lm-1.7B) or ComfyUI's file (models/text_encoders/"
                "qwen_1.7b_ace15.safetensors)")

    def fused_backward_refusal(self) -> Optional[str]:
        """Why these settings cannot step the optimizer inside backward (None: they can)."""
        if self.gradient_accumulation > 1:
            return ("it updates each tensor as its gradient arrives, so gradients cannot be accumulated over "
                    "micro-batches; use gradient_accumulation 1 (or a larger batch_size)")
        if self.optimizer == "prodigy":
            return ("optimizer prodigy estimates its step size from sums over all tensors, which a per-tensor "
                    "step cannot reproduce; use adamw, adamw8bit or adafactor")
        if self.precision == "fp16":
            return "precision fp16 needs loss scaling, whose overflow check must see every gradient; use bf16"
        if self.train_models != "dit":
            return f"it steps the DiT adapter only; train_models {self.train_models} trains the planner LM too"
        return None

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field; return self so calls chain."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"must be one of {', '.join(choices)}")
        for name in ("rank", "lm_rank", "batch_size", "gradient_accumulation", "oft_block_size", "scheduler_cycles"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("max_steps", "epochs", "save_every", "keep_checkpoints", "warmup_steps", "seed", "val_every",
                     "log_every", "histogram_every", "estimate_steps", "preview_every", "ema_start_step"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        for name in ("alpha", "learning_rate", "lm_alpha", "lm_learning_rate"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "must be a number > 0")
        for name in ("weight_decay", "max_grad_norm", "crop_seconds", "oft_constraint"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a number >= 0")
        for name in ("cfg_ratio", "checkpointing_ratio", "min_lr_ratio"):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                bad(name, "must be between 0 and 1")
        for name in ("dropout", "lm_dropout", "val_split", "ema_decay"):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                bad(name, "must be >= 0 and < 1")
        if self.timestep_sigma is not None and (not _finite(self.timestep_sigma) or self.timestep_sigma <= 0):
            bad("timestep_sigma", "must be a number > 0")
        if self.timestep_mu is not None and not _finite(self.timestep_mu):
            bad("timestep_mu", "must be a finite number")
        if self.max_steps == 0 and self.epochs == 0:
            bad("max_steps", "set max_steps or epochs to a positive number")
        if self.lokr_factor != -1 and self.lokr_factor < 1:
            bad("lokr_factor", "must be -1 (automatic) or >= 1")
        if not isinstance(self.target_modules, list) or not all(
            isinstance(x, str) and x.strip(" .") for x in self.target_modules
        ):
            bad("target_modules", "must be a list of module names")
        if self.attention == "none" and not self.target_mlp and not self.target_modules:
            bad("attention", "no target modules: choose attention, --target-mlp or --target-modules")
        for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            value = getattr(self, name)
            if not isinstance(value, dict):
                bad(name, "must be a JSON object mapping module patterns to numbers")
            for k, v in value.items():
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    bad(name, f"entry {k!r}: {v!r} must be a positive number")
                if kind is int and int(v) != v:
                    bad(name, f"entry {k!r}: rank {v!r} must be an integer")
        if self.adapter == "oft" and (self.rank_pattern or self.alpha_pattern):
            bad("rank_pattern", "per-module ranks do not apply to OFT")
        if self.preview_every and not str(self.preview_prompts).strip():
            bad("preview_prompts", "previews are on (preview_every > 0) but no prompts are given")
        if self.preview_steps is not None and (not isinstance(self.preview_steps, int) or self.preview_steps < 1):
            bad("preview_steps", "must be an integer >= 1")
        if not (self.offload_layers == "auto" or str(self.offload_layers).isdigit()):
            bad("offload_layers", "must be a number of layers >= 0 or 'auto'")
        if self.fused_backward and self.fused_backward_refusal():
            raise ValueError(f"fused_backward: {self.fused_backward_refusal()}")
        if self.resume not in ("none", "auto") and not self.resume.strip():
            bad("resume", "must be 'none', 'auto' or a checkpoint path")
        return self

    # ----- (de)serialisation -----
    def to_dict(self, include_run: bool = True) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if include_run or f.name not in RUN_ONLY_FIELDS:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> "TrainConfig":
        """Build from a mapping; unknown keys raise (``strict``) so typos in config files do not pass silently."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown and strict:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        kwargs = {}
        for k, v in data.items():
            if k in names:
                kwargs[k] = _coerce(k, _field_type(cls, k), v)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ----- argparse -----
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, skip: frozenset = frozenset()) -> None:
        """Add one ``--option`` per field. Defaults are suppressed so only options the user gave override a base
        config (a file or a preset); ``from_args`` fills the rest from the dataclass defaults."""
        groups: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            group_name = f.metadata.get("group", "training")
            group = groups.get(group_name) or groups.setdefault(
                group_name, parser.add_argument_group(f"{group_name} options")
            )
            tp = _field_type(cls, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = "--" + f.name.replace("_", "-")
            helptext = f.metadata.get("help", "")
            if f.name in REQUIRED_RUN_FIELDS:
                helptext += " (required, here or in --config)"
            elif "(default:" not in helptext and default not in ("", None):
                helptext += f" (default: {json.dumps(default)})"
            kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext)
            if tp is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif tp is list:
                group.add_argument(flag, nargs="+", metavar="NAME", **kw)
            elif tp is dict:
                group.add_argument(flag, type=_json_object(f.name), metavar="JSON", **kw)
            else:
                group.add_argument(flag, type=_scalar_parser(tp), choices=f.metadata.get("choices"), **kw)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, base: Optional["TrainConfig"] = None) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(ns).items() if k in names}
        return dataclasses.replace(base or cls(), **given)


# ----------------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def _scalar_parser(tp):
    if tp is float:
        return float
    if tp is int:
        return int
    return str


def _json_object(name: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{name}: not valid JSON ({exc})") from exc
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{name}: must be a JSON object")
        return value

    return parse


def _coerce(name: str, tp, value: Any) -> Any:
    """Accept numbers stored as strings (hand-edited JSON) but reject values of the wrong kind."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (bool, int)):
                return bool(value)
        elif tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value != int(value):
                raise TypeError
            return int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is list:
            if isinstance(value, str):
                return [s.strip() for s in value.split(",") if s.strip()]
            if isinstance(value, (list, tuple)):
                return list(value)
        elif tp is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, dict):
                return dict(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
