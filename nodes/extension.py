"""The six Side-Step nodes as ComfyUI V3 nodes, and ``comfy_entrypoint``.

Each ``execute`` converts ComfyUI values into one ``sidestep_core`` call and back; the schemas come from
``spec.py``. Everything that trains runs inside ``torch.inference_mode(False)`` (ComfyUI runs prompts under
inference mode) and reports through ComfyUI's progress bar and a ``sidestep.train`` event for the loss chart.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

from sidestep_core import __version__
from sidestep_core.config import TrainConfig

from . import calls, runs, spec as S
from .chart import read_loss_csv, render_loss_curve
from .values import AdapterRef, DatasetRef, EstimateRef, ModelBundle, classify, find_in, list_files, list_original_folders

log = logging.getLogger("sidestep.nodes")

# ----------------------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------------------

ACESTEP_FOLDER = "acestep"  # original ACE-Step folders (config.json + model.safetensors, vae/, Qwen3-Embedding…)
DATASETS_FOLDER = "sidestep_datasets"  # the preprocessing cache
MODEL_SOURCES = ("diffusion_models", "checkpoints", ACESTEP_FOLDER)
TRAIN_EVENT = "sidestep.train"
PREVIEW_EVENT = "sidestep.preview"


def register_folders() -> None:
    """``models/acestep`` and ``models/sidestep/datasets``; extra_model_paths.yaml can add more of either."""
    folder_paths.add_model_folder_path(ACESTEP_FOLDER, os.path.join(folder_paths.models_dir, "acestep"))
    folder_paths.add_model_folder_path(DATASETS_FOLDER,
                                       os.path.join(folder_paths.models_dir, "sidestep", "datasets"))


register_folders()


def _paths(folder: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def model_choices() -> list[str]:
    out = [f"diffusion_models/{n}" for n in list_files(_paths("diffusion_models"), {"acestep", "acestep_aio"})]
    out += [f"checkpoints/{n}" for n in list_files(_paths("checkpoints"), {"acestep_aio", "acestep"})]
    out += [f"{ACESTEP_FOLDER}/{n}" for n in list_original_folders(_paths(ACESTEP_FOLDER))]
    return out


def dynamic_options(name: str) -> list[str]:
    if name == S.DYNAMIC_MODELS:
        return model_choices()
    if name == S.DYNAMIC_TEXT_ENCODERS:
        return list_files(_paths("text_encoders"), {"qwen_0.6b"})
    if name == S.DYNAMIC_VAES:
        return list_files(_paths("vae"), {"vae"})
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
    found = find_in(_paths(source), rel)
    if found is None:
        raise ValueError(f"model: {choice!r} was not found in any {source} folder")
    return found


def _pick(folder: str, explicit: str, preferred: str, kind: str) -> Optional[Path]:
    if explicit and explicit != S.AUTO:
        path = folder_paths.get_full_path(folder, explicit)
        if path is None:
            raise ValueError(f"{folder}: {explicit!r} not found")
        return Path(path)
    path = folder_paths.get_full_path(folder, preferred)
    if path is not None:
        return Path(path)
    found = list_files(_paths(folder), {kind})
    return Path(folder_paths.get_full_path(folder, found[0])) if found else None


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


def _free_comfy_models() -> None:
    """Ask ComfyUI to give back the models it holds (device and host memory) before our own loads."""
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def _release() -> None:
    gc.collect()
    mm.soft_empty_cache()


def _device() -> str:
    return str(mm.get_torch_device())


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI imported without its server (tests, scripts)
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data, server.client_id)


@contextmanager
def _training_mode():
    """ComfyUI runs every prompt under ``torch.inference_mode()``; training needs it off. The nodes hand the core
    paths, never tensors: everything the core trains on is loaded (so created) inside this block, and no
    inference tensor from the graph can reach autograd."""
    with torch.inference_mode(False):
        yield


# ----------------------------------------------------------------------------------------------------------
# schema from spec
# ----------------------------------------------------------------------------------------------------------

_CUSTOM = {t: io.Custom(t) for t in (S.MODEL_TYPE, S.DATASET_TYPE, S.ADAPTER_TYPE, S.ESTIMATE_TYPE)}
_BUILTIN = {"MODEL": io.Model, "IMAGE": io.Image, "STRING": io.String, "CONDITIONING": io.Conditioning,
            "LATENT": io.Latent, "VAE": io.Vae}


def _widget(i: S.InputSpec):
    common: dict[str, Any] = dict(optional=i.optional, tooltip=i.tooltip or None, advanced=i.advanced or None)
    if i.kind == "INT":
        return io.Int.Input(i.name, default=i.default, min=_num(i.min), max=_num(i.max), step=_num(i.step),
                            **common)
    if i.kind == "FLOAT":
        # ComfyUI's frontend rounds floats to the step unless told not to: learning rates need every digit.
        rounding = False if (i.step is None or i.step < 0.01) else None
        return io.Float.Input(i.name, default=float(i.default), min=i.min, max=i.max, step=i.step,
                              round=rounding, **common)
    if i.kind == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.kind == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.kind == "COMBO":
        options = list(i.options) + (dynamic_options(i.dynamic) if i.dynamic else [])
        options = list(dict.fromkeys(options))
        default = i.default if i.default in options else (options[0] if options else None)
        return io.Combo.Input(i.name, options=options, default=default, **common)
    if i.kind in _CUSTOM:
        return _CUSTOM[i.kind].Input(i.name, optional=i.optional, tooltip=i.tooltip or None)
    return _BUILTIN[i.kind].Input(i.name, optional=i.optional, tooltip=i.tooltip or None)


def _num(x):
    return None if x is None else int(x)


def _output(o: S.OutputSpec):
    kind = _CUSTOM.get(o.kind) or _BUILTIN[o.kind]
    return kind.Output(display_name=o.name, tooltip=o.tooltip or None)


def build_schema(node: S.NodeSpec, hidden: tuple = ()) -> io.Schema:
    return io.Schema(
        node_id=node.node_id,
        display_name=node.display_name,
        category=S.CATEGORY,
        description=node.description,
        search_aliases=list(node.search_aliases),
        inputs=[_widget(i) for i in node.inputs],
        outputs=[_output(o) for o in node.outputs],
        hidden=list(hidden),
        is_output_node=node.output_node,
    )


def _text(*parts: str) -> ui.PreviewText:
    return ui.PreviewText("\n".join(p for p in parts if p))


# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    from sidestep_core import presets

    return presets.list_presets()


def preset_config(name: str) -> Optional[TrainConfig]:
    from sidestep_core import presets

    return None if name in ("", S.NONE) else presets.load_preset(name)


# ----------------------------------------------------------------------------------------------------------
# 1. Load ACE-Step Checkpoint
# ----------------------------------------------------------------------------------------------------------


class LoadCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.LOAD)

    @classmethod
    def fingerprint_inputs(cls, model, text_encoder=S.AUTO, vae=S.AUTO, variant=S.AUTO):
        try:
            path = resolve_model_choice(model)
        except ValueError:
            return ""
        target = path / "model.safetensors" if path.is_dir() else path
        try:
            st = target.stat()
            return f"{path}:{st.st_size}:{st.st_mtime_ns}:{text_encoder}:{vae}:{variant}"
        except OSError:
            return str(path)

    @classmethod
    def execute(cls, model, text_encoder=S.AUTO, vae=S.AUTO, variant=S.AUTO) -> io.NodeOutput:
        from sidestep_core.model import load_acestep

        path = resolve_model_choice(model)
        stated = None if variant == S.AUTO else variant
        loaded = load_acestep(path, parts=set(), variant=stated)  # headers and config only: no weights
        info = loaded.info
        kind = "folder" if path.is_dir() else classify(path)
        te_path = vae_path = None
        if kind == "acestep":  # a bare DiT file: its text encoder and VAE live in ComfyUI's other folders
            te_path = _pick("text_encoders", text_encoder, "qwen_0.6b_ace15.safetensors", "qwen_0.6b")
            vae_path = _pick("vae", vae, "ace_1.5_vae.safetensors", "vae")
        else:  # all-in-one file or original folder: the core finds them inside/beside unless one is chosen
            if text_encoder != S.AUTO:
                te_path = _pick("text_encoders", text_encoder, "", "qwen_0.6b")
            if vae != S.AUTO:
                vae_path = _pick("vae", vae, "", "vae")
        tokenizer = None if path.is_dir() else comfy_tokenizer_dir()  # ComfyUI files carry no tokenizer
        bundle = calls.bundle_from_info(path, model, info, stated, text_encoder=te_path, vae=vae_path,
                                        tokenizer=tokenizer)
        lines = [bundle.summary(), f"text encoder: {te_path or 'auto'}", f"VAE: {vae_path or 'auto'}",
                 f"tokenizer: {tokenizer or 'auto'}"]
        if info.variant == "unknown":
            lines.append("variant unknown: set 'variant' so training uses the right timestep distribution")
        return io.NodeOutput(bundle, ui=_text(*lines))


# ----------------------------------------------------------------------------------------------------------
# 2. Preprocess Audio Folder
# ----------------------------------------------------------------------------------------------------------


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
                normalize="none", trigger_tag="") -> io.NodeOutput:
        from sidestep_core.data.preprocess import preprocess

        audio_dir = input_path(folder, "folder")
        if not audio_dir.is_dir():
            raise ValueError(f"{audio_dir}: folder not found (a relative path is taken inside ComfyUI's input "
                             f"folder, {folder_paths.get_input_directory()})")
        json_path = calls.dataset_json_path(audio_dir, dataset_json)
        out = calls.dataset_cache_dir(Path(_paths(DATASETS_FOLDER)[0]), audio_dir, json_path, model)
        cfg = calls.preprocess_config(
            dict(prompt_style=prompt_style, max_duration=max_duration, normalize=normalize, trigger_tag=trigger_tag),
            model, _device())
        _free_comfy_models()
        try:
            result = preprocess(model.checkpoint, audio_dir, out, dataset_json=json_path, config=cfg,
                                progress=_stage_progress(cls.hidden.unique_id))
        finally:
            _release()
        if result.samples == 0:
            lines = "\n".join(f"  {f.path}: {f.reason}" for f in result.failures) or "  (no audio files found)"
            raise ValueError(f"{audio_dir}: no usable samples\n{lines}")
        ref = calls.dataset_ref(out, result, trigger_tag)
        return io.NodeOutput(ref, ui=_text(ref.summary()))


# ----------------------------------------------------------------------------------------------------------
# 3. Train Adapter
# ----------------------------------------------------------------------------------------------------------


class _TrainReporter:
    """Core progress events → ComfyUI progress bar + ``sidestep.train`` events; Cancel → a stop request."""

    def __init__(self, node_id: Optional[str], run_name: str):
        self.node_id = node_id
        self.run_name = run_name
        self.bar: Optional[comfy.utils.ProgressBar] = None
        self.total = 0
        self.cancelled = False

    def should_stop(self) -> bool:
        # Read the flag without clearing it (ComfyUI's own check clears it); re-raised after the save.
        self.cancelled = self.cancelled or mm.processing_interrupted()
        return self.cancelled

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        payload = {"node": self.node_id, "event": kind, "run": self.run_name}
        if kind == "plan":
            self.total = int(ev.get("total_steps") or 0)
            payload.update(total=self.total, start=ev.get("start_step", 0),
                           seconds_per_step=ev.get("seconds_per_step"))
            self._bar(int(ev.get("start_step") or 0))
        elif kind == "step":
            self.total = int(ev.get("total") or self.total)
            payload.update({k: ev.get(k) for k in ("step", "total", "loss", "smoothed_loss", "lr", "eta_s",
                                                   "steps_per_s", "epoch")})
            self._bar(int(ev["step"]))
        elif kind in ("checkpoint", "validation", "done", "log"):
            payload.update({k: v for k, v in ev.items() if k != "event" and _jsonable(v)})
        else:
            return
        _send(TRAIN_EVENT, payload)

    def _bar(self, step: int) -> None:
        if self.should_stop() or not self.total:
            return  # ComfyUI's progress hook would raise (and clear the flag) inside the core's loop
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(self.total, node_id=self.node_id)
        try:
            self.bar.update_absolute(step, self.total)
        except mm.InterruptProcessingException:
            self.cancelled = True


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _runs_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "sidestep"


class _GraphPreview:
    """Train Adapter's ``step_hook``: at the planned steps, the user's own generation — their MODEL cloned and
    patched (ComfyUI's model patcher) with the live adapter, sampled as KSampler samples, decoded as VAEDecodeAudio
    decodes — written to ``<run>/previews/step_N.flac``.

    The core calls it inside ``previews.Isolated`` (eval, no grad, every RNG restored: ComfyUI's noise reseeds the
    global torch RNG), so training is unchanged. Sampling runs under ``torch.inference_mode()`` like any prompt.
    """

    def __init__(self, plan: calls.PreviewPlan, reporter: "_TrainReporter", model, positive, negative, latent: dict,
                 vae):
        self.plan, self.reporter = plan, reporter
        self.model, self.positive, self.negative, self.latent, self.vae = model, positive, negative, latent, vae
        self.last: Optional[tuple[int, dict]] = None  # (step, AUDIO) of the newest preview
        self.rendered: list[Path] = []
        self.error: Optional[str] = None

    def __call__(self, step: int, adapter) -> None:
        if self.error or self.reporter.cancelled or not self.plan.due(step, step == self.reporter.total):
            return
        try:
            with torch.inference_mode():
                audio = self.render(adapter)
        except mm.InterruptProcessingException:
            self.reporter.cancelled = True  # the loop saves and stops at its next poll
            return
        except Exception as exc:  # a broken preview graph must not cost the training run
            self.error = f"previews stopped at step {step}: {type(exc).__name__}: {exc}"
            log.exception("Side-Step: %s", self.error)
            return
        finally:
            mm.unload_all_models()  # give the device memory back to training
            mm.soft_empty_cache()
        self.last = (step, audio)
        self._write(step, audio)
        _send(PREVIEW_EVENT, {"node": self.reporter.node_id, "run": self.reporter.run_name, "step": step,
                              "audio": self.plan.view_ref(step, Path(folder_paths.get_output_directory()))})

    def render(self, adapter) -> dict:
        import comfy.sample
        import comfy.sd

        sd, _ = adapter.comfyui_state_dict()  # detached CPU copies in ComfyUI's key format
        patched, _ = comfy.sd.load_lora_for_models(self.model, None, sd, 1.0, 0)
        p, latent = self.plan, self.latent
        image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"],
                                                       latent.get("downscale_ratio_spacial"),
                                                       latent.get("downscale_ratio_temporal"))
        noise = comfy.sample.prepare_noise(image, p.seed, latent.get("batch_index"))
        samples = comfy.sample.sample(patched, noise, p.steps, p.cfg, p.sampler, p.scheduler, self.positive,
                                      self.negative, image, denoise=1.0, noise_mask=latent.get("noise_mask"),
                                      disable_pbar=True, seed=p.seed)
        wave = self.vae.decode(samples).movedim(-1, 1)  # [B, C, S], as VAEDecodeAudio
        std = torch.std(wave, dim=[1, 2], keepdim=True) * 5.0
        std[std < 1.0] = 1.0
        rate = getattr(self.vae, "audio_sample_rate_output", getattr(self.vae, "audio_sample_rate", 44100))
        return {"waveform": (wave / std).float().cpu(), "sample_rate": int(rate)}

    def _write(self, step: int, audio: dict) -> None:
        from sidestep_core.generate import write_flac

        for i, w in enumerate(audio["waveform"]):
            path = self.plan.path(step)
            if i:
                path = path.with_name(f"{path.stem}_{i}.flac")
            self.rendered.append(write_flac(path, w, audio["sample_rate"]))


def _stored_preview(plan: Optional[calls.PreviewPlan]) -> Optional[tuple[int, dict]]:
    """The newest preview already in the run folder (a reused run renders nothing)."""
    found = calls.latest_preview(plan.folder) if plan is not None else None
    if found is None:
        return None
    from sidestep_core.audio.decode import decode_audio

    step, path = found
    try:
        dec = decode_audio(path)
    except ValueError:
        return None
    return step, {"waveform": dec.waveform.unsqueeze(0), "sample_rate": int(dec.sample_rate)}


class TrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.TRAIN, hidden=(io.Hidden.unique_id,))

    @classmethod
    def execute(cls, model: ModelBundle, dataset: DatasetRef, estimate: Optional[EstimateRef] = None,
                **values) -> io.NodeOutput:
        from sidestep_core.training import train

        graph = {n: values.pop(n, None) for n in S.PREVIEW_SOCKETS}  # ComfyUI objects: never into the config
        cfg = calls.train_config(values, model, estimate, preset=preset_config(values.get("preset", S.NONE)),
                                 device=_device())
        name = runs.safe_name(values.get("output_name", "sidestep_adapter"))
        plan = runs.plan_run(_runs_root(), name, cfg, model.identity, dataset.identity,
                             bool(values.get("resume", True)))
        preview_plan = calls.preview_plan({**values, **graph}, model, plan.out)
        notes = [plan.note]
        last_preview = None
        if plan.action == "reuse":
            result_status, step = "complete", (runs.read_marker(plan.out) or {}).get("step", 0)
            last_preview = _stored_preview(preview_plan)
        else:
            cfg = cfg.replace(resume="auto" if plan.action == "resume" else "none")
            reporter = _TrainReporter(cls.hidden.unique_id, plan.out.name)
            previews = None
            if preview_plan is not None:
                previews = _GraphPreview(preview_plan, reporter, graph["preview_model"], graph["preview_positive"],
                                         graph["preview_negative"], graph["preview_latent"], graph["preview_vae"])
            _free_comfy_models()
            try:
                with _training_mode():
                    result = train(cfg, checkpoint_path=model.checkpoint, dataset_path=dataset.path,
                                   out_dir=plan.out, progress=reporter, should_stop=reporter.should_stop,
                                   step_hook=previews)
            finally:
                _release()
            if previews is not None:
                last_preview = previews.last
                notes.append(f"{len(previews.rendered)} preview(s) in {preview_plan.folder}")
                if previews.error:
                    notes.append(previews.error)
            runs.write_marker(plan.out, cfg, result.status, result.step, result.total_steps)
            if reporter.cancelled or result.interrupted:
                log.info("Side-Step: cancelled at step %d; checkpoint %s, adapter %s", result.step,
                         result.checkpoint, result.final_dir)
                raise mm.InterruptProcessingException()
            result_status, step = result.status, result.step
        adapter = AdapterRef(
            path=plan.out / "final", run_dir=plan.out, name=name, kind=cfg.adapter, steps=int(step),
            status=result_status, base_variant=model.variant, base_identity=model.identity,
            checkpoint=model.checkpoint, trigger_tag=cfg.trigger_tag or dataset.trigger_tag,
        )
        steps, loss, smooth = read_loss_csv(plan.out / "loss.csv")
        image = render_loss_curve(steps, loss, smooth, title=f"{name}: {cfg.adapter} rank {cfg.rank}, "
                                                             f"{adapter.steps} steps")
        notes.insert(0, f"{adapter.kind} adapter, {adapter.steps} steps ({result_status}): {adapter.path}")
        if loss:
            notes.append(f"last loss {loss[-1]:.5f} (smoothed {smooth[-1]:.5f})")
        ui_out = _text(*notes).as_dict()
        if last_preview is not None:
            notes.append(f"playing the preview of step {last_preview[0]}")
            ui_out = {**_text(*notes).as_dict(), **ui.PreviewAudio(last_preview[1], cls=cls).as_dict()}
        return io.NodeOutput(adapter, image, ui=ui_out)


# ----------------------------------------------------------------------------------------------------------
# 4. Estimate Gradients
# ----------------------------------------------------------------------------------------------------------


class EstimateGradients(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.ESTIMATE, hidden=(io.Hidden.unique_id,))

    @classmethod
    def execute(cls, model: ModelBundle, dataset: DatasetRef, **values) -> io.NodeOutput:
        from sidestep_core.estimate import estimate

        bar: dict[str, comfy.utils.ProgressBar] = {}

        def progress(ev: dict) -> None:
            if ev.get("event") == "step" and ev.get("total") and not mm.processing_interrupted():
                b = bar.get("bar") or bar.setdefault("bar", comfy.utils.ProgressBar(ev["total"],
                                                                                   node_id=cls.hidden.unique_id))
                b.update_absolute(ev["step"], ev["total"])

        _free_comfy_models()
        try:
            with _training_mode():
                result = estimate(model.checkpoint, dataset.path, progress=progress,
                                  base_variant=model.stated_variant, should_stop=mm.processing_interrupted,
                                  **calls.estimate_overrides(values, _device()))
        except KeyboardInterrupt:
            raise mm.InterruptProcessingException() from None
        finally:
            _release()
        ref = calls.estimate_ref(result)
        return io.NodeOutput(ref, ref.text, ui=_text(ref.text))


# ----------------------------------------------------------------------------------------------------------
# 5. Export Adapter
# ----------------------------------------------------------------------------------------------------------


def _dora_base(aw, adapter: AdapterRef):
    """The decoder weights a PEFT-style (row-wise) DoRA must be converted against for ComfyUI: those of the model
    it was trained on (read from its checkpoint; only the decoder). None for every other adapter."""
    from sidestep_core.adapters.comfy_export import needs_base

    if not needs_base(aw):
        return None
    from sidestep_core.model import load_acestep

    return load_acestep(adapter.checkpoint, parts={"decoder"}).model.decoder


class ExportAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.EXPORT)

    @classmethod
    def execute(cls, adapter: AdapterRef, name="sidestep_adapter", format="comfyui", overwrite=True,
                directory="") -> io.NodeOutput:
        from sidestep_core.adapters import export_comfyui, read_adapter_weights

        aw = read_adapter_weights(adapter.path)
        base = _dora_base(aw, adapter)  # PEFT-style DoRA: ComfyUI's dora_scale is relative to the base weights
        root = Path(directory).expanduser() if directory.strip() else Path(_paths("loras")[0])
        path, notes = export_comfyui(aw, calls.export_path(root, name, bool(overwrite)), base=base,
                                     base_identity=adapter.base_identity, base_variant=adapter.base_variant,
                                     key_style=calls.EXPORT_KEY_STYLES[format])
        folder_paths.filename_list_cache.pop("loras", None)  # let LoRA loaders list the new file at once
        return io.NodeOutput(str(path), ui=_text(f"wrote {path}", *notes))


# ----------------------------------------------------------------------------------------------------------
# 6. Apply Adapter
# ----------------------------------------------------------------------------------------------------------


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.APPLY)

    @classmethod
    def fingerprint_inputs(cls, model=None, lora_name=S.NONE, **_):
        if lora_name in ("", S.NONE):
            return ""
        path = folder_paths.get_full_path("loras", lora_name)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        return f"{lora_name}:{st.st_size}:{st.st_mtime_ns}" if st else lora_name

    @classmethod
    def execute(cls, model, lora_name=S.NONE, strength=1.0, self_attn_strength=1.0, cross_attn_strength=1.0,
                mlp_strength=1.0, adapter: Optional[AdapterRef] = None) -> io.NodeOutput:
        from sidestep_core.adapters import read_adapter_weights, to_comfyui_state_dict

        notes: list[str] = []
        if adapter is not None:
            aw = read_adapter_weights(adapter.path)
            sd, notes = to_comfyui_state_dict(aw, base=_dora_base(aw, adapter))
            source = str(adapter.path)
            if lora_name not in ("", S.NONE):
                notes.append(f"lora_name {lora_name!r} ignored: the connected adapter is used")
        elif lora_name not in ("", S.NONE):
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            sd = comfy.utils.load_torch_file(path, safe_load=True)
            source = path
        else:
            raise ValueError("Apply Adapter: connect an adapter or choose a lora_name")
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        patches = comfy.lora.load_lora(sd, key_map)
        if not patches:
            raise ValueError(f"{source}: no tensor of this adapter matches the model (is it an ACE-Step 1.5 "
                             f"adapter?)")
        groups = {"self_attn_strength": self_attn_strength, "cross_attn_strength": cross_attn_strength,
                  "mlp_strength": mlp_strength}
        patched = model.clone()
        applied: set = set()
        for value, part in calls.group_strengths(patches, strength, groups).items():
            applied.update(patched.add_patches(part, value))
        missing = [k for k in patches if k not in applied]
        if missing:
            notes.append(f"{len(missing)} adapter module(s) not in this model, first: {missing[0]}")
        return io.NodeOutput(patched, ui=_text(f"applied {len(applied)} modules from {source}", *notes))


# ----------------------------------------------------------------------------------------------------------


NODE_CLASSES = (LoadCheckpoint, PreprocessAudio, TrainAdapter, EstimateGradients, ExportAdapter, ApplyAdapter)


class SideStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> SideStepExtension:
    log.info("Side-Step %s: %d nodes", __version__, len(NODE_CLASSES))
    return SideStepExtension()
