"""Detect and read adapter files into :class:`~.weights.AdapterWeights`.

Readable inputs:

- **PEFT folders** (``adapter_config.json`` + ``adapter_model.safetensors``): ACE-Step's own trainer, Side-Step and
  ``sidestep train`` for LoRA / DoRA. Keys ``base_model.model.<path>.lora_{A,B}.weight`` (+ ``lora_magnitude_vector``
  for DoRA); the scale comes from the config (``lora_alpha``, ``rank_pattern`` / ``alpha_pattern``, rsLoRA). PEFT
  LoHa folders (``hada_w{1,2}_{a,b}``, ``alpha``) as ``sidestep export --format peft`` writes them.
- **LyCORIS files** (``{lokr,loha,oft}_weights.safetensors`` as ``sidestep train`` and Side-Step write, or any file
  whose keys are ``lycoris_<path_with_underscores>.*``): LoKr, LoHa, diag-OFT, LoCon, with per-module ``alpha``.
- **ComfyUI-format files**: keys ``diffusion_model.<path>.*`` (ComfyUI's ``TrainLoraNode`` / ``SaveLoRA``, our own
  export), ``base_model.model.<path>.*`` with ``.alpha`` (Side-Step's export), ``lora_unet_<path>.*`` (kohya).
  Every suffix ComfyUI reads for a linear layer is understood, plus ``diff`` / ``diff_b`` / ``w_norm`` / ``b_norm``.

What differs between the families is resolved here, once: LyCORIS stores the OFT constraint per output row
(effective bound = alpha · out) while ComfyUI applies ``alpha`` as the bound itself; an ``[out, 1]`` ``dora_scale``
is LyCORIS's trained row-wise DoRA in a LyCORIS file but ComfyUI's "divide by the base weight's row norm" in a
ComfyUI file; PEFT keeps alpha in its config while ComfyUI files keep it per module (none = scale 1.0, as ComfyUI).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from . import names as nm
from .weights import AdapterFormatError, AdapterShapeError, AdapterWeights, ModuleWeights

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LYCORIS_FILES = ("lokr_weights.safetensors", "loha_weights.safetensors", "oft_weights.safetensors")

# (suffix as it follows the module key, canonical tensor name). Longest suffixes are tried first.
_TENSOR_SUFFIXES: list[tuple[str, str]] = [
    (".lora_up.weight", "lora:up"), (".lora_down.weight", "lora:down"),
    ("_lora.up.weight", "lora:up"), ("_lora.down.weight", "lora:down"),
    (".lora_B.weight", "lora:up"), (".lora_A.weight", "lora:down"),
    (".lora.up.weight", "lora:up"), (".lora.down.weight", "lora:down"),
    (".lora_B.default.weight", "lora:up"), (".lora_A.default.weight", "lora:down"),
    (".lora_linear_layer.up.weight", "lora:up"), (".lora_linear_layer.down.weight", "lora:down"),
    (".lora_B", "lora:up"), (".lora_A", "lora:down"),
    (".lokr_w1", "lokr:w1"), (".lokr_w1_a", "lokr:w1_a"), (".lokr_w1_b", "lokr:w1_b"),
    (".lokr_w2", "lokr:w2"), (".lokr_w2_a", "lokr:w2_a"), (".lokr_w2_b", "lokr:w2_b"), (".lokr_t2", "lokr:t2"),
    (".hada_w1_a", "loha:w1_a"), (".hada_w1_b", "loha:w1_b"), (".hada_w2_a", "loha:w2_a"),
    (".hada_w2_b", "loha:w2_b"), (".hada_t1", "loha:t1"), (".hada_t2", "loha:t2"),
    (".oft_blocks", "oft:blocks"), (".rescale", "oft:rescale"),
    (".diff", "diff:diff"), (".w_norm", "diff:diff"),
    (".diff_b", "bias:bias"), (".b_norm", "bias:bias"),
    (".alpha", "meta:alpha"), (".dora_scale", "meta:dora"),
    (".lora_magnitude_vector", "meta:dora"), (".lora_magnitude_vector.weight", "meta:dora"),
    (".lora_magnitude_vector.default.weight", "meta:dora"),
]
_TENSOR_SUFFIXES.sort(key=lambda s: -len(s[0]))
# Suffixes we recognise but cannot represent (reported by name rather than as "unknown").
_UNSUPPORTED = {
    ".lora_mid.weight": "LoCon Tucker middle weights", ".set_weight": "full weight replacement",
    ".reshape_weight": "reshaped weights", ".oft_diag": "old-style LyCORIS OFT", ".oft_R.weight": "PEFT OFT",
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".lora_embedding_A": "embedding LoRA", ".lora_embedding_B": "embedding LoRA",
}


# ----------------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> tuple[str, Path]:
    """``(format, weights file)`` with format ``peft`` | ``lycoris`` | ``comfyui`` | ``diffusers`` for a folder or a
    file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        found = []
        if (path / PEFT_WEIGHTS).is_file() or (path / PEFT_CONFIG).is_file():
            found.append(("peft", path / PEFT_WEIGHTS))
        found += [("lycoris", path / n) for n in LYCORIS_FILES if (path / n).is_file()]
        if not found and (path / "final").is_dir() and (path / "training_config.json").is_file():
            return detect_format(path / "final")  # a training run's output folder: its final adapter
        if not found:
            loose = sorted(path.glob("*.safetensors"))
            if len(loose) == 1:
                return detect_format(loose[0])
            if (path / "adapter_model.bin").is_file():
                raise AdapterFormatError(f"{path}: adapter_model.bin is a pickle and is not loaded, for safety; "
                                         "save the adapter as safetensors")
            raise AdapterFormatError(
                f"{path}: no adapter found (expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, one of "
                f"{', '.join(LYCORIS_FILES)}, or a single .safetensors file)")
        if len(found) > 1:
            raise AdapterFormatError(f"{path}: holds several adapters ({', '.join(p.name for _, p in found)}); "
                                     "name the file")
        fmt, weights = found[0]
        if fmt == "peft" and not weights.is_file():
            raise AdapterFormatError(f"{path}: {PEFT_CONFIG} without {PEFT_WEIGHTS}")
        return fmt, weights
    if path.suffix != ".safetensors":
        raise AdapterFormatError(f"{path}: not a .safetensors adapter file (pickled .pt/.bin/.ckpt files are not "
                                 "loaded, for safety)")
    if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        return "peft", path
    meta, keys = _peek(path)
    if meta.get("sidestep_export") == "comfyui":
        return "comfyui", path
    if meta.get("sidestep_export") == "diffusers" or (
            keys and all(k.startswith("transformer.") for k in keys) and any(".lora_A." in k for k in keys)):
        return "diffusers", path
    if meta.get("format") == "lycoris" or path.name in LYCORIS_FILES:
        return "lycoris", path
    if keys and all(k.startswith("lycoris_") for k in keys):
        return "lycoris", path
    return "comfyui", path


def _peek(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as exc:
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


def _load(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterFormatError(f"{path}: cannot read adapter tensors ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


def read_adapter_weights(path: str | Path) -> AdapterWeights:
    """Read any supported adapter (folder or file) into the common form. Raises ``AdapterFormatError`` for files that
    are not adapters we understand and ``AdapterShapeError`` for adapters whose targets ACE-Step 1.5 does not have."""
    fmt, weights_path = detect_format(path)
    if fmt == "diffusers":
        from .diffusers_format import read_diffusers

        return read_diffusers(weights_path)
    meta, tensors = _load(weights_path)
    config = None
    if fmt == "peft":
        config = _read_peft_config(weights_path.parent / PEFT_CONFIG)
    aw = parse_state_dict(tensors, fmt, source=str(weights_path), metadata=meta, peft_config=config)
    return aw


def _read_peft_config(path: Path) -> dict[str, Any]:
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: missing or unreadable PEFT adapter config ({exc})") from exc
    if not isinstance(conf, dict):
        raise AdapterFormatError(f"{path}: PEFT adapter config is not a JSON object")
    kind = str(conf.get("peft_type", "LORA")).upper()
    if kind not in ("LORA", "LOHA"):
        raise AdapterFormatError(f"{path}: PEFT {kind} adapters are not supported (PEFT LoRA, DoRA and LoHa are; "
                                 "LoKr, LoHa and OFT are read from LyCORIS files)")
    return conf


def _split_key(key: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(module key, canonical 'group:name', unsupported-reason) for one tensor key."""
    for suffix, canon in _TENSOR_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], canon, None
    for suffix, why in _UNSUPPORTED.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], None, why
    return None, None, None


def _root_name(module_key: str) -> tuple[Optional[str], str]:
    """(model-root name or None, naming family) for the module part of a key."""
    if module_key.startswith("diffusion_model."):
        return module_key[len("diffusion_model."):], "comfyui"
    if module_key.startswith("base_model.model."):
        rest = module_key[len("base_model.model."):].replace(".default", "")
        if rest.split(".", 1)[0] in ("decoder", "encoder", "tokenizer", "detokenizer"):
            return rest, "peft"
        return "decoder." + rest, "peft"
    if module_key.startswith("lycoris_"):
        return nm.from_underscores(module_key[len("lycoris_"):], "decoder."), "lycoris"
    if module_key.startswith("lora_unet_"):
        return nm.from_underscores(module_key[len("lora_unet_"):], ""), "kohya"
    return None, "unknown"


def parse_state_dict(
    tensors: dict[str, torch.Tensor],
    fmt: str,
    *,
    source: str = "",
    metadata: Optional[dict[str, str]] = None,
    peft_config: Optional[dict[str, Any]] = None,
) -> AdapterWeights:
    """Turn a flat adapter state dict into :class:`AdapterWeights`. ``fmt`` (peft | lycoris | comfyui) decides how
    alpha, DoRA magnitudes and OFT constraints are read (see the module docstring)."""
    where = source or "adapter"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown_suffix: list[str] = []
    unsupported: list[str] = []
    unknown_module: list[str] = []
    for key, t in tensors.items():
        module_key, canon, why = _split_key(key)
        if why:
            unsupported.append(f"{key} ({why})")
            continue
        if canon is None:
            unknown_suffix.append(key)
            continue
        root, _family = _root_name(module_key)
        if root is None or not nm.is_target(root):
            unknown_module.append(key)
            continue
        groups.setdefault(root, {})[canon] = t
    if unsupported:
        raise AdapterFormatError(f"{where}: holds adapter parts this package cannot apply: "
                                 + ", ".join(unsupported[:5]) + (" …" if len(unsupported) > 5 else ""))
    if unknown_suffix and not groups:
        raise AdapterFormatError(f"{where}: not an adapter file (no known adapter tensors; first keys: "
                                 + ", ".join(sorted(tensors)[:5]) + ")")
    if unknown_module or unknown_suffix:
        bad = unknown_module + unknown_suffix
        raise AdapterShapeError(
            f"{where}: made for another model — {len(bad)} of {len(tensors)} keys name nothing in ACE-Step 1.5, "
            f"first: {', '.join(bad[:5])}")
    if not groups:
        raise AdapterFormatError(f"{where}: holds no adapter tensors")

    aw = AdapterWeights({}, dict(metadata or {}), source, fmt)
    for root in sorted(groups, key=_natural):
        mw = _build_module(groups[root], root, fmt, peft_config, aw, where)
        inside, name = nm.split_root(root)
        (aw.modules if inside else aw.outside)[name] = mw
    return aw


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _build_module(parts: dict[str, torch.Tensor], root: str, fmt: str, peft_config: Optional[dict],
                  aw: AdapterWeights, where: str) -> ModuleWeights:
    here = f"{where}: {root}"
    kinds = {c.split(":", 1)[0] for c in parts} - {"meta", "bias"}
    if len(kinds) > 1:
        raise AdapterFormatError(f"{here}: mixes adapter types ({', '.join(sorted(kinds))})")
    tensors = {c.split(":", 1)[1]: t for c, t in parts.items() if not c.startswith(("meta:", "bias:"))}
    alpha_t = parts.get("meta:alpha")
    if alpha_t is not None and alpha_t.numel() != 1:
        raise AdapterFormatError(f"{here}: alpha holds {alpha_t.numel()} values, not one")
    alpha = float(alpha_t.float().item()) if alpha_t is not None else None
    if alpha is not None and not math.isfinite(alpha):
        raise AdapterFormatError(f"{here}: alpha is {alpha}")
    dora = parts.get("meta:dora")
    bias = parts.get("bias:bias")
    kind = kinds.pop() if kinds else "bias"
    if kind == "bias":
        if bias is None:
            raise AdapterFormatError(f"{here}: only {', '.join(parts)} — no adapter weights")
        return ModuleWeights("bias", {}, bias_diff=bias)

    mw = ModuleWeights(kind, tensors, alpha=alpha, bias_diff=bias)
    mw.check_tensors(here)
    t = mw.tensors
    if kind == "lora":
        rank = int(t["down"].shape[0])
        if fmt == "peft":
            mw.scale, mw.alpha = _peft_scale(peft_config or {}, root, rank)
        elif alpha is not None:
            mw.scale = alpha / rank
        else:
            mw.scale = 1.0
            _note(aw, "some LoRA modules carry no alpha: scale 1.0 assumed, as ComfyUI does")
    elif kind == "lokr":
        decomposed = [s for s in ("w2", "w1") if s not in t]
        if decomposed and alpha is not None:
            mw.scale = alpha / int(t[f"{decomposed[0]}_b"].shape[0])
        else:
            mw.scale = 1.0  # LyCORIS and ComfyUI ignore alpha when both Kronecker factors are full matrices
    elif kind == "loha":
        rank = int(t["w1_b"].shape[0])
        if fmt == "peft":
            mw.scale, mw.alpha = _peft_scale(peft_config or {}, root, rank)
        else:
            mw.scale = alpha / rank if alpha is not None else 1.0
    elif kind == "oft":
        out = int(t["blocks"].shape[0] * t["blocks"].shape[1])
        c = alpha or 0.0
        mw.constraint = c * out if (fmt == "lycoris" and c > 0) else c
        if fmt == "lycoris" and c > 0:
            _note(aw, "OFT constraint read as LyCORIS stores it (alpha × output width)")
    if dora is not None:
        if kind == "oft" or kind == "diff":
            raise AdapterFormatError(f"{here}: DoRA magnitude on a {kind} module is not supported")
        mw.dora, mw.dora_mode = dora, _dora_mode(dora, mw, fmt, aw, here)
    return mw


def _dora_mode(d: torch.Tensor, mw: ModuleWeights, fmt: str, aw: AdapterWeights, here: str) -> str:
    out, inp = mw.weight_shape()[:2]
    if d.dim() == 1:
        if d.numel() != out:
            raise AdapterShapeError(f"{here}: DoRA magnitude has {d.numel()} values for {out} output rows")
        if fmt == "comfyui":
            _note(aw, "1-D dora_scale (PEFT magnitude renamed, as Side-Step's exporter writes): read with PEFT's "
                      "maths; ComfyUI itself cannot apply it — re-export with `sidestep export`")
        return "row_merged"
    if d.shape[0] == out and d.numel() == out:
        return "row_merged" if fmt in ("peft", "lycoris") else "row_base"
    if d.numel() == inp and d.shape[0] == 1:
        return "col_merged"
    raise AdapterShapeError(f"{here}: DoRA scale of shape {tuple(d.shape)} fits neither [{out}, 1] nor [1, {inp}]")


def _peft_pattern(patterns: dict, name: str) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _peft_scale(conf: dict, root: str, rank: int) -> tuple[float, float]:
    """(scale, alpha) of one PEFT LoRA or LoHa module, following PEFT's own pattern rules."""
    name = root[len("decoder."):] if root.startswith("decoder.") else root
    alpha = _peft_pattern(conf.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = _peft_pattern(conf.get("alpha_pattern") or {}, root)
    if alpha is None:
        alpha = conf.get("lora_alpha", conf.get("alpha", conf.get("r", rank)))
    alpha = float(alpha)
    denom = math.sqrt(rank) if conf.get("use_rslora") else rank
    return alpha / denom, alpha


def _note(aw: AdapterWeights, text: str) -> None:
    if text not in aw.notes:
        aw.notes.append(text)


def default_output_path(adapter_path: str | Path, suffix: str) -> Path:
    """Where an export of ``adapter_path`` goes by default: beside it, named after it plus ``suffix``
    (``_comfyui.safetensors``, ``_peft``, ``_diffusers.safetensors``). ``run/final`` -> ``run/final<suffix>``;
    ``x.safetensors`` -> ``x<suffix>``; a trainer weights file names its folder; ``run/final/ema`` ->
    ``run/final_ema<suffix>``, beside the folder it belongs to, not inside it."""
    p = Path(adapter_path).expanduser()
    if p.is_file():
        if p.name == PEFT_WEIGHTS or p.name.endswith("_weights.safetensors"):
            p = p.parent
        else:
            return p.with_name(p.stem + suffix)
    p = p.resolve()
    if p.name == "ema":
        return p.parent.parent / f"{p.parent.name}_ema{suffix}"
    return p.parent / f"{p.name}{suffix}"
