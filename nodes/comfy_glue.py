"""ComfyUI glue shared by the Side-Step nodes: model folders, user paths, memory, events, presets, text output.

Everything here needs ComfyUI (``folder_paths``, ``comfy.model_management``, the prompt server); the ComfyUI-free
half of each node is in ``calls.py``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import ui

from sidestep_core.config import TrainConfig

from . import spec as S
from .values import AdapterRef, find_in, list_files, list_original_folders

log = logging.getLogger("sidestep.nodes")

ACESTEP_FOLDER = "acestep"  # original ACE-Step folders (config.json + model.safetensors, vae/, Qwen3-Embedding…)
DATASETS_FOLDER = "sidestep_datasets"  # the preprocessing cache
MODEL_SOURCES = ("diffusion_models", "checkpoints", ACESTEP_FOLDER)
TRAIN_EVENT = "sidestep.train"
PREVIEW_EVENT = "sidestep.preview"
COMPARE_EVENT = "sidestep.compare"


def register_folders() -> None:
    """``models/acestep`` and ``models/sidestep/datasets``; extra_model_paths.yaml can add more of either."""
    folder_paths.add_model_folder_path(ACESTEP_FOLDER, os.path.join(folder_paths.models_dir, "acestep"))
    folder_paths.add_model_folder_path(DATASETS_FOLDER,
                                       os.path.join(folder_paths.models_dir, "sidestep", "datasets"))


register_folders()


def paths(folder: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def model_choices() -> list[str]:
    out = [f"diffusion_models/{n}" for n in list_files(paths("diffusion_models"), {"acestep", "acestep_aio"})]
    out += [f"checkpoints/{n}" for n in list_files(paths("checkpoints"), {"acestep_aio", "acestep"})]
    out += [f"{ACESTEP_FOLDER}/{n}" for n in list_original_folders(paths(ACESTEP_FOLDER))]
    return out


def dynamic_options(name: str) -> list[str]:
    if name == S.DYNAMIC_MODELS:
        return model_choices()
    if name == S.DYNAMIC_TEXT_ENCODERS:
        return list_files(paths("text_encoders"), {"qwen_0.6b"})
    if name == S.DYNAMIC_PLANNER_LMS:
        return list_files(paths("text_encoders"), {"planner_lm"})
    if name == S.DYNAMIC_VAES:
        return list_files(paths("vae"), {"vae"})
    if name == S.DYNAMIC_LORAS:
        return folder_paths.get_filename_list("loras")
    if name == S.DYNAMIC_PRESETS:
        return preset_names()
    if name in (S.DYNAMIC_SAMPLERS, S.DYNAMIC_SCHEDULERS):
        import comfy.samplers

        k = comfy.samplers.KSampler
        return list(k.SAMPLERS if name == S.DYNAMIC_SAMPLERS else k.SCHEDULERS)
    raise KeyError(name)


def resolve_model_choice(choice: str) -> Path:
    source, _, rel = choice.partition("/")
    if source not in MODEL_SOURCES or not rel:
        raise ValueError(f"model: {choice!r} is not one of the listed ACE-Step models")
    found = find_in(paths(source), rel)
    if found is None:
        raise ValueError(f"model: {choice!r} was not found in any {source} folder")
    return found


def pick(folder: str, explicit: str, preferred: str, kind: str) -> Optional[Path]:
    if explicit and explicit != S.AUTO:
        path = folder_paths.get_full_path(folder, explicit)
        if path is None:
            raise ValueError(f"{folder}: {explicit!r} not found")
        return Path(path)
    path = folder_paths.get_full_path(folder, preferred)
    if path is not None:
        return Path(path)
    found = list_files(paths(folder), {kind})
    return Path(folder_paths.get_full_path(folder, found[0])) if found else None


def planner_path(choice: str, checkpoint: Path) -> Path:
    """The planner LM file Train Adapter's ``planner_lm`` names; ``auto``: the first LM in text_encoders, else the
    one the core finds beside the checkpoint (inside an all-in-one file, an acestep-5Hz-lm-* folder)."""
    if choice and choice != S.AUTO:
        path = folder_paths.get_full_path("text_encoders", choice)
        if path is None:
            raise ValueError(f"planner_lm: {choice!r} not found in ComfyUI's text_encoders folders")
        return Path(path)
    found = list_files(paths("text_encoders"), {"planner_lm"})
    if found:
        return Path(folder_paths.get_full_path("text_encoders", found[0]))
    from sidestep_core.planner import find_planner

    return find_planner(checkpoint)


def comfy_tokenizer_dir() -> Optional[Path]:
    """The Qwen tokenizer ComfyUI ships for its ACE-Step 1.5 text encoder (comfy/text_encoders/qwen25_tokenizer)."""
    import comfy.text_encoders

    for root in getattr(comfy.text_encoders, "__path__", []):
        cand = Path(root) / "qwen25_tokenizer"
        if (cand / "vocab.json").is_file():
            return cand
    return None


def input_path(value: str, what: str) -> Path:
    """A user path: absolute, ~, or relative to ComfyUI's input folder."""
    value = value.strip()
    if not value:
        raise ValueError(f"{what}: empty")
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


def free_comfy_models() -> None:
    """Ask ComfyUI to give back the models it holds before our own loads. That frees device memory; on a CPU-only
    ComfyUI their weights stay in host memory as long as ComfyUI caches the loaders' outputs (README, memory)."""
    mm.unload_all_models()
    release_memory()


def release_memory() -> None:
    """After a node's own loads: drop them, empty the device cache and hand freed host memory back to the system."""
    gc.collect()
    mm.soft_empty_cache()
    if _MALLOC_TRIM is not None:
        # glibc keeps the freed blocks of multi-GB loads in its heap: a CPU server stayed 2.5 GiB up after
        # Preprocess with nothing referencing them (bench/comfy_node_memory.py) until malloc_trim returned them.
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def device() -> str:
    return str(mm.get_torch_device())


def send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI imported without its server (tests, scripts)
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, server.client_id)


def progress_text(node_id: Optional[str], message: str) -> None:
    """A line of text on the node while it runs (ComfyUI's progress text, shown by the front end on the node)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(message, node_id, server.client_id)


@contextmanager
def training_mode():
    """ComfyUI runs every prompt under ``torch.inference_mode()``; training needs it off. The nodes hand the core
    paths, never tensors: everything the core trains on is loaded (so created) inside this block, and no
    inference tensor from the graph can reach autograd."""
    with torch.inference_mode(False):
        yield


def text(*parts: str) -> ui.PreviewText:
    return ui.PreviewText("\n".join(p for p in parts if p))


def runs_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "sidestep"


def preset_names() -> list[str]:
    from sidestep_core import presets

    return presets.list_presets()


def preset_config(name: str) -> Optional[TrainConfig]:
    from sidestep_core import presets

    return None if name in ("", S.NONE) else presets.load_preset(name)


def dora_base(aw, adapter: AdapterRef):
    """The decoder weights a PEFT-style (row-wise) DoRA must be converted against for ComfyUI: those of the model
    it was trained on (read from its checkpoint; only the decoder). None for every other adapter."""
    from sidestep_core.adapters.comfy_export import needs_base

    if not needs_base(aw):
        return None
    from sidestep_core.model import load_acestep

    return load_acestep(adapter.checkpoint, parts={"decoder"}).model.decoder
