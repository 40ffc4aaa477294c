"""Adapters on the DiT decoder: LoRA and DoRA through PEFT, LoKR, LoHA and OFT through LyCORIS.

On-disk formats (one inference-ready adapter per folder):

- LoRA / DoRA: PEFT folder, ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.layers.{i}.{self_attn|cross_attn}.{q,k,v,o}_proj.lora_{A,B}.weight`` (DoRA adds
  ``….lora_magnitude_vector`` [out], PEFT's row-wise magnitude). Alpha lives in ``adapter_config.json`` as PEFT has it.
- LoKR / LoHA / OFT: one LyCORIS file ``{lokr,loha,oft}_weights.safetensors`` with keys
  ``lycoris_layers_{i}_{self_attn|cross_attn}_{q,k,v,o}_proj.{lokr_w1,lokr_w2[_a/_b],hada_w1_a,…,oft_blocks,alpha}``.
  OFT is LyCORIS diag-OFT: ``oft_blocks`` [n_blocks, b, b] (+ ``rescale`` [out, 1]) — the layout ComfyUI's
  OFTAdapter reads (ComfyUI does not read PEFT OFT). LoKR files also carry ``lokr_config``, the JSON upstream
  ACE-Step's own loader builds its LoKr network from (:mod:`sidestep_core.adapters.upstream`).

Every file carries string metadata ``sidestep_*`` (adapter type and options, targets, base variant and identity,
recommended shift/steps, trigger tag, steps, pack version, training settings) besides the library's own keys.
All weights are stored in fp32.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import safe_open
from torch import nn

from ..config import TrainConfig
from ..fsutil import atomic_save_file, atomic_write_json

PEFT_KINDS = ("lora", "dora")
LYCORIS_KINDS = ("lokr", "loha", "oft")
LYCORIS_ALGO = {"lokr": "lokr", "loha": "loha", "oft": "diag-oft"}
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LYCORIS_FILE = {k: f"{k}_weights.safetensors" for k in LYCORIS_KINDS}
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class AdapterMismatchError(ValueError):
    """Adapter weights that do not fit the model they are loaded into (message starts with the file path)."""


# ----------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------


def candidate_modules(decoder: nn.Module) -> list[str]:
    """Names of every adaptable ``nn.Linear`` inside the DiT layers, in module order."""
    return [
        name for name, mod in decoder.named_modules()
        if isinstance(mod, nn.Linear) and name.startswith("layers.") and name.rsplit(".", 1)[-1] in ATTN_PROJ + MLP_PROJ
    ]


def resolve_targets(decoder: nn.Module, cfg: TrainConfig) -> list[str]:
    """Full module names (``layers.{i}.self_attn.q_proj`` …) the adapter goes on.

    ``target_modules`` entries match a full name exactly or as a dotted suffix (``q_proj``, ``self_attn.q_proj``,
    ``layers.3.mlp.up_proj``); an entry that matches nothing is an error rather than a silent no-op.
    """
    names = candidate_modules(decoder)
    if cfg.target_modules:
        chosen: set[str] = set()
        for entry in cfg.target_modules:
            entry = entry.strip().strip(".")
            hits = [n for n in names if n == entry or n.endswith("." + entry)]
            if not hits:
                raise ValueError(f"target_modules: {entry!r} matches no adaptable module of the decoder")
            chosen.update(hits)
        return [n for n in names if n in chosen]
    kinds = {"both": ("self_attn", "cross_attn"), "self": ("self_attn",), "cross": ("cross_attn",), "none": ()}
    wanted = set()
    for attn in kinds[cfg.attention]:
        wanted.update(f"{attn}.{p}" for p in ATTN_PROJ)
    if cfg.target_mlp:
        wanted.update(f"mlp.{p}" for p in MLP_PROJ)
    return [n for n in names if n.split(".", 2)[2] in wanted]


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any:
    """PEFT's rule: the first key whose regex matches the full name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def per_module_rank_alpha(cfg: TrainConfig, targets: list[str]) -> dict[str, tuple[int, float]]:
    out = {}
    for name in targets:
        r = _pattern_value(cfg.rank_pattern, name)
        a = _pattern_value(cfg.alpha_pattern, name)
        out[name] = (int(r) if r is not None else cfg.rank, float(a) if a is not None else float(cfg.alpha))
    return out


# ----------------------------------------------------------------------------------------------------------
# the adapter object
# ----------------------------------------------------------------------------------------------------------


class TrainModule(nn.Module):
    """The decoder plus the adapter network as one module, so DDP and ``parameters()`` see every trainable tensor
    (LyCORIS keeps its modules outside the decoder and patches the decoder's forwards)."""

    def __init__(self, decoder: nn.Module, network: Optional[nn.Module] = None):
        super().__init__()
        self.decoder = decoder
        self.network = network

    def forward(self, **kwargs) -> torch.Tensor:
        return self.decoder(**kwargs)


@dataclass
class Adapter:
    kind: str
    targets: list[str]
    module: TrainModule
    options: dict[str, Any]
    peft_model: Any = None  # peft.PeftModel for lora/dora
    network: Any = None  # lycoris.LycorisNetwork for lokr/loha/oft
    extra: dict[str, Any] = field(default_factory=dict)
    lm: Any = None  # the planner LM's LMAdapter in a run that trains both (a step hook's previews hear it)

    # ----- parameters -----
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- weights in file key format -----
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.kind in PEFT_KINDS:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.peft_model)
        else:
            sd = self.network.state_dict()
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}

    def weights(self, source: str = "live adapter"):
        """The adapter as it is now, in the common in-memory form (:class:`sidestep_core.adapters.AdapterWeights`):
        detached fp32 CPU copies, read exactly as the files ``save`` writes would be read back."""
        from ..adapters.formats import parse_state_dict

        if self.kind in PEFT_KINDS:
            return parse_state_dict(self.state_dict(), "peft", source=source, peft_config=self.peft_config_dict(),
                                    metadata={"format": "pt"})
        return parse_state_dict(self.state_dict(), "lycoris", source=source,
                                metadata={"format": "lycoris", "algo": LYCORIS_ALGO[self.kind]})

    def base_weight(self, name: str) -> torch.Tensor:
        """The frozen base weight of target ``name`` (decoder-relative), under whatever wrapper the adapter added."""
        from ..adapters.weights import resolve_target

        owner, attr = resolve_target(self.module.decoder, name)
        layer = getattr(owner, attr) if not isinstance(getattr(owner, attr), torch.Tensor) else owner
        for cand in (getattr(layer, "base_layer", None), getattr(layer, "org_module", None), layer):
            w = getattr(cand, "weight", None) if cand is not None else None
            if isinstance(w, torch.Tensor):
                return w.detach()
        raise KeyError(name)

    def comfyui_state_dict(self, dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The live adapter in ComfyUI's key format (what ``comfy.sd.load_lora_for_models`` takes), as detached CPU
        copies: ``(state dict, notes)``. PEFT-style DoRA is converted against this model's own base weights."""
        from ..adapters.comfy_export import needs_base, to_comfyui_state_dict

        aw = self.weights()
        base = (lambda n: self.base_weight(n).to("cpu", torch.float32)) if needs_base(aw) else None
        return to_comfyui_state_dict(aw, base=base, dtype=dtype)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        """Strict: the file must hold exactly this adapter's keys with the same shapes, or nothing is loaded."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
        if wrong:
            problems.append(f"shape mismatch: {'; '.join(wrong[:3])}")
        if problems:
            raise AdapterMismatchError(
                f"{source}: adapter weights do not match the {self.kind} adapter being trained "
                f"({len(own)} keys) — " + " | ".join(problems)
            )
        with torch.no_grad():
            if self.kind in PEFT_KINDS:
                from peft import set_peft_model_state_dict

                device = self.parameters()[0].device
                res = set_peft_model_state_dict(self.peft_model, {k: v.to(device) for k, v in sd.items()})
                if getattr(res, "unexpected_keys", None):
                    raise AdapterMismatchError(f"{source}: PEFT did not accept keys {res.unexpected_keys[:3]}")
            else:
                self.network.load_state_dict({k: v for k, v in sd.items()}, strict=True)
        # Loading must leave the trainable copies in fp32 whatever the file held.
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()

    # ----- files -----
    def save(self, folder: str | Path, metadata: Mapping[str, str]) -> list[Path]:
        """Write the inference-ready adapter into ``folder`` (atomic per file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict()
        meta = {k: str(v) for k, v in metadata.items()}
        if self.kind in PEFT_KINDS:
            meta["format"] = "pt"
            weights = folder / PEFT_WEIGHTS
            atomic_save_file(sd, weights, meta)
            atomic_write_json(folder / PEFT_CONFIG, self.peft_config_dict())
            return [weights, folder / PEFT_CONFIG]
        meta.update({"format": "lycoris", "algo": LYCORIS_ALGO[self.kind]})
        if self.kind == "lokr":  # what upstream ACE-Step's own loader builds its LoKr network from
            from ..adapters.upstream import LOKR_CONFIG_KEY, lokr_config

            meta[LOKR_CONFIG_KEY] = json.dumps(lokr_config(self.options, self.targets))
        path = folder / LYCORIS_FILE[self.kind]
        atomic_save_file(sd, path, meta)
        return [path]

    def peft_config_dict(self) -> dict[str, Any]:
        conf = self.peft_model.peft_config["default"].to_dict()
        out = {}
        for k, v in conf.items():
            if isinstance(v, set):
                v = sorted(v)
            elif hasattr(v, "value"):  # enums
                v = v.value
            out[k] = v
        out["base_model_name_or_path"] = ""
        out["inference_mode"] = True
        return out


# ----------------------------------------------------------------------------------------------------------
# injection
# ----------------------------------------------------------------------------------------------------------


def adapter_options(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define an adapter's shape and maths (stored in metadata and compared on resume). Dropout
    only for LoRA / DoRA: LoKR, LoHA and OFT train without it (:func:`unapplied_dropout`)."""
    opts: dict[str, Any] = {"rank": cfg.rank, "alpha": cfg.alpha}
    if cfg.adapter in PEFT_KINDS:
        opts["dropout"] = cfg.dropout
    if cfg.rank_pattern:
        opts["rank_pattern"] = dict(cfg.rank_pattern)
    if cfg.alpha_pattern:
        opts["alpha_pattern"] = dict(cfg.alpha_pattern)
    if cfg.adapter == "lokr":
        opts.update(factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both, use_tucker=cfg.lokr_use_tucker,
                    use_scalar=cfg.lokr_use_scalar, full_matrix=cfg.lokr_full_matrix)
    elif cfg.adapter == "loha":
        opts.update(use_tucker=cfg.loha_use_tucker, use_scalar=cfg.loha_use_scalar)
    elif cfg.adapter == "oft":
        opts = {"block_size": cfg.oft_block_size, "constraint": cfg.oft_constraint, "rescaled": cfg.oft_rescaled}
    return opts


def unapplied_dropout(cfg: TrainConfig) -> Optional[str]:
    """Why ``cfg.dropout`` is not applied (None: it is). LyCORIS's LoKr and LoHa apply no dropout in their rebuild
    forward (used over plain linears) but do in their bypass forward (over quantized ones), and OFT's dropout is
    ignored by its rebuild forward (kept over every base, ``keep_oft_rebuild``): so they get none, on every base."""
    if cfg.dropout and cfg.adapter in LYCORIS_KINDS:
        return (f"dropout {cfg.dropout} is not applied: LyCORIS's {cfg.adapter} has no input dropout, so this "
                "adapter trains without it (dropout is for lora and dora)")
    return None


def inject_adapter(decoder: nn.Module, cfg: TrainConfig, targets: Optional[list[str]] = None) -> Adapter:
    """Add a fresh adapter of ``cfg.adapter`` to ``decoder`` (in place). Initialisation draws from the global torch
    RNG: seed it first for reproducible weights. Trainable tensors are fp32 on the decoder's device."""
    targets = targets if targets is not None else resolve_targets(decoder, cfg)
    if not targets:
        raise ValueError("target_modules: the settings select no module of the decoder")
    device = next(decoder.parameters()).device
    if cfg.adapter in PEFT_KINDS:
        adapter = _inject_peft(decoder, cfg, targets)
    else:
        adapter = _inject_lycoris(decoder, cfg, targets)
    for p in adapter.parameters():
        p.data = p.data.to(device=device, dtype=torch.float32)
    if adapter.network is not None:
        adapter.network.to(device)  # buffers (alpha) too
    return adapter


def _inject_peft(decoder: nn.Module, cfg: TrainConfig, targets: list[str]) -> Adapter:
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        use_dora=cfg.adapter == "dora",
        bias="none",
    )
    peft_model = get_peft_model(decoder, conf)
    if cfg.adapter == "lora":
        from .fast_lora import install

        install(decoder)
    module = TrainModule(decoder)
    return Adapter(cfg.adapter, targets, module, adapter_options(cfg), peft_model=peft_model)


def _inject_lycoris(decoder: nn.Module, cfg: TrainConfig, targets: list[str]) -> Adapter:
    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every module at INFO
    algo = LYCORIS_ALGO[cfg.adapter]
    per_module = per_module_rank_alpha(cfg, targets) if (cfg.rank_pattern or cfg.alpha_pattern) else {}
    name_map = {re.escape(n) + "$": {"algo": algo, "dim": r, "alpha": a} for n, (r, a) in per_module.items()}
    # The preset lives on the class: set every key so nothing leaks in from an earlier network. Exact anchored
    # names, so "layers.1." never matches "layers.10.". (create_lycoris would re-apply its own "full" preset.)
    LycorisNetwork.apply_preset({
        "enable_conv": False,
        "target_module": [],
        "target_name": [] if name_map else [re.escape(n) + "$" for n in targets],
        "module_algo_map": {},
        "name_algo_map": name_map,
        "lora_prefix": "lycoris",
        "use_fnmatch": False,
        "exclude_name": [],
    })
    dim, alpha = cfg.rank, cfg.alpha
    kw: dict[str, Any] = dict(use_tucker=False, use_scalar=False)
    if cfg.adapter == "lokr":
        kw.update(factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both, use_tucker=cfg.lokr_use_tucker,
                  use_scalar=cfg.lokr_use_scalar, full_matrix=cfg.lokr_full_matrix)
    elif cfg.adapter == "loha":
        kw.update(use_tucker=cfg.loha_use_tucker, use_scalar=cfg.loha_use_scalar)
    else:  # diag-OFT: lora_dim is the block-size factor; the constraint is what LyCORIS stores as "alpha"
        dim, alpha = cfg.oft_block_size, 1.0
        kw.update(constraint=cfg.oft_constraint, rescaled=cfg.oft_rescaled)
    network = LycorisNetwork(
        decoder, multiplier=1.0, lora_dim=dim, conv_lora_dim=0, alpha=alpha, conv_alpha=alpha,
        dropout=0.0, rank_dropout=0.0, module_dropout=0.0, network_module=algo, **kw,
    )
    network.apply_to()
    made = sorted(m.lora_name for m in network.loras)
    expected = sorted("lycoris_" + n.replace(".", "_") for n in targets)
    if made != expected:
        raise RuntimeError(f"LyCORIS adapted {len(made)} modules, expected {len(expected)}")
    network.requires_grad_(True)
    module = TrainModule(decoder, network)
    extra = {}
    if cfg.adapter == "oft":
        extra["block_sizes"] = sorted({int(m.block_size) for m in network.loras})
    return Adapter(cfg.adapter, targets, module, adapter_options(cfg), network=network, extra=extra)


# ----------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AdapterFile:
    kind: str
    weights: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    peft_config: Optional[dict[str, Any]] = None


def find_adapter(folder: str | Path) -> tuple[str, Path]:
    """``(kind, weights_path)`` of the adapter stored in ``folder`` (or named directly)."""
    path = Path(folder)
    if path.is_file():
        folder, name = path.parent, path.name
    else:
        name = None
    candidates = []
    if (name in (None, PEFT_WEIGHTS)) and (folder / PEFT_WEIGHTS).is_file():
        candidates.append(("peft", folder / PEFT_WEIGHTS))
    for kind, fname in LYCORIS_FILE.items():
        if name in (None, fname) and (folder / fname).is_file():
            candidates.append((kind, folder / fname))
    if not candidates:
        raise ValueError(f"{path}: no adapter found ({PEFT_WEIGHTS} or one of {', '.join(LYCORIS_FILE.values())})")
    if len(candidates) > 1:
        raise ValueError(f"{path}: holds several adapters ({', '.join(p.name for _, p in candidates)})")
    kind, weights = candidates[0]
    if kind == "peft":
        conf_path = weights.parent / PEFT_CONFIG
        try:
            conf = json.loads(conf_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{conf_path}: missing or unreadable PEFT adapter config ({exc})") from exc
        kind = "dora" if conf.get("use_dora") else "lora"
    return kind, weights


def read_adapter(path: str | Path) -> AdapterFile:
    kind, weights = find_adapter(path)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated or not safetensors
        raise ValueError(f"{weights}: cannot read adapter weights ({exc})") from exc
    conf = None
    if kind in PEFT_KINDS:
        conf = json.loads((weights.parent / PEFT_CONFIG).read_text(encoding="utf-8"))
    return AdapterFile(kind, weights, tensors, meta, conf)


def load_adapter_weights(adapter: Adapter, folder: str | Path) -> AdapterFile:
    """Load the adapter saved in ``folder`` into ``adapter`` — strictly: a different type, key set or shape fails."""
    f = read_adapter(folder)
    if f.kind != adapter.kind:
        raise AdapterMismatchError(f"{f.weights}: holds a {f.kind} adapter, but a {adapter.kind} adapter is trained")
    adapter.load_state_dict(f.tensors, str(f.weights))
    return f


def metadata_json(values: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata must be str → str: JSON-encode everything that is not already a string."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def iter_adapter_paths(folder: Path) -> Iterable[Path]:
    for name in (PEFT_WEIGHTS, PEFT_CONFIG, *LYCORIS_FILE.values()):
        if (folder / name).exists():
            yield folder / name
