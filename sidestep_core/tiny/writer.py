"""Write a tiny ACE-Step 1.5 checkpoint in one of the real on-disk layouts.

* ``original``: ``acestep-v15-turbo/{config.json, model.safetensors, silence_latent.pt}``, ``vae/`` (diffusers),
  ``Qwen3-Embedding-0.6B/`` (transformers + tokenizer.json) — the folder tree upstream downloads. XL profiles write
  ``acestep-v15-xl-turbo/`` sharded (``model-0000N-of-00002.safetensors`` + ``model.safetensors.index.json``), as
  the released XL models are.
* ``comfyui-split``: ``models/diffusion_models/acestep_v1.5_turbo.safetensors``,
  ``models/text_encoders/qwen_0.6b_ace15.safetensors``, ``models/vae/ace_1.5_vae.safetensors``.
* ``comfyui-aio``: ``models/checkpoints/ace_step_1.5_turbo_aio.safetensors`` holding ``model.diffusion_model.*``,
  ``text_encoders.qwen3_06b.transformer.model.*`` and ``vae.*``.

ComfyUI files carry no tokenizer; the tiny tokenizer is written beside them under ``tokenizer/`` so headless tools
can find one (inside ComfyUI, ComfyUI's own tokenizer is used). Every layout is built from the same seeded tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..model.model import AceStepModel
from .components import (
    build_vae,
    text_encoder_state,
    write_text_encoder_folder,
    write_tokenizer_folder,
    write_vae_folder,
)
from ..planner.tiny import ORIGINAL_FOLDER as PLANNER_FOLDER
from ..planner.tiny import TOKENIZER_FOLDER as PLANNER_TOKENIZER_FOLDER
from ..planner.tiny import make_tiny_planner, planner_state, planner_state_to_comfy, write_planner_tokenizer
from . import LAYOUTS
from .profiles import Profile, get_profile
from .weights import bf16_exact, seeded_state_dict

DIT_FOLDER = "acestep-v15-turbo"
XL_DIT_FOLDER = "acestep-v15-xl-turbo"
TEXT_FOLDER = "Qwen3-Embedding-0.6B"
COMFY_DIT = "acestep_v1.5_turbo.safetensors"
COMFY_XL_DIT = "acestep_v1.5_xl_turbo.safetensors"
COMFY_TE = "qwen_0.6b_ace15.safetensors"
COMFY_VAE = "ace_1.5_vae.safetensors"
COMFY_AIO = "ace_step_1.5_turbo_aio.safetensors"
COMFY_XL_AIO = "ace_step_1.5_xl_turbo_aio.safetensors"


@dataclass
class TinyCheckpoint:
    """Where the parts of a written tiny checkpoint are."""

    root: Path
    layout: str
    dit: Path  # folder (original) or file (ComfyUI layouts)
    vae: Path
    text_encoder: Path
    tokenizer_dir: Path  # a folder holding tokenizer.json
    planner: Optional[Path] = None  # the 5 Hz LM (folder, file, or the all-in-one file), when written


def dit_state(profile: Profile, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = AceStepModel(profile.dit)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return bf16_exact(seeded_state_dict(seed, shapes, transposed=("proj_out.1.weight",)))


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """Shards plus the ``model.safetensors.index.json`` weight map, as transformers' ``save_pretrained`` writes."""
    keys = sorted(state)
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * size:(i + 1) * size]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _lm_shape(profile: str) -> str:
    return "comfyui-min" if profile == "comfyui-min" else "tiny"


def make_tiny_checkpoint(
    out: str | Path, layout: str = "original", profile: str = "tiny", seed: int = 0, lm: bool = False
) -> TinyCheckpoint:
    """``lm``: also write the tiny 5 Hz planner LM in the same layout (:mod:`sidestep_core.planner.tiny`); with the
    ``comfyui-min`` profile it has the 1.7B LM's sizes, as ComfyUI only loads those (3.4 GB)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    prof = get_profile(profile)
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    dit = dit_state(prof, seed)
    config = prof.dit.to_dict()
    text_dir = root / TEXT_FOLDER if layout == "original" else root / "tokenizer"

    xl = prof.dit.is_xl
    if layout == "original":
        dit_dir = root / (XL_DIT_FOLDER if xl else DIT_FOLDER)
        dit_dir.mkdir(exist_ok=True)
        (dit_dir / "config.json").write_text(json.dumps(config, indent=2))
        if xl:
            _save_sharded(_bf16(dit), dit_dir)
        else:
            save_file(_bf16(dit), str(dit_dir / "model.safetensors"), metadata={"format": "pt"})
        write_text_encoder_folder(text_dir, prof, seed)
        vae = build_vae(prof, seed)
        write_vae_folder(root / "vae", vae)
        from ..vae import silence_latent_from_vae

        silence = silence_latent_from_vae(vae)  # [1, T, 64]
        torch.save(silence.transpose(1, 2).contiguous().float(), dit_dir / "silence_latent.pt")
        planner = make_tiny_planner(root, "original", seed, _lm_shape(profile)) if lm else None
        return TinyCheckpoint(root, layout, dit_dir, root / "vae", text_dir, text_dir, planner)

    from ..text.encoder import qwen_state_dict_to_comfy
    from ..vae import vae_state_dict_to_comfy

    vocab = write_tokenizer_folder(text_dir, prof)  # ComfyUI files carry no tokenizer: it is written beside them
    te_state = text_encoder_state(prof, seed, vocab)
    vae = build_vae(prof, seed)
    vae_comfy = vae_state_dict_to_comfy({k: v.detach() for k, v in vae.state_dict().items()})
    meta = {"config": json.dumps(config)}
    models = root / "models"
    if layout == "comfyui-split":
        paths = {
            "dit": models / "diffusion_models" / (COMFY_XL_DIT if xl else COMFY_DIT),
            "te": models / "text_encoders" / COMFY_TE,
            "vae": models / "vae" / COMFY_VAE,
        }
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        save_file(_bf16(dit), str(paths["dit"]), metadata=meta)
        save_file(_bf16(qwen_state_dict_to_comfy(te_state)), str(paths["te"]))
        save_file(_bf16(vae_comfy), str(paths["vae"]))
        planner = make_tiny_planner(root, "comfyui-split", seed, _lm_shape(profile)) if lm else None
        return TinyCheckpoint(root, layout, paths["dit"], paths["vae"], paths["te"], text_dir, planner)

    aio = models / "checkpoints" / (COMFY_XL_AIO if xl else COMFY_AIO)
    aio.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.diffusion_model.{k}": v for k, v in dit.items()}
    tensors.update(qwen_state_dict_to_comfy(te_state, aio=True))
    tensors.update({f"vae.{k}": v for k, v in vae_comfy.items()})
    if lm:
        tensors.update(planner_state_to_comfy(planner_state(seed, _lm_shape(profile)), aio=True))
        write_planner_tokenizer(root / PLANNER_TOKENIZER_FOLDER)
    save_file(_bf16(tensors), str(aio), metadata=meta)
    return TinyCheckpoint(root, layout, aio, aio, aio, text_dir, aio if lm else None)


def describe(ckpt: TinyCheckpoint) -> str:
    return (
        f"layout {ckpt.layout} at {ckpt.root}\n  DiT: {ckpt.dit}\n  VAE: {ckpt.vae}\n"
        f"  text encoder: {ckpt.text_encoder}\n  tokenizer: {ckpt.tokenizer_dir}"
        + (f"\n  planner LM: {ckpt.planner}" if ckpt.planner else "")
    )


def default_demo_checkpoint(cache_dir: Optional[Path] = None) -> TinyCheckpoint:
    """The embedded default model of ``sidestep demo``, the planner LM included: written once, reused afterwards.
    A cache written before the demo trained the LM has none; the LM is added to it (same seed, same tensors)."""
    root = (cache_dir or Path.home() / ".cache" / "sidestep") / "tiny-original-seed0"
    dit_dir = root / DIT_FOLDER
    if (dit_dir / "model.safetensors").is_file() and (root / "vae" / "config.json").is_file():
        planner = root / PLANNER_FOLDER
        if not (planner / "model.safetensors").is_file():
            planner = make_tiny_planner(root, "original", 0, _lm_shape("tiny"))
        return TinyCheckpoint(root, "original", dit_dir, root / "vae", root / TEXT_FOLDER, root / TEXT_FOLDER,
                              planner)
    return make_tiny_checkpoint(root, "original", "tiny", 0, lm=True)
