"""The planner LM's LoRA: injection (PEFT, fp32 trainable tensors), its PEFT folder, and its ComfyUI form.

On disk an LM adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.model.layers.{i}.{self_attn|mlp}.<proj>.lora_{A,B}.weight``) — what
``PeftModel.from_pretrained(<transformers Qwen3 LM>, folder)`` loads upstream — with ``sidestep_lm_*`` metadata naming
the LM's shape, so that applying it to an LM of another size fails with a clear message.

ComfyUI applies LoRAs to a text encoder through ``comfy.lora.model_lora_keys_clip``: the generic key of a CLIP
weight ``<k>.weight`` is ``text_encoders.<k>``. ACE-Step 1.5's text encoder holds the LM as ``qwen3_2b`` (the 1.7B
LM) or ``qwen3_4b`` (the 4B LM) beside the 0.6B embedding model, each wrapping a llama-style ``transformer.model``
with the original layer names, so an LM target ``model.layers.3.self_attn.q_proj`` becomes
``text_encoders.qwen3_2b.transformer.model.layers.3.self_attn.q_proj.{lora_up,lora_down}.weight`` plus ``.alpha``
(without ``.alpha`` ComfyUI would apply scale 1, not alpha / rank). ComfyUI has no slot for the 0.6B LM (its width
is the embedding model's, which takes that file instead).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LM_FOLDER = "lm"  # the LM adapter's sub-folder in a run's checkpoints and final/
# ComfyUI's text-encoder attribute for each LM width (comfy/text_encoders/ace15.py, llama.py).
COMFY_SLOTS = {2048: "qwen3_2b", 2560: "qwen3_4b"}


class LMAdapterMismatchError(ValueError):
    """An LM adapter that does not fit the LM it is applied to (message starts with the adapter's path)."""


def lm_shape(config: Any) -> dict[str, int]:
    """What an LM adapter must match: the LM's width, depth and attention sizes (from a transformers config)."""
    return {"hidden_size": int(config.hidden_size), "num_hidden_layers": int(config.num_hidden_layers),
            "num_attention_heads": int(config.num_attention_heads),
            "num_key_value_heads": int(config.num_key_value_heads),
            "intermediate_size": int(config.intermediate_size)}


def describe_shape(shape: Mapping[str, int]) -> str:
    return f"width {shape['hidden_size']}, {shape['num_hidden_layers']} layers"


def lm_targets(model: nn.Module, mlp: bool) -> list[str]:
    """Names (relative to the causal LM) of the projections the LoRA adapts, in module order."""
    wanted = ATTN_PROJ + (MLP_PROJ if mlp else ())
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}" and n.rsplit(".", 1)[-1] in wanted]


@dataclass
class LMAdapter:
    """A PEFT LoRA on the planner LM (``peft_model`` wraps the transformers causal LM in place)."""

    peft_model: Any
    targets: list[str]
    options: dict[str, Any]
    shape: dict[str, int]

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.peft_model)
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}

    def peft_config_dict(self) -> dict[str, Any]:
        conf = self.peft_model.peft_config["default"].to_dict()
        out = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in conf.items()}
        out["base_model_name_or_path"] = ""
        out["inference_mode"] = True
        return out

    def metadata(self) -> dict[str, str]:
        return {"sidestep_lm_adapter": "lora", "sidestep_lm_shape": json.dumps(self.shape),
                "sidestep_lm_options": json.dumps(self.options)}

    def comfyui_state_dict(self) -> dict[str, torch.Tensor]:
        """The live adapter in ComfyUI's text-encoder key format, as detached CPU copies (previews in ComfyUI)."""
        live = LMAdapterFile(Path("<the LM adapter being trained>"), self.state_dict(), self.peft_config_dict(),
                             self.metadata())
        return to_comfyui_lm_state_dict(live)

    def save(self, folder: str | Path, metadata: Mapping[str, str]) -> Path:
        """Write the PEFT folder (atomic per file); returns the folder."""
        from ..fsutil import atomic_save_file, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**{k: str(v) for k, v in metadata.items()}, **self.metadata(), "format": "pt"}
        atomic_save_file(self.state_dict(), folder / PEFT_WEIGHTS, meta)
        atomic_write_json(folder / PEFT_CONFIG, self.peft_config_dict())
        return folder

    def load(self, folder: str | Path) -> None:
        """Load a saved LM adapter strictly (same keys and shapes); the trainable copies stay fp32."""
        from peft import set_peft_model_state_dict

        saved = read_lm_adapter(folder)
        check_fits(saved, self.shape)
        own = self.state_dict()
        if set(own) != set(saved.tensors) or any(own[k].shape != saved.tensors[k].shape for k in own):
            raise LMAdapterMismatchError(
                f"{saved.path}: this LM adapter has other modules or ranks than the one being trained "
                f"({len(saved.tensors)} vs {len(own)} tensors); resume with the same LM settings")
        device = self.parameters()[0].device
        with torch.no_grad():
            set_peft_model_state_dict(self.peft_model, {k: v.to(device) for k, v in saved.tensors.items()})
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()


def inject_lm_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, mlp: bool) -> LMAdapter:
    """Add a fresh LoRA to a transformers causal LM (in place; the base is frozen). Initialisation draws from the
    global torch RNG: seed it first. Trainable tensors are fp32 on the LM's device."""
    from peft import LoraConfig, get_peft_model

    targets = lm_targets(model, mlp)
    if not targets:
        raise ValueError("lm: the planner LM has no q/k/v/o projections to adapt (is it a Qwen3 causal LM?)")
    model.requires_grad_(False)
    conf = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT reads transformers' `is_gradient_checkpointing`, deprecated in transformers 5: not the user's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, conf)
    device = next(model.parameters()).device
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(device=device, dtype=torch.float32)
    options = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_mlp": mlp}
    return LMAdapter(peft_model, targets, options, lm_shape(model.config))


# ----------------------------------------------------------------------------------------------------------
# reading and exporting
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LMAdapterFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    metadata: dict[str, str]

    @property
    def shape(self) -> Optional[dict[str, int]]:
        text = self.metadata.get("sidestep_lm_shape")
        return json.loads(text) if text else None


def read_lm_adapter(folder: str | Path) -> LMAdapterFile:
    from safetensors import safe_open

    folder = Path(folder)
    weights, conf_path = folder / PEFT_WEIGHTS, folder / PEFT_CONFIG
    if not weights.is_file() or not conf_path.is_file():
        raise ValueError(f"{folder}: no LM adapter here ({PEFT_WEIGHTS} and {PEFT_CONFIG} expected)")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated file, bad JSON
        raise ValueError(f"{folder}: cannot read the LM adapter ({exc})") from exc
    if meta.get("sidestep_lm_adapter") != "lora":
        raise ValueError(f"{folder}: not a planner-LM adapter written by Side-Step (no sidestep_lm_adapter metadata)")
    return LMAdapterFile(weights, tensors, conf, meta)


def has_dit_adapter(folder: Path) -> bool:
    """Whether a run's adapter folder holds a DiT adapter too (a run may train the planner LM only)."""
    from ..training.adapters import iter_adapter_paths

    return any(p.suffix == ".safetensors" for p in iter_adapter_paths(Path(folder)))


def check_fits(adapter: LMAdapterFile, shape: Mapping[str, int], keys: Optional[tuple[str, ...]] = None) -> None:
    """Refuse an adapter trained on an LM of another size (compared on ``keys``, default all), naming both."""
    own = adapter.shape
    if own is not None and any(own.get(k) != shape[k] for k in (keys or tuple(shape))):
        raise LMAdapterMismatchError(
            f"{adapter.path}: this LM adapter was trained on a planner LM of {describe_shape(own)}, but the LM given "
            f"has {describe_shape(shape)}; use the LM it was trained on (e.g. the 1.7B LM for a 1.7B adapter)")


def comfy_slot(shape: Mapping[str, int], source: str) -> str:
    slot = COMFY_SLOTS.get(int(shape["hidden_size"]))
    if slot is None:
        raise ValueError(
            f"{source}: ComfyUI runs only the 1.7B (width 2048) and 4B (width 2560) planner LMs; this adapter is for "
            f"an LM of {describe_shape(shape)}")
    return slot


def to_comfyui_lm_state_dict(adapter: LMAdapterFile, dtype: Optional[torch.dtype] = None
                             ) -> dict[str, torch.Tensor]:
    """The LM adapter in the generic key format ComfyUI's LoraLoader applies to the text encoder's LM."""
    shape = adapter.shape
    if shape is None:
        raise ValueError(f"{adapter.path}: the LM's size is not recorded; cannot tell ComfyUI's LM slot")
    slot = comfy_slot(shape, str(adapter.path))
    alpha = float(adapter.config["lora_alpha"])  # ComfyUI applies alpha / rank, rank from lora_down
    ranks, alphas = adapter.config.get("rank_pattern") or {}, adapter.config.get("alpha_pattern") or {}
    if ranks or alphas:
        raise ValueError(f"{adapter.path}: per-module ranks or alphas are not supported for LM adapters")
    out: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{adapter.path}: unexpected tensor {key} in an LM LoRA")
        name, part = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        base = f"text_encoders.{slot}.transformer.{name}"
        out[f"{base}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = t.to(dtype or t.dtype).contiguous()
        out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def export_lm_comfyui(folder: str | Path, out: str | Path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the LM adapter of ``folder`` as one ComfyUI ``.safetensors`` (atomic)."""
    from ..fsutil import atomic_save_file

    adapter = read_lm_adapter(folder)
    sd = to_comfyui_lm_state_dict(adapter, dtype)
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith("sidestep_")}
    out = Path(out)
    atomic_save_file(sd, out, meta)
    return out
