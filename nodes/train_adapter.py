"""Train Adapter: one core training run per run folder, with progress, Cancel, the loss chart and previews
rendered through the user's own generation graph."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from sidestep_core.fsutil import atomic_write_json
from sidestep_core.inference.compare import TIMING_FILE

from . import calls, runs, spec as S
from .chart import read_loss_csv, render_loss_curve
from .comfy_glue import (PREVIEW_EVENT, TRAIN_EVENT, device, free_comfy_models, log, planner_path, preset_config,
                         release_memory, runs_root, send, text, training_mode)
from .apply_adapter import apply_lm
from .graph_render import Sampling, encode_again, render_audio
from .schema import build_schema
from .values import AdapterRef, DatasetRef, EstimateRef, ModelBundle


class _TrainReporter:
    """Core progress events → ComfyUI progress bar + ``sidestep.train`` events; Cancel → a stop request."""

    def __init__(self, node_id: Optional[str], run_name: str, loss_log: Optional[dict] = None):
        self.node_id = node_id
        self.run_name = run_name
        self.loss_log = loss_log  # /view reference of the run's loss.csv: the web chart reloads earlier steps
        self.bar: Optional[comfy.utils.ProgressBar] = None
        self.total = 0
        self.cancelled = False
        self.warnings: list[str] = []  # the run's warnings (samples left out, …): listed in the node's result

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
                           seconds_per_step=ev.get("seconds_per_step"), loss_log=self.loss_log)
            self._bar(int(ev.get("start_step") or 0))
        elif kind == "step":
            self.total = int(ev.get("total") or self.total)
            payload.update({k: ev.get(k) for k in ("step", "total", "loss", "smoothed_loss", "lr", "eta_s",
                                                   "steps_per_s", "epoch")})
            self._bar(int(ev["step"]))
        elif kind in ("checkpoint", "validation", "done", "log"):
            if kind == "log" and ev.get("level") == "warning":
                self.warnings.append(str(ev.get("message", "")))
            payload.update({k: v for k, v in ev.items() if k != "event" and _jsonable(v)})
        else:
            return
        send(TRAIN_EVENT, payload)

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




class _GraphPreview:
    """Train Adapter's ``step_hook``: at the planned steps, the user's own generation with the live adapter
    (``graph_render``) written to ``<run>/previews/step_N.flac``, and what it took to ``previews/timing.json``.

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
        self.clip, self.sources = None, None  # set by hear_lm: the encoder to run again with the live LM adapter

    def hear_lm(self, clip, trains_lm: bool, prompt: Optional[dict], node: Optional[str]) -> list[str]:
        """With the CLIP connected in a run that trains the planner LM: run the graph's encoder again at each
        preview with the LM adapter as it is then. Returns notes (why not, when it cannot)."""
        codes = any("audio_codes" in c[1] for c in self.positive)
        if not trains_lm:
            return ["previews: the CLIP is not used (this run does not train the planner LM)"] if clip else []
        if clip is None:
            return ["previews hear the audio codes your graph wrote with the plain LM; connect preview_clip to hear "
                    "the planner LM's adapter as it trains"] if codes else []
        self.sources, why = calls.encoding_plan(prompt, node, "preview_positive", "preview_negative", "preview_clip")
        if self.sources is None:
            return [f"previews hear the codes your graph wrote, not the planner LM's adapter: {why}"]
        self.clip = clip
        return [f"previews: the planner LM's adapter as it trains writes the audio codes at each preview "
                f"(TextEncodeAceStepAudio1.5 node {self.sources[0].node_id} run again)" + (f"; {why}" if why else "")]

    def __call__(self, step: int, adapter) -> None:
        if self.error or self.reporter.cancelled or not self.plan.due(step, step == self.reporter.total):
            return
        t0 = time.perf_counter()
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
        # what one render took: Compare Adapters states its cost from it before rendering
        atomic_write_json(self.plan.folder / TIMING_FILE, {
            "step": step, "seconds": round(time.perf_counter() - t0, 3), "steps": self.plan.steps,
            "frames": int(self.latent["samples"].shape[-1]), "batch": int(self.latent["samples"].shape[0])})
        send(PREVIEW_EVENT, {"node": self.reporter.node_id, "run": self.reporter.run_name, "step": step,
                              "audio": self.plan.view_ref(step, Path(folder_paths.get_output_directory()))})

    def render(self, adapter) -> dict:
        sd, _ = adapter.comfyui_state_dict()  # detached CPU copies in ComfyUI's key format
        p = self.plan
        positive, negative = self.positive, self.negative
        if self.sources is not None and adapter.lm is not None:
            patched, _ = apply_lm(self.clip, adapter.lm.comfyui_state_dict(), 1.0)
            positive, negative = encode_again(patched, self.sources)
        return render_audio(self.model, sd, 1.0, Sampling(p.seed, p.steps, p.cfg, p.sampler, p.scheduler),
                            positive, negative, self.latent, self.vae)

    def _write(self, step: int, audio: dict) -> None:
        from sidestep_core.inference.generate import write_flac

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
        return build_schema(S.TRAIN, hidden=(io.Hidden.unique_id, io.Hidden.prompt))

    @classmethod
    def execute(cls, model: ModelBundle, dataset: DatasetRef, estimate: Optional[EstimateRef] = None,
                **values) -> io.NodeOutput:
        from sidestep_core.training import train

        graph = {n: values.pop(n, None) for n in S.PREVIEW_SOCKETS}  # ComfyUI objects: never into the config
        clip = values.pop("preview_clip", None)
        lm_choice = values.pop(S.LM_NAME, S.AUTO)
        cfg = calls.train_config(values, model, estimate, preset=preset_config(values.get("preset", S.NONE)),
                                 device=device(), find_lm=lambda: planner_path(lm_choice, model.checkpoint))
        name = runs.safe_name(values.get("output_name", "sidestep_adapter"))
        plan = runs.plan_run(runs_root(), name, cfg, model.identity, dataset.identity,
                             bool(values.get("resume", True)))
        preview_plan = calls.preview_plan({**values, **graph}, model, plan.out)
        notes = [plan.note]
        loss_log = calls.view_ref(plan.out / "loss.csv", Path(folder_paths.get_output_directory()))
        last_preview = None
        if plan.action == "reuse":
            result_status, step = "complete", (runs.read_marker(plan.out) or {}).get("step", 0)
            last_preview = _stored_preview(preview_plan)
        else:
            cfg = cfg.replace(resume="auto" if plan.action == "resume" else "none")
            reporter = _TrainReporter(cls.hidden.unique_id, plan.out.name, loss_log)
            previews = None
            if preview_plan is not None:
                previews = _GraphPreview(preview_plan, reporter, graph["preview_model"], graph["preview_positive"],
                                         graph["preview_negative"], graph["preview_latent"], graph["preview_vae"])
                notes.extend(previews.hear_lm(clip, cfg.trains_lm, cls.hidden.prompt, cls.hidden.unique_id))
            free_comfy_models()
            try:
                with training_mode():
                    result = train(cfg, checkpoint_path=model.checkpoint, dataset_path=dataset.path,
                                   out_dir=plan.out, progress=reporter, should_stop=reporter.should_stop,
                                   step_hook=previews)
            finally:
                release_memory()
            if previews is not None:
                last_preview = previews.last
                notes.append(f"{len(previews.rendered)} preview(s) in {preview_plan.folder}")
                if previews.error:
                    notes.append(previews.error)
            runs.write_marker(plan.out, cfg, result.status, result.step, result.total_steps)
            notes.extend(reporter.warnings)
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
        what = {"dit": f"{cfg.adapter} rank {cfg.rank}", "lm": f"planner LM LoRA rank {cfg.lm_rank}",
                "both": f"{cfg.adapter} rank {cfg.rank} + planner LM LoRA rank {cfg.lm_rank}"}[cfg.train_models]
        image = render_loss_curve(steps, loss, smooth, title=f"{name}: {what}, {adapter.steps} steps")
        notes.insert(0, f"{what}, {adapter.steps} steps ({result_status}): {adapter.path}")
        if cfg.trains_lm:
            notes.insert(1, f"the planner LM's adapter: {adapter.path / 'lm'} (Apply Adapter with the CLIP "
                            "connected applies it)")
        if loss:
            notes.append(f"last loss {loss[-1]:.5f} (smoothed {smooth[-1]:.5f})")
        web = {"sidestep_loss_log": [loss_log]}  # for the web extension: the chart after a page reload
        ui_out = {**text(*notes).as_dict(), **web}
        if last_preview is not None:
            notes.append(f"playing the preview of step {last_preview[0]}")
            web["sidestep_preview"] = [{"step": last_preview[0], **preview_plan.view_ref(
                last_preview[0], Path(folder_paths.get_output_directory()))}]
            ui_out = {**text(*notes).as_dict(), **ui.PreviewAudio(last_preview[1], cls=cls).as_dict(), **web}
        return io.NodeOutput(adapter, image, ui=ui_out)
