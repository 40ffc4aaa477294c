"""What each Side-Step node takes and returns, as plain data (no ComfyUI import).

``schema.py`` turns these specs into ComfyUI V3 schemas; the tests check the example workflows against them
without a ComfyUI checkout. Training inputs are read off :class:`sidestep_core.config.TrainConfig` (name, type,
default, choices, help), so the node can never drift from the CLI and the config files: an input named like a
``TrainConfig`` field *is* that field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

from sidestep_core.audio.loudness import MODES as LOUDNESS_MODES
from sidestep_core.config import ADAPTERS, TrainConfig
from sidestep_core.data.preprocess import MODEL_MAX_SECONDS, PreprocessConfig
from sidestep_core.estimate import FOCUSES, GROUPS, EstimateSettings
from sidestep_core.model.variants import VARIANTS
from sidestep_core.text.prompts import COMFYUI, PROMPT_STYLES

CATEGORY = "Side-Step"

# Value types that travel between the pack's nodes.
MODEL_TYPE = "ACESTEP_MODEL"
DATASET_TYPE = "ACESTEP_DATASET"
ADAPTER_TYPE = "ACESTEP_ADAPTER"
ESTIMATE_TYPE = "ACESTEP_ESTIMATE"

WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL = "control_after_generate"
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")
FIXED = "fixed"
SEED_NAMES = ("seed", "noise_seed")  # INT inputs the front end gives a control widget by name alone
EXPORT_FORMATS = ("comfyui", "peft", "lycoris")
AUTO = "auto"
NONE = "none"

# Combos whose options come from the user's folders; ``comfy_glue.py`` fills them when ComfyUI asks.
DYNAMIC_MODELS = "acestep_models"
DYNAMIC_TEXT_ENCODERS = "text_encoders"
DYNAMIC_VAES = "vaes"
DYNAMIC_PLANNER_LMS = "planner_lms"  # 5 Hz LM files (text_encoders/qwen_1.7b_ace15.safetensors, …)
DYNAMIC_LORAS = "loras"
DYNAMIC_PRESETS = "presets"
DYNAMIC_SAMPLERS = "samplers"  # ComfyUI's sampler names (comfy.samplers.KSampler.SAMPLERS)
DYNAMIC_SCHEDULERS = "schedulers"  # ComfyUI's scheduler names (comfy.samplers.KSampler.SCHEDULERS)

# Key of an input's definition (ComfyUI /object_info) listing the adapter types it belongs to; web/sidestep.js hides
# the input while another type is chosen.
ADAPTERS_KEY = "sidestep_adapters"

# Train Adapter's preview graph: the sockets a KSampler + VAEDecodeAudio of the user's graph would take.
LM_NAME = "planner_lm"  # Train Adapter's LM file, as Preprocess names it (sets TrainConfig.lm once resolved)
PREVIEW_SOCKETS = ("preview_model", "preview_positive", "preview_negative", "preview_latent", "preview_vae")


@dataclass(frozen=True)
class InputSpec:
    name: str
    kind: str  # one of WIDGET_KINDS, or a socket type (ACESTEP_MODEL, MODEL, ...)
    default: Any = None
    options: tuple = ()  # COMBO: the fixed options (or the first entries of a dynamic list)
    dynamic: str = ""  # COMBO: name of the folder list that supplies the options at run time
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    multiline: bool = False
    optional: bool = False
    advanced: bool = False
    adapters: tuple = ()  # UI only: the input is shown only while Train Adapter's adapter type is one of these
    tooltip: str = ""
    config_field: Optional[str] = None  # the TrainConfig field this input sets
    # INT: the front end's "control after generate" mode for this seed ("fixed" keeps the run fingerprint, so
    # queueing again reuses or resumes the run); None: the front end's own rule (see ``has_control``).
    control_after_generate: Optional[str] = None

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGET_KINDS


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    output_node: bool = False
    search_aliases: tuple[str, ...] = ()

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"{self.node_id} has no input {name!r}")

    @property
    def widgets(self) -> list[InputSpec]:
        """Widget inputs in the order ComfyUI's frontend stores their values (required first, then optional)."""
        return [i for i in self.inputs if i.is_widget and not i.optional] + \
               [i for i in self.inputs if i.is_widget and i.optional]

    @property
    def widget_slots(self) -> list[str]:
        """The names behind each entry of a saved node's ``widgets_values``: the widgets, each seed-like one
        followed by its ``<name>.control_after_generate`` value (the front end's extra widget)."""
        slots = []
        for i in self.widgets:
            slots.append(i.name)
            if has_control(i.name, [i.kind, {"control_after_generate": i.control_after_generate}]):
                slots.append(f"{i.name}.{CONTROL}")
        return slots


# ----------------------------------------------------------------------------------------------------------
# TrainConfig fields as inputs
# ----------------------------------------------------------------------------------------------------------

_TC_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TC_HINTS = typing.get_type_hints(TrainConfig)


def _field_type(name: str):
    tp = _TC_HINTS[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def config_default(name: str) -> Any:
    f = _TC_FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def cfg(name: str, *, advanced: bool = False, min: Optional[float] = None, max: Optional[float] = None,
        step: Optional[float] = None, tooltip: str = "", control_after_generate: Optional[str] = None,
        adapters: tuple = (), optional: bool = False) -> InputSpec:
    """An input that sets the ``TrainConfig`` field of the same name, with its default, choices and help."""
    f = _TC_FIELDS[name]
    tp = _field_type(name)
    choices = f.metadata.get("choices")
    help_text = tooltip or f.metadata.get("help", "")
    default = config_default(name)
    if choices:
        return InputSpec(name, "COMBO", default, tuple(choices), advanced=advanced, adapters=adapters,
                         tooltip=help_text, config_field=name, optional=optional)
    kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING", list: "STRING"}[tp]
    if tp is list:
        default = ", ".join(default)
    if kind in ("INT", "FLOAT") and min is None:
        min = 0
    return InputSpec(name, kind, default, min=min, max=max, step=step, advanced=advanced, adapters=adapters,
                     tooltip=help_text, config_field=name, control_after_generate=control_after_generate,
                     optional=optional)


def to_config_value(spec: InputSpec, value: Any) -> Any:
    """A widget value as the ``TrainConfig`` field wants it."""
    if spec.config_field and _field_type(spec.config_field) is list:
        return [s.strip() for s in str(value).replace("\n", ",").split(",") if s.strip()]
    return value


# ----------------------------------------------------------------------------------------------------------
# the nodes
# ----------------------------------------------------------------------------------------------------------

_PRE = PreprocessConfig()

LOAD = NodeSpec(
    "SideStepLoadCheckpoint",
    "Load ACE-Step Checkpoint",
    "Picks an ACE-Step 1.5 model (ComfyUI diffusion_models / checkpoints file or an original ACE-Step folder under "
    "models/acestep) with its text encoder and VAE. Nothing is loaded here: each Side-Step node loads only the "
    "parts it needs, when it runs.",
    (
        InputSpec("model", "COMBO", dynamic=DYNAMIC_MODELS,
                  tooltip="diffusion_models/… and checkpoints/… files recognised as ACE-Step 1.5 by their tensor "
                          "names, and original ACE-Step folders under models/acestep/"),
        InputSpec("text_encoder", "COMBO", AUTO, options=(AUTO,), dynamic=DYNAMIC_TEXT_ENCODERS,
                  tooltip="Qwen3 0.6B text encoder (text_encoders/qwen_0.6b_ace15.safetensors). auto: the one "
                          "inside an all-in-one checkpoint or beside an original folder, else qwen_0.6b_ace15"),
        InputSpec("vae", "COMBO", AUTO, options=(AUTO,), dynamic=DYNAMIC_VAES,
                  tooltip="ACE-Step 1.5 VAE (vae/ace_1.5_vae.safetensors). auto: the one inside an all-in-one "
                          "checkpoint or beside an original folder, else ace_1.5_vae"),
        InputSpec("variant", "COMBO", AUTO, options=(AUTO,) + tuple(VARIANTS),
                  tooltip="The base model. auto reads it from the checkpoint's config and name; set it for "
                          "fine-tunes whose name does not tell (it picks the timestep distribution and the "
                          "recommended shift/steps)"),
    ),
    (OutputSpec("model", MODEL_TYPE, "a lazy ACE-Step model bundle for the other Side-Step nodes"),),
    search_aliases=("acestep", "ace step", "ace-step 1.5"),
)

PREPROCESS = NodeSpec(
    "SideStepPreprocessAudio",
    "Preprocess Audio Folder",
    "Encodes a folder of songs (with optional lyrics/caption sidecars or a dataset JSON) into the tensors training "
    "needs. Results are cached by content: re-queueing is instant and edited files alone are encoded again.",
    (
        InputSpec("model", MODEL_TYPE, tooltip="from Load ACE-Step Checkpoint"),
        InputSpec("folder", "STRING", "sidestep_dataset",
                  tooltip="folder of audio files; a relative path is taken inside ComfyUI's input folder"),
        InputSpec("dataset_json", "STRING", "",
                  tooltip="optional ACE-Step / Side-Step dataset JSON (captions, lyrics, bpm …); relative to the "
                          "audio folder. Empty: sidecar .txt files or defaults"),
        InputSpec("prompt_style", "COMBO", COMFYUI, options=tuple(PROMPT_STYLES),
                  tooltip="comfyui: prompts exactly as TextEncodeAceStepAudio1.5 builds them (generate with "
                          "ComfyUI's nodes); acestep: as the official ACE-Step pipeline builds them"),
        InputSpec("max_duration", "FLOAT", _PRE.max_duration, min=1.0, max=MODEL_MAX_SECONDS, step=1.0,
                  tooltip="longer files are cut to this many seconds"),
        InputSpec("normalize", "COMBO", _PRE.normalize, options=tuple(LOUDNESS_MODES),
                  tooltip="loudness normalisation before encoding: none, peak (to -1 dBFS) or lufs (to -14 LUFS)"),
        InputSpec("trigger_tag", "STRING", "",
                  tooltip="a tag added to every caption (e.g. a made-up word) so the adapter can be called by it"),
        InputSpec("auto_label", "BOOLEAN", False, optional=True,
                  tooltip="songs without a caption, bpm, key, time signature or language get them from the 5 Hz "
                          "LM's reading of their audio codes, written to song.labels.txt beside the song (edit "
                          "freely; what you wrote yourself is never replaced, and an existing labels file is kept)"),
        InputSpec("planner_lm", "COMBO", AUTO, options=(AUTO,), dynamic=DYNAMIC_PLANNER_LMS, optional=True,
                  tooltip="the 5 Hz LM used by auto_label (text_encoders/qwen_1.7b_ace15.safetensors or "
                          "qwen_4b_ace15). auto: qwen_1.7b_ace15, else the one beside an original folder or inside "
                          "an all-in-one checkpoint"),
    ),
    (OutputSpec("dataset", DATASET_TYPE, "the preprocessed dataset (a cache folder)"),),
    search_aliases=("dataset", "audio dataset", "encode audio"),
)

# Adapter types with a rank and an alpha (OFT has a block size instead).
RANKED = tuple(a for a in ADAPTERS if a != "oft")

TRAIN = NodeSpec(
    "SideStepTrainAdapter",
    "Train Adapter",
    "Trains a LoRA / DoRA / LoKr / LoHa / OFT adapter on the DiT, and with train_models lm / both a LoRA on the "
    "5 Hz planner LM (what it decides: structure, phrasing, tempo, key, vocals). Frees ComfyUI's models first, "
    "shows a live loss chart, saves a checkpoint and the adapter on Cancel, and reuses a finished adapter when "
    "queued again with the same inputs (resume continues a stopped run).",
    (
        InputSpec("model", MODEL_TYPE, tooltip="from Load ACE-Step Checkpoint"),
        InputSpec("dataset", DATASET_TYPE, tooltip="from Preprocess Audio Folder"),
        InputSpec("preset", "COMBO", NONE, options=(NONE,), dynamic=DYNAMIC_PRESETS,
                  tooltip="start from a preset; inputs you change from their default override it"),
        cfg("adapter"),
        cfg("rank", min=1, max=1024, adapters=RANKED),
        cfg("alpha", min=0.001, max=4096.0, step=0.5, adapters=RANKED),
        cfg("attention"),
        cfg("target_mlp"),
        cfg("max_steps", max=1_000_000),
        cfg("epochs", max=100_000),
        cfg("learning_rate", min=1e-7, max=10.0, step=1e-5),
        cfg("optimizer"),
        cfg("scheduler"),
        cfg("batch_size", min=1, max=256),
        cfg("crop_seconds", max=MODEL_MAX_SECONDS, step=1.0),
        cfg("gradient_checkpointing", advanced=True),
        cfg("cfg_ratio", advanced=True, max=1.0, step=0.01),
        cfg("timestep_mode", advanced=True),
        cfg("seed", max=2**31 - 1, control_after_generate=FIXED),
        cfg("save_every", advanced=True, max=1_000_000),
        InputSpec("output_name", "STRING", "sidestep_adapter",
                  tooltip="name of the run folder (output/sidestep/<name>-<settings hash>) and of the adapter"),
        InputSpec("resume", "BOOLEAN", True,
                  tooltip="continue a stopped (cancelled) run with the same settings from its last checkpoint; "
                          "off: start over in a new folder"),
        # rarely touched
        cfg("dropout", advanced=True, max=0.99, step=0.01),
        cfg("target_modules", advanced=True),
        cfg("gradient_accumulation", advanced=True, min=1, max=1024),
        cfg("weight_decay", advanced=True, step=0.001),
        cfg("max_grad_norm", advanced=True, step=0.1),
        cfg("warmup_steps", advanced=True, max=1_000_000),
        cfg("min_lr_ratio", advanced=True, max=1.0, step=0.01),
        cfg("scheduler_cycles", advanced=True, min=1, max=1000),
        cfg("keep_checkpoints", advanced=True, max=1000),
        cfg("ema_decay", advanced=True, max=0.9999, step=0.0001),
        cfg("ema_start_step", advanced=True, max=1_000_000),
        cfg("checkpointing_ratio", advanced=True, max=1.0, step=0.05),
        cfg("selective_checkpointing", advanced=True),
        cfg("torch_compile", advanced=True),
        cfg("precision", advanced=True),
        cfg("base_precision", advanced=True),
        cfg("offload_layers", advanced=True),
        cfg("memory", advanced=True),
        cfg("val_split", advanced=True, max=0.99, step=0.01),
        cfg("val_every", advanced=True, max=1_000_000),
        cfg("estimate_steps", advanced=True, max=100),
        cfg("tensorboard", advanced=True),
        # each adapter type's own options, shown only while it is chosen (the main one outside Advanced)
        cfg("lokr_factor", min=-1, max=1024, adapters=("lokr",)),
        cfg("lokr_decompose_both", advanced=True, adapters=("lokr",)),
        cfg("lokr_use_tucker", advanced=True, adapters=("lokr",)),
        cfg("lokr_use_scalar", advanced=True, adapters=("lokr",)),
        cfg("lokr_full_matrix", advanced=True, adapters=("lokr",)),
        cfg("loha_use_tucker", advanced=True, adapters=("loha",)),
        cfg("loha_use_scalar", advanced=True, adapters=("loha",)),
        cfg("oft_block_size", min=1, max=4096, adapters=("oft",)),
        cfg("oft_constraint", advanced=True, step=0.001, adapters=("oft",)),
        cfg("oft_rescaled", advanced=True, adapters=("oft",)),
        cfg("trigger_tag", advanced=True),
        InputSpec("estimate", ESTIMATE_TYPE, optional=True,
                  tooltip="from Estimate Gradients: train only its top modules, with its per-module ranks"),
        # previews through the user's own generation graph (all five sockets connected: previews on)
        InputSpec("preview_model", "MODEL", optional=True,
                  tooltip="previews: the ACE-Step 1.5 MODEL you generate with (e.g. Load Diffusion Model); each "
                          "preview patches a copy of it with the adapter as it is at that step"),
        InputSpec("preview_positive", "CONDITIONING", optional=True,
                  tooltip="previews: positive conditioning (TextEncodeAceStepAudio1.5; put the trigger tag in)"),
        InputSpec("preview_negative", "CONDITIONING", optional=True,
                  tooltip="previews: negative conditioning (e.g. ConditioningZeroOut of the positive)"),
        InputSpec("preview_latent", "LATENT", optional=True,
                  tooltip="previews: the latent to sample (EmptyAceStep1.5LatentAudio sets the length)"),
        InputSpec("preview_vae", "VAE", optional=True, tooltip="previews: the ACE-Step 1.5 VAE (VAELoader)"),
        InputSpec("preview_clip", "CLIP", optional=True,
                  tooltip="previews: the CLIP your TextEncodeAceStepAudio1.5 uses; when it writes audio codes and "
                          "the run trains the planner LM, each preview patches the LM with its adapter as it is at "
                          "that step and runs that encoder again, so the preview hears both adapters"),
        InputSpec("preview_every", "INT", 100, min=0, max=1_000_000, optional=True,
                  tooltip="render a preview every N optimizer steps (and always at the last step; 0: only at the "
                          "last step). Needs all five preview sockets connected"),
        InputSpec("preview_seed", "INT", 0, min=0, max=2**63 - 1, optional=True, advanced=True,
                  tooltip="noise seed of every preview (the same noise each time: previews differ only by what "
                          "training changed)"),
        InputSpec("preview_steps", "INT", 0, min=0, max=10_000, optional=True, advanced=True,
                  tooltip="sampler steps; 0: the model's recommendation (turbo 8, base/sft 50)"),
        InputSpec("preview_cfg", "FLOAT", 0.0, min=0.0, max=100.0, step=0.1, optional=True, advanced=True,
                  tooltip="classifier-free guidance; 0: the model's recommendation (turbo 1, base/sft 7)"),
        InputSpec("preview_sampler", "COMBO", "euler", options=("euler",), dynamic=DYNAMIC_SAMPLERS,
                  optional=True, advanced=True, tooltip="ComfyUI sampler, as in KSampler"),
        InputSpec("preview_scheduler", "COMBO", "simple", options=("simple",), dynamic=DYNAMIC_SCHEDULERS,
                  optional=True, advanced=True, tooltip="ComfyUI scheduler, as in KSampler"),
        # the planner LM (optional and last, so workflows saved before these inputs keep their widget order; its
        # settings behind Advanced, so the node still fits a laptop screen)
        cfg("train_models", optional=True),
        InputSpec(LM_NAME, "COMBO", AUTO, options=(AUTO,), dynamic=DYNAMIC_PLANNER_LMS, optional=True, advanced=True,
                  tooltip="the 5 Hz planner LM to train when train_models is lm or both "
                          "(text_encoders/qwen_1.7b_ace15.safetensors or qwen_4b_ace15). auto: the LM inside an "
                          "all-in-one checkpoint, beside an original folder, or in text_encoders"),
        cfg("lm_rank", optional=True, advanced=True, min=1, max=1024),
        cfg("lm_learning_rate", optional=True, advanced=True, min=1e-7, max=10.0, step=1e-5),
        cfg("lm_loss", optional=True, advanced=True),
        cfg("lm_alpha", optional=True, advanced=True, min=0.001, max=4096.0, step=0.5),
        cfg("lm_dropout", optional=True, advanced=True, max=0.99, step=0.01),
        cfg("lm_target_mlp", optional=True, advanced=True),
        # added after the LM's inputs, optional, so saved workflows keep their widget order
        cfg("fused_backward", optional=True, advanced=True),
    ),
    (
        OutputSpec("adapter", ADAPTER_TYPE, "the trained adapter (run/final; run/final/lm for the planner LM's)"),
        OutputSpec("loss_curve", "IMAGE", "loss per step (raw and smoothed)"),
    ),
    search_aliases=("lora", "train lora", "lokr", "dora", "fine-tune"),
)

_EST = EstimateSettings()
ESTIMATE_MODULES = {"all": GROUPS, "attention": ("self_attn", "cross_attn"), "self_attn": ("self_attn",),
                    "cross_attn": ("cross_attn",), "mlp": ("mlp",)}

ESTIMATE = NodeSpec(
    "SideStepEstimateGradients",
    "Estimate Gradients",
    "Measures which DiT projections the dataset pulls on most (the mean squared gradient of the training loss, "
    "a few passes, nothing trained) and ranks them; Train Adapter then trains only the top ones, with ranks "
    "scaled by their score.",
    (
        InputSpec("model", MODEL_TYPE, tooltip="from Load ACE-Step Checkpoint"),
        InputSpec("dataset", DATASET_TYPE, tooltip="from Preprocess Audio Folder"),
        InputSpec("batches", "INT", _EST.batches, min=1, max=10_000, tooltip="batches per run"),
        InputSpec("focus", "COMBO", _EST.focus, options=tuple(FOCUSES),
                  tooltip="timesteps to measure at: balanced (the model's own distribution), texture (t 0-0.4, "
                          "fine detail) or structure (t 0.6-1, arrangement)"),
        InputSpec("top_k", "INT", 0, min=0, max=4096,
                  tooltip="modules to train; 0: half of them, with every kind of projection represented"),
        InputSpec("modules", "COMBO", "all", options=tuple(ESTIMATE_MODULES), advanced=True,
                  tooltip="which projections compete: all, attention (self + cross), self_attn, cross_attn, mlp"),
        InputSpec("runs", "INT", _EST.runs, min=1, max=100, advanced=True,
                  tooltip="independent passes; their spread shows how stable the ranking is"),
        InputSpec("base_rank", "INT", _EST.base_rank, min=1, max=1024, advanced=True,
                  tooltip="rank of a module with the median score; others scale with sqrt(score / median)"),
        InputSpec("rank_min", "INT", _EST.rank_min, min=1, max=1024, advanced=True,
                  tooltip="smallest rank given to a chosen module"),
        InputSpec("rank_max", "INT", _EST.rank_max, min=1, max=1024, advanced=True,
                  tooltip="largest rank given to a chosen module"),
        InputSpec("alpha_ratio", "FLOAT", _EST.alpha_ratio, min=0.01, max=64.0, step=0.01, advanced=True,
                  tooltip="alpha = alpha_ratio x rank for every chosen module"),
        InputSpec("crop_seconds", "FLOAT", _EST.crop_seconds, min=0.0, max=MODEL_MAX_SECONDS, step=1.0,
                  advanced=True, tooltip="random crop per batch (0 = whole clips)"),
        InputSpec("seed", "INT", _EST.seed, min=0, max=2**31 - 1, advanced=True, control_after_generate=FIXED,
                  tooltip="seed of the clip order, crops, timesteps and noise"),
    ),
    (
        OutputSpec("estimate", ESTIMATE_TYPE, "targets and per-module ranks for Train Adapter"),
        OutputSpec("ranking", "STRING", "the ranking as text"),
    ),
    search_aliases=("gradient estimation", "fisher", "target modules"),
)

EXPORT = NodeSpec(
    "SideStepExportAdapter",
    "Export Adapter",
    "Writes the adapter as one .safetensors file ComfyUI's own LoRA loaders apply exactly (per-module alpha "
    "included), by default into models/loras.",
    (
        InputSpec("adapter", ADAPTER_TYPE, tooltip="from Train Adapter"),
        InputSpec("name", "STRING", "sidestep_adapter", tooltip="file name (.safetensors is added)"),
        InputSpec("format", "COMBO", "comfyui", options=EXPORT_FORMATS,
                  tooltip="key names: comfyui (diffusion_model.decoder.…), peft (base_model.model.…, ACE-Step's "
                          "trainer naming, with alpha) or lycoris (lycoris_…); all three load in ComfyUI"),
        InputSpec("overwrite", "BOOLEAN", True, advanced=True,
                  tooltip="replace a file of the same name; off: add a number"),
        InputSpec("directory", "STRING", "", advanced=True,
                  tooltip="write here instead of the first models/loras folder"),
        InputSpec("checkpoint", "STRING", "final",
                  tooltip="which adapter of the run: final, last (newest checkpoint), step_N, ema (final's moving "
                          "average, when trained with ema_decay), step_N/ema or last/ema"),
    ),
    (OutputSpec("path", "STRING", "the written file"),),
    output_node=True,
    search_aliases=("save lora", "export lora"),
)

APPLY = NodeSpec(
    "SideStepApplyAdapter",
    "Apply Adapter",
    "Applies an adapter to a ComfyUI MODEL through ComfyUI's model patcher (the model itself is not changed): the "
    "adapter from the graph, or a file from models/loras. Per-group strengths scale self-attention, "
    "cross-attention and MLP modules separately. With a CLIP connected, a planner-LM adapter trained with it "
    "patches the text encoder's 5 Hz LM too.",
    (
        InputSpec("model", "MODEL", tooltip="an ACE-Step 1.5 MODEL (UNETLoader / CheckpointLoaderSimple)"),
        InputSpec("lora_name", "COMBO", NONE, options=(NONE,), dynamic=DYNAMIC_LORAS,
                  tooltip="a file from models/loras, used when no adapter is connected"),
        InputSpec("strength", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01,
                  tooltip="1 applies the adapter as trained; 0 turns it off; negative values push away from it"),
        InputSpec("self_attn_strength", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01, advanced=True,
                  tooltip="multiplies strength on self-attention modules"),
        InputSpec("cross_attn_strength", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01, advanced=True,
                  tooltip="multiplies strength on cross-attention modules"),
        InputSpec("mlp_strength", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01, advanced=True,
                  tooltip="multiplies strength on MLP modules"),
        InputSpec("adapter", ADAPTER_TYPE, optional=True, tooltip="from Train Adapter (wins over lora_name)"),
        InputSpec("checkpoint", "STRING", "final", optional=True,
                  tooltip="with a connected adapter, which one of its run: final, last (newest checkpoint), step_N, "
                          "ema (final's moving average, when trained with ema_decay), step_N/ema or last/ema"),
        InputSpec("clip", "CLIP", optional=True,
                  tooltip="the ACE-Step 1.5 CLIP (DualCLIPLoader type ace, with the 5 Hz LM): its LM gets the "
                          "planner-LM adapter (the run's final/lm, or <lora_name>_lm.safetensors beside the file), "
                          "which TextEncodeAceStepAudio1.5 uses with generate_audio_codes on"),
        InputSpec("lm_strength", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                  tooltip="strength of the planner-LM adapter on the connected CLIP"),
    ),
    (OutputSpec("model", "MODEL", "the patched model"),
     OutputSpec("clip", "CLIP", "the CLIP with the planner LM patched (the input as it is without an LM adapter)")),
    search_aliases=("load lora", "lora loader", "apply lora"),
)

COMPARE = NodeSpec(
    "SideStepCompareAdapters",
    "Compare Adapters",
    "Renders your generation for every chosen checkpoint of a run (or several adapters) at every strength, with "
    "one seed, so you can choose by ear: a grid of play buttons (rows: checkpoints, columns: strengths), the "
    "audio as one batch, the loss curve with the compared checkpoints marked and a table. States the cost before "
    "rendering; Cancel stops between renders.",
    (
        InputSpec("model", "MODEL", tooltip="the ACE-Step 1.5 MODEL you generate with (e.g. Load Diffusion Model); "
                                           "each render patches a copy of it"),
        InputSpec("positive", "CONDITIONING", tooltip="positive conditioning (TextEncodeAceStepAudio1.5; put the "
                                                      "trigger tag in)"),
        InputSpec("negative", "CONDITIONING", tooltip="negative conditioning (e.g. ConditioningZeroOut)"),
        InputSpec("latent", "LATENT", tooltip="the latent to sample (EmptyAceStep1.5LatentAudio sets the length; "
                                              "keep it short: every cell is one render)"),
        InputSpec("vae", "VAE", tooltip="the ACE-Step 1.5 VAE (VAELoader)"),
        InputSpec("checkpoints", "STRING", "last 3",
                  tooltip="which adapters of the run: all (every checkpoint, then final, with EMA twins), last N "
                          "(the N newest), or a list of final, last, step_N, ema, step_N/ema"),
        InputSpec("strengths", "STRING", "0.5, 0.8, 1.0",
                  tooltip="adapter strengths, comma-separated; 0 is the base model (rendered once)"),
        InputSpec("seed", "INT", 0, min=0, max=2**63 - 1, control_after_generate=FIXED,
                  tooltip="noise seed of every render (the same noise for all: they differ by the adapter alone)"),
        InputSpec("steps", "INT", 8, min=1, max=10_000, tooltip="sampler steps (turbo 8, base/sft 50)"),
        InputSpec("cfg", "FLOAT", 1.0, min=0.0, max=100.0, step=0.1,
                  tooltip="classifier-free guidance (turbo 1, base/sft 7)"),
        InputSpec("sampler", "COMBO", "euler", options=("euler",), dynamic=DYNAMIC_SAMPLERS,
                  tooltip="ComfyUI sampler, as in KSampler"),
        InputSpec("scheduler", "COMBO", "simple", options=("simple",), dynamic=DYNAMIC_SCHEDULERS,
                  tooltip="ComfyUI scheduler, as in KSampler"),
        InputSpec("adapter", ADAPTER_TYPE, optional=True,
                  tooltip="from Train Adapter: its run's checkpoints are compared"),
        InputSpec("run", "STRING", "", optional=True, advanced=True,
                  tooltip="a training run folder to compare (absolute, or relative to output/sidestep), besides "
                          "or instead of a connected adapter"),
        InputSpec("lora_names", "STRING", "", multiline=True, optional=True, advanced=True,
                  tooltip="adapter files from models/loras to compare too, one per line (each is one row)"),
        InputSpec("clip", "CLIP", optional=True,
                  tooltip="the CLIP your TextEncodeAceStepAudio1.5 uses (with the planner LM): when it writes audio "
                          "codes, each checkpoint's planner-LM adapter patches the LM and that encoder runs again, so "
                          "the grid hears the codes each checkpoint's LM writes"),
    ),
    (
        OutputSpec("audio", "AUDIO", "every cell's audio as one batch, row by row (Save Audio / Preview Audio)"),
        OutputSpec("loss_curve", "IMAGE", "the run's loss (and validation loss) with the compared checkpoints "
                                          "marked"),
        OutputSpec("table", "STRING", "the grid as a table: checkpoint, step, validation loss, render per strength"),
    ),
    output_node=True,
    search_aliases=("compare lora", "compare checkpoints", "listening grid", "ab test"),
)

MERGE_MODES = ("sum", "bake")
MERGE_SLOTS = 3  # lora_N / weight_N pairs


def _merge_slot(n: int) -> tuple[InputSpec, InputSpec]:
    return (InputSpec(f"lora_{n}", "COMBO", NONE, options=(NONE,), dynamic=DYNAMIC_LORAS,
                      tooltip="an adapter file from models/loras (none: unused)"),
            InputSpec(f"weight_{n}", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01,
                      tooltip="its weight in the sum, or its strength when baked"))


MERGE = NodeSpec(
    "SideStepMergeAdapters",
    "Merge Adapters",
    "Combines adapters. sum: one new adapter in models/loras whose weight change is exactly the weighted sum of "
    "the sources' (LoRAs of any ranks are concatenated, no approximation; LoHa/LoKr enter exactly; DoRA and OFT "
    "cannot be summed — bake them). bake: a copy of the base model with every adapter applied in order at its "
    "weight, written to models/diffusion_models for UNETLoader.",
    (
        InputSpec("mode", "COMBO", "sum", options=MERGE_MODES,
                  tooltip="sum: a new adapter (LoRA family); bake: a new diffusion model file (every adapter type)"),
        *(i for n in range(1, MERGE_SLOTS + 1) for i in _merge_slot(n)),
        InputSpec("name", "STRING", "sidestep_merged", tooltip="file name (.safetensors is added)"),
        InputSpec("overwrite", "BOOLEAN", True, advanced=True,
                  tooltip="replace a file of the same name; off: add a number"),
        InputSpec("rank", "INT", 0, min=0, max=4096, advanced=True,
                  tooltip="sum: cut every target to its best rank-N approximation (truncated SVD; smaller, no longer "
                          "exact: the error is shown); 0 keeps the exact sum"),
        InputSpec("adapter", ADAPTER_TYPE, optional=True,
                  tooltip="from Train Adapter: merged first, before the files"),
        InputSpec("adapter_weight", "FLOAT", 1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                  tooltip="the connected adapter's weight (strength when baked)"),
        InputSpec("checkpoint", "STRING", "final", optional=True,
                  tooltip="with a connected adapter, which one of its run: final, last, step_N, ema, step_N/ema "
                          "or last/ema"),
        InputSpec("model", MODEL_TYPE, optional=True,
                  tooltip="bake: the base model (from Load ACE-Step Checkpoint); default: the model the "
                          "connected adapter was trained on"),
    ),
    (OutputSpec("path", "STRING", "the written file"),),
    output_node=True,
    search_aliases=("merge lora", "combine lora", "bake lora", "lora merge"),
)

NODES: tuple[NodeSpec, ...] = (LOAD, PREPROCESS, TRAIN, ESTIMATE, EXPORT, APPLY, COMPARE, MERGE)
BY_ID = {n.node_id: n for n in NODES}

# Apply Adapter's groups: (input, substring of the module path).
STRENGTH_GROUPS = (("self_attn_strength", ".self_attn."), ("cross_attn_strength", ".cross_attn."),
                   ("mlp_strength", ".mlp."))


def train_config_from_inputs(values: dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """The ``TrainConfig`` a Train Adapter node describes.

    ``base`` (a preset) gives the starting values; an input left at its ``TrainConfig`` default keeps the base's
    value, any other input overrides it. Without a base this is simply the inputs.
    """
    changes = {}
    for spec in TRAIN.inputs:
        if not spec.config_field or spec.name not in values:
            continue
        value = to_config_value(spec, values[spec.name])
        if base is not None and value == config_default(spec.config_field):
            continue
        changes[spec.config_field] = value
    start = base if base is not None else TrainConfig()
    return TrainConfig.from_dict({**start.to_dict(), **changes})


# ----------------------------------------------------------------------------------------------------------
# example workflows (ComfyUI's UI format) against the specs
# ----------------------------------------------------------------------------------------------------------


def node_info(node: NodeSpec) -> dict:
    """The node as ComfyUI's ``/object_info`` describes it (``input``, ``input_order``, ``output``). Combos filled
    from the user's folders at run time carry ``"any_file": True`` instead of their (unknown) file names."""
    sections: dict[str, dict] = {"required": {}, "optional": {}}
    for i in node.inputs:
        opts: dict[str, Any] = {}
        if i.default is not None:
            opts["default"] = i.default
        if i.min is not None:
            opts["min"] = i.min
        if i.max is not None:
            opts["max"] = i.max
        if i.control_after_generate is not None:
            opts[CONTROL] = i.control_after_generate
        if i.kind == "COMBO":
            opts["options"] = list(i.options)
            if i.dynamic:
                opts["any_file"] = True
        sections["optional" if i.optional else "required"][i.name] = [i.kind, opts]
    return {"input": {k: v for k, v in sections.items() if v},
            "input_order": {k: list(v) for k, v in sections.items() if v},
            "output": [o.kind for o in node.outputs]}


def is_widget(input_spec: list) -> bool:
    """True for an /object_info input that is a widget (its value sits in ``widgets_values``)."""
    kind = input_spec[0]
    return isinstance(kind, list) or kind in WIDGET_KINDS or kind == "COMFY_DYNAMICCOMBO_V3"


def has_control(name: str, input_spec: list) -> bool:
    """Seed-like widgets store an extra ``control_after_generate`` value after their own. The front end (1.45)
    adds that widget when the input asks for it, and, unless it says ``false``, to every INT input named like a
    seed (a legacy convention that ComfyUI's /object_info does not show)."""
    opts = input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {}
    control = opts.get(CONTROL)
    if control is None:
        return input_spec[0] == "INT" and name in SEED_NAMES
    return bool(control)


def _check_value(name: str, input_spec: list, value: Any) -> Optional[str]:
    kind, opts = input_spec[0], (input_spec[1] if len(input_spec) > 1 and isinstance(input_spec[1], dict) else {})
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        if opts.get("any_file") and isinstance(value, str) and value not in options:
            return None  # a file name: only the running ComfyUI knows its folders
        if value in options:
            return None
        return f"{name}: {value!r} is not one of {options[:8]}{'…' if len(options) > 8 else ''}"
    if kind == "COMFY_DYNAMICCOMBO_V3":
        keys = [o["key"] for o in opts["options"]]
        return None if value in keys else f"{name}: {value!r} is not one of {keys}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: expected true/false, got {value!r}"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: expected a string, got {value!r}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: expected a number, got {value!r}"
        if kind == "INT" and int(value) != value:
            return f"{name}: expected an integer, got {value!r}"
        if opts.get("min") is not None and value < opts["min"]:
            return f"{name}: {value!r} is below the minimum {opts['min']}"
        if opts.get("max") is not None and value > opts["max"]:
            return f"{name}: {value!r} is above the maximum {opts['max']}"
    return None


def check_widgets(node: dict, info: dict) -> list[str]:
    """Problems with a UI-format node's positional ``widgets_values`` against its ``/object_info`` entry (ComfyUI's,
    or ``node_info`` of ours): one value per widget in ``input_order`` (required, then optional), plus the
    ``control_after_generate`` value of seed-like widgets and the sub-widgets of V3 dynamic combos."""
    where = f"node {node.get('id')} ({node.get('type')})"
    values = node.get("widgets_values")
    if not isinstance(values, list):
        return [f"{where}: widgets_values must be a list"]
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    problems, pos = [], 0
    for name in order:
        spec = specs[name]
        if not is_widget(spec):
            continue
        if pos >= len(values):
            return problems + [f"{where}: {len(values)} widget values, none for {name!r}"]
        value = values[pos]
        why = _check_value(name, spec, value)
        if why:
            problems.append(f"{where}: {why}")
        pos += 1
        if has_control(name, spec):
            if pos >= len(values) or values[pos] not in CONTROL_MODES:
                problems.append(f"{where}: {name!r} needs a control_after_generate value after it")
            pos += 1
        if spec[0] == "COMFY_DYNAMICCOMBO_V3":
            option = next((o for o in spec[1]["options"] if o["key"] == value), {"inputs": {}})
            for sub_name, sub_spec in option["inputs"].get("required", {}).items():
                why = _check_value(f"{name}.{sub_name}", sub_spec, values[pos] if pos < len(values) else None)
                if why:
                    problems.append(f"{where}: {why}")
                pos += 1
    if pos != len(values) and node.get("type") != "PreviewAny":  # PreviewAny's frontend adds a display widget
        problems.append(f"{where}: {len(values)} widget values for {pos} widget slots")
    return problems


def check_ui_workflow_node(node: dict) -> list[str]:
    """Problems with one of *our* nodes in a UI-format workflow: widget values, socket and output types."""
    spec = BY_ID.get(node.get("type"))
    if spec is None:
        return []
    where = f"node {node.get('id')} ({spec.node_id})"
    problems = check_widgets(node, node_info(spec))
    socket_inputs = {i.name: i for i in spec.inputs}
    for inp in node.get("inputs", []):
        name = inp.get("name")
        if name not in socket_inputs:
            problems.append(f"{where}: unknown input {name!r}")
        elif not socket_inputs[name].is_widget and inp.get("type") not in (socket_inputs[name].kind, "*"):
            problems.append(f"{where}: input {name!r} has type {inp.get('type')!r}, expected "
                            f"{socket_inputs[name].kind!r}")
    outs = node.get("outputs", [])
    if [o.get("type") for o in outs] != [o.kind for o in spec.outputs]:
        problems.append(f"{where}: outputs {[o.get('type') for o in outs]} != {[o.kind for o in spec.outputs]}")
    return problems


def check_ui_workflow_links(workflow: dict) -> list[str]:
    """Every link joins existing slots of equal type, and every required socket of our nodes is linked."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for link in workflow.get("links", []):
        lid, src, src_slot, dst, dst_slot, kind = link[:6]
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: joins a missing node")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if src_slot >= len(outs) or dst_slot >= len(ins):
            problems.append(f"link {lid}: slot out of range")
            continue
        if lid not in (outs[src_slot].get("links") or []) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: not recorded on both ends")
        types = {kind, outs[src_slot].get("type"), ins[dst_slot].get("type")}
        if len(types - {"*"}) > 1:
            problems.append(f"link {lid}: type mismatch {sorted(types)}")
    for node in nodes.values():
        spec = BY_ID.get(node.get("type"))
        if spec is None:
            continue
        linked = {i.get("name") for i in node.get("inputs", []) if i.get("link") is not None}
        for i in spec.inputs:
            if not i.is_widget and not i.optional and i.name not in linked:
                problems.append(f"node {node['id']} ({spec.node_id}): required input {i.name!r} is not linked")
    return problems
