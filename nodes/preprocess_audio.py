"""Preprocess Audio Folder: the core's preprocessing into the content-addressed dataset cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import (
    DATASETS_FOLDER,
    device,
    free_comfy_models,
    input_path,
    log,
    paths,
    pick,
    release_memory,
    text,
)
from .schema import build_schema
from .values import ModelBundle


def _folder_signature(folder: Path, extra: Optional[Path]) -> str:
    h = hashlib.sha256()
    for p in ([extra] if extra else []):
        try:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{p}:missing".encode())
    if folder.is_dir():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for fn in sorted(filenames):
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except OSError:
                    continue
                h.update(f"{os.path.relpath(os.path.join(dirpath, fn), folder)}:{st.st_size}:{st.st_mtime_ns}"
                         .encode())
    return h.hexdigest()


def _stage_progress(node_id: Optional[str]):
    """A progress callback for the preprocessing stages; ComfyUI's progress hook raises on Cancel."""
    bars: dict[str, comfy.utils.ProgressBar] = {}

    def on_event(ev: dict) -> None:
        mm.throw_exception_if_processing_interrupted()
        stage, total = ev.get("stage"), ev.get("total")
        if stage in ("pass1", "pass2") and total:
            bar = bars.get(stage) or bars.setdefault(stage, comfy.utils.ProgressBar(total, node_id=node_id))
            bar.update_absolute(ev.get("done", 0), total)
        if ev.get("message"):
            log.info("preprocess %s: %s", ev.get("current", ""), ev["message"])

    return on_event


class PreprocessAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.PREPROCESS, hidden=(io.Hidden.unique_id,))

    @classmethod
    def fingerprint_inputs(cls, folder="", dataset_json="", **_):
        """Changes when a file in the folder (or the JSON) changes, so edits are picked up on re-queue."""
        try:
            root = input_path(folder, "folder")
        except ValueError:
            return ""
        return _folder_signature(root, calls.dataset_json_path(root, dataset_json))

    @classmethod
    def execute(cls, model: ModelBundle, folder, dataset_json="", prompt_style=S.COMFYUI, max_duration=600.0,
                normalize="none", trigger_tag="", auto_label=False, planner_lm=S.AUTO) -> io.NodeOutput:
        from sidestep_core.data.preprocess import preprocess

        audio_dir = input_path(folder, "folder")
        if not audio_dir.is_dir():
            raise ValueError(f"{audio_dir}: folder not found (a relative path is taken inside ComfyUI's input "
                             f"folder, {folder_paths.get_input_directory()})")
        json_path = calls.dataset_json_path(audio_dir, dataset_json)
        out = calls.dataset_cache_dir(Path(paths(DATASETS_FOLDER)[0]), audio_dir, json_path, model)
        cfg = calls.preprocess_config(
            dict(prompt_style=prompt_style, max_duration=max_duration, normalize=normalize, trigger_tag=trigger_tag),
            model, device())
        free_comfy_models()
        if auto_label:
            _label(model, audio_dir, json_path, out, planner_lm)
        try:
            result = preprocess(model.checkpoint, audio_dir, out, dataset_json=json_path, config=cfg,
                                progress=_stage_progress(cls.hidden.unique_id))
        finally:
            release_memory()
        if result.samples == 0:
            lines = "\n".join(f"  {f.path}: {f.reason}" for f in result.failures) or "  (no audio files found)"
            raise ValueError(f"{audio_dir}: no usable samples\n{lines}")
        ref = calls.dataset_ref(out, result, trigger_tag)
        return io.NodeOutput(ref, ui=text(ref.summary()))


def _label(model: ModelBundle, audio_dir: Path, json_path: Optional[Path], out: Path, planner_lm: str) -> None:
    """Auto-labels the songs that lack metadata (the codes are cached in the dataset folder)."""
    from sidestep_core.planner.codes import CODES_DIR
    from sidestep_core.planner.label import label_folder

    lm = pick("text_encoders", planner_lm, "qwen_1.7b_ace15.safetensors", "planner_lm")
    try:
        results = label_folder(model.checkpoint, audio_dir, lm=lm, dataset_json=json_path, vae=model.vae,
                               device=device(), cache_dir=out / CODES_DIR,
                               progress=lambda done, total, rel: mm.throw_exception_if_processing_interrupted())
    finally:
        release_memory()
    for r in results:
        if r.status in ("labelled", "failed"):
            detail = ", ".join(f"{k}={v}" for k, v in r.fields.items()) or r.reason
            log.info("auto-label %s %s: %s", r.status, r.rel, detail)
