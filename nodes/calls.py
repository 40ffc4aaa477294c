"""From node inputs to core arguments and back — the ComfyUI-free half of each node (tested without ComfyUI).

The node modules and ``comfy_glue.py`` add only what needs ComfyUI: folder lookups, progress, memory, the model
patcher.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from sidestep_core.config import TrainConfig
from sidestep_core.data.preprocess import PreprocessConfig

from . import runs, spec as S
from .values import AdapterRef, DatasetRef, EstimateRef, ModelBundle

EXPORT_KEY_STYLES = {"comfyui": "comfy", "peft": "peft", "lycoris": "lycoris"}


def bundle_from_info(path: Path, label: str, info, stated_variant: Optional[str], *,
                     text_encoder: Optional[Path] = None, vae: Optional[Path] = None,
                     tokenizer: Optional[Path] = None) -> ModelBundle:
    """``info`` is the ``ModelInfo`` of ``load_acestep(path, parts=set())`` (headers only)."""
    return ModelBundle(
        checkpoint=Path(path), label=label, variant=info.variant, stated_variant=stated_variant,
        is_turbo=info.is_turbo, shift=info.shift, steps=info.steps, guidance=info.guidance,
        identity=info.identity, layout=info.layout, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
    )


# ----- Preprocess Audio Folder -----


def dataset_json_path(audio_dir: Path, value: str) -> Optional[Path]:
    value = value.strip()
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else audio_dir / p


def dataset_cache_dir(root: Path, audio_dir: Path, json_path: Optional[Path], model: ModelBundle) -> Path:
    """One cache folder per (audio folder, dataset JSON, model): inside it the core reuses unchanged samples."""
    key = hashlib.sha256(f"{audio_dir.resolve()}|{json_path}|{model.identity}".encode()).hexdigest()[:10]
    return Path(root) / f"{runs.safe_name(audio_dir.name, 'dataset')}-{key}"


def preprocess_config(values: dict[str, Any], model: ModelBundle, device: str) -> PreprocessConfig:
    settings: dict[str, Any] = dict(
        prompt_style=values.get("prompt_style", S.PREPROCESS.input("prompt_style").default),
        max_duration=float(values.get("max_duration", S.PREPROCESS.input("max_duration").default)),
        normalize=values.get("normalize", S.PREPROCESS.input("normalize").default),
        device=device, variant=model.stated_variant,
        vae=str(model.vae) if model.vae else None,
        text_encoder=str(model.text_encoder) if model.text_encoder else None,
        tokenizer=str(model.tokenizer) if model.tokenizer else None,
        custom_tag=str(values.get("trigger_tag", "")).strip(),
    )
    cfg = PreprocessConfig(**settings)
    cfg.validate()
    return cfg


def dataset_ref(out: Path, result, trigger_tag: str) -> DatasetRef:
    """The node's output from a core ``PreprocessResult`` and the manifest it wrote."""
    from sidestep_core.data.cache import read_manifest

    manifest = read_manifest(out) or {}
    keys = sorted(str(s.get("key") or s.get("file")) for s in manifest.get("samples", []))
    identity = hashlib.sha256("|".join(keys).encode()).hexdigest()[:16]
    failures = tuple((f.path, f.reason) for f in result.failures)
    return DatasetRef(out, result.samples, result.encoded, result.reused, failures, identity,
                      trigger_tag=trigger_tag.strip(), report=tuple(result.warning_lines()))


# ----- Train Adapter -----


def train_config(values: dict[str, Any], model: ModelBundle, estimate: Optional[EstimateRef], *,
                 preset: Optional[TrainConfig], device: str, find_lm: Optional[Callable[[], Path]] = None
                 ) -> TrainConfig:
    """The one ``TrainConfig`` behind a Train Adapter node (run paths are added by the trainer call).
    ``find_lm()`` gives the planner LM's path, asked only when the settings train it."""
    cfg = S.train_config_from_inputs(values, preset)
    # No audio previews inside ComfyUI (a preset may ask for them): the graph generates with ComfyUI's own nodes.
    changes: dict[str, Any] = {"base_variant": model.stated_variant or "", "device": device, "preview_every": 0}
    if cfg.trains_lm and find_lm is not None:
        changes["lm"] = str(find_lm())
    if estimate is not None:
        changes["target_modules"] = list(estimate.targets)
        if cfg.adapter != "oft":
            changes["rank_pattern"] = dict(estimate.rank_pattern)
            changes["alpha_pattern"] = dict(estimate.alpha_pattern)
    return cfg.replace(**changes).validate()


# ----- Train Adapter: previews through the user's graph -----


@dataclass(frozen=True)
class PreviewPlan:
    """When and how Train Adapter renders its previews (the ComfyUI-free half; ``train_adapter.py`` samples)."""

    every: int
    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    folder: Path  # <run>/previews

    def due(self, step: int, last: bool) -> bool:
        return step > 0 and (last or (self.every > 0 and step % self.every == 0))

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step}.flac"

    def view_ref(self, step: int, output_dir: Path) -> dict:
        """The preview of ``step`` as ComfyUI's ``/view`` names it, for the web extension's player."""
        return view_ref(self.path(step), output_dir)


def view_ref(path: Path, output_dir: Path) -> dict:
    """A file in ComfyUI's output folder as ``/view`` names it (``type`` output), for the web extension."""
    rel = Path(path).parent.resolve().relative_to(Path(output_dir).resolve())
    return {"filename": Path(path).name, "subfolder": rel.as_posix(), "type": "output"}


def preview_plan(values: dict[str, Any], model: ModelBundle, run_dir: Path) -> Optional[PreviewPlan]:
    """None unless every preview socket is connected; raises when only some are (a half-wired preview graph)."""
    connected = [n for n in S.PREVIEW_SOCKETS if values.get(n) is not None]
    if not connected:
        return None
    if len(connected) != len(S.PREVIEW_SOCKETS):
        missing = [n for n in S.PREVIEW_SOCKETS if n not in connected]
        raise ValueError(f"Train Adapter: previews need all of {', '.join(S.PREVIEW_SOCKETS)}; not connected: "
                         f"{', '.join(missing)}")

    def get(name: str):
        v = values.get(name)
        return S.TRAIN.input(name).default if v is None else v

    steps = int(get("preview_steps")) or int(model.steps)
    cfg = float(get("preview_cfg")) or float(model.guidance)
    return PreviewPlan(every=int(get("preview_every")), seed=int(get("preview_seed")), steps=steps, cfg=cfg,
                       sampler=str(get("preview_sampler")), scheduler=str(get("preview_scheduler")),
                       folder=Path(run_dir) / "previews")


def latest_preview(folder: Path) -> Optional[tuple[int, Path]]:
    """(step, file) of the newest ``step_N.flac`` in a run's previews folder."""
    found = []
    for p in Path(folder).glob("step_*.flac"):
        tail = p.stem[len("step_"):]
        if tail.isdigit():
            found.append((int(tail), p))
    return max(found) if found else None


# ----- Estimate Gradients -----


def estimate_overrides(values: dict[str, Any], device: str) -> dict[str, Any]:
    """Keyword settings for ``sidestep_core.estimate.estimate``."""
    out: dict[str, Any] = {"device": device}
    for spec in S.ESTIMATE.inputs:
        if not spec.is_widget or spec.name not in values:
            continue
        if spec.name == "modules":
            out["groups"] = S.ESTIMATE_MODULES[values["modules"]]
        elif spec.name == "top_k":
            out["top_k"] = int(values["top_k"]) or None
        else:
            out[spec.name] = values[spec.name]
    return out


def estimate_ref(result) -> EstimateRef:
    """The node's output from a core ``EstimateResult``."""
    return EstimateRef(targets=tuple(result.targets), rank_pattern=result.rank_pattern,
                       alpha_pattern=result.alpha_pattern, scores=tuple(result.scores), text=result.text)


# ----- Export Adapter -----


def chosen_adapter(adapter: AdapterRef, checkpoint: str) -> Path:
    """The adapter folder of ``adapter``'s run that the node's ``checkpoint`` input names (``final``: its own)."""
    from sidestep_core.adapters.choice import resolve_checkpoint

    if (checkpoint or "final").strip() == "final":
        return Path(adapter.path)
    return resolve_checkpoint(adapter.run_dir, checkpoint)


def files_state(*paths: Optional[Path]) -> str:
    """Size and mtime of each file, ``-`` for a missing one. A node whose ``fingerprint_inputs`` returns this runs
    again when one of the files changed or was deleted, instead of ComfyUI answering from its cache (which only
    sees the widget values)."""
    out = []
    for path in paths:
        try:
            st = Path(path).stat() if path else None
        except OSError:
            st = None
        out.append(f"{path}:{st.st_size}:{st.st_mtime_ns}" if st else f"{path}:-")
    return "|".join(out)


def export_path(directory: Path, name: str, overwrite: bool) -> Path:
    stem = runs.safe_name(name.removesuffix(".safetensors"))
    path = Path(directory) / f"{stem}.safetensors"
    n = 1
    while not overwrite and path.exists():
        path = Path(directory) / f"{stem}_{n:03d}.safetensors"
        n += 1
    return path


# ----- Compare Adapters -----


def compare_rows(adapter: Optional[AdapterRef], run: Optional[Path], selection: str, files: list[Path]) -> list:
    """The grid's rows: ``selection`` in the connected adapter's run and in ``run``, then each adapter file."""
    from sidestep_core.inference.compare import adapter_row, select_checkpoints

    rows = []
    for folder in (adapter.run_dir if adapter is not None else None, run):
        if folder is not None:
            rows += select_checkpoints(folder, selection)
    return rows + [adapter_row(f) for f in files]


def lines(text: str) -> list[str]:
    """The non-empty lines of a multiline input."""
    return [x.strip() for x in (text or "").splitlines() if x.strip()]


# ----- Apply Adapter -----


def group_strengths(patches: dict, strength: float, groups: dict[str, float]) -> dict[float, dict]:
    """Split ComfyUI patches (keyed by model key or (key, offset…)) by module group: {strength: patches}."""
    out: dict[float, dict] = {}
    for key, patch in patches.items():
        name = key if isinstance(key, str) else key[0]
        factor = 1.0
        for group_input, marker in S.STRENGTH_GROUPS:
            if marker in name:
                factor = float(groups.get(group_input, 1.0))
                break
        out.setdefault(float(strength) * factor, {})[key] = patch
    return out


# ----- Compare Adapters / Train Adapter: the user's text encoding again, with each LM adapter -----

ACE_ENCODER = "TextEncodeAceStepAudio1.5"
ZERO_OUT = "ConditioningZeroOut"


@dataclass(frozen=True)
class EncoderSource:
    """How one CONDITIONING input of a node was made: ``TextEncodeAceStepAudio1.5`` (node ``node_id``) with
    ``values`` (every input but the CLIP), perhaps through ``ConditioningZeroOut``."""

    node_id: str
    values: dict
    zero_out: bool
    clip: Any = None  # the encoder's CLIP link in the prompt

    @property
    def writes_codes(self) -> bool:
        return bool(self.values.get("generate_audio_codes", True))


class NotEncodedAgain(ValueError):
    """A conditioning that cannot be made again from the prompt graph (the message says why)."""


def encoder_source(prompt: dict, node_id: str, socket: str) -> EncoderSource:
    """Trace ``socket`` of node ``node_id`` in the API prompt ComfyUI hands a node (``PROMPT``) back to the
    ``TextEncodeAceStepAudio1.5`` that made it — directly or through ``ConditioningZeroOut`` (the templates' negative).
    Reroutes are front-end only and never in the prompt; anything else between (combine, concat, set area …) or an
    encoder input fed by another node cannot be made again without running that part of the graph: refused, with
    the reason."""
    def link(nid: str, name: str):
        value = ((prompt.get(nid) or {}).get("inputs") or {}).get(name)
        if not (isinstance(value, list) and len(value) == 2):
            raise NotEncodedAgain(f"{socket}: not connected in the prompt graph")
        return str(value[0])

    src = link(str(node_id), socket)
    zero_out = False
    kind = (prompt.get(src) or {}).get("class_type")
    if kind == ZERO_OUT:
        zero_out, src = True, link(src, "conditioning")
        kind = (prompt.get(src) or {}).get("class_type")
    if kind != ACE_ENCODER:
        raise NotEncodedAgain(f"{socket} comes from {kind or 'an unknown node'} (node {src}), not straight from "
                              f"{ACE_ENCODER} (or through {ZERO_OUT})")
    inputs = dict(prompt[src].get("inputs") or {})
    clip = inputs.pop("clip", None)
    linked = sorted(k for k, v in inputs.items() if isinstance(v, list))
    if linked:
        raise NotEncodedAgain(f"{socket}: {ACE_ENCODER} (node {src}) takes {', '.join(linked)} from another node, "
                              "whose value the prompt does not hold")
    return EncoderSource(src, inputs, zero_out, clip)


def encoding_plan(prompt: Optional[dict], node_id: Optional[str], positive: str, negative: str,
                  clip_socket: str) -> tuple[Optional[tuple[EncoderSource, EncoderSource]], str]:
    """((positive source, negative source), a note or "") when both can be made again and the positive writes
    audio codes; otherwise (None, why not)."""
    if not prompt or node_id is None:
        return None, "ComfyUI gave no prompt graph"
    try:
        pos = encoder_source(prompt, node_id, positive)
        neg = encoder_source(prompt, node_id, negative)
    except NotEncodedAgain as exc:
        return None, str(exc)
    if not pos.writes_codes:
        return None, f"generate_audio_codes is off in {ACE_ENCODER} (node {pos.node_id}): no codes to write again"
    own = ((prompt.get(str(node_id)) or {}).get("inputs") or {}).get(clip_socket)
    note = ""
    if own is not None and pos.clip is not None and own != pos.clip:
        note = (f"note: the CLIP connected here is not the one {ACE_ENCODER} (node {pos.node_id}) uses; the codes "
                "are written again with the one connected here")
    return (pos, neg), note
