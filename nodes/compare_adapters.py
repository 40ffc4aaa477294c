"""Compare Adapters: the user's generation rendered for every chosen checkpoint × strength with one seed, through
ComfyUI's model patcher and sampler (``graph_render``, as Train Adapter's previews); a grid of play buttons on the
node (web/sidestep.js), the audio as one batch, the loss chart with the compared checkpoints marked and a table.

Which adapters, the cost and the table are the core's (``sidestep_core.inference.compare``), shared with
``sidestep compare``.

With the CLIP connected and the positive made by TextEncodeAceStepAudio1.5 with ``generate_audio_codes`` on, each
checkpoint that has a planner-LM adapter patches the CLIP's LM with it (at the cell's strength) and that encoder is
run again on the values the prompt graph holds (hidden PROMPT), so the grid hears the codes each checkpoint's LM
writes. When the graph cannot be followed (a combine node between, an encoder input fed by another node) the grid
renders the graph's own conditioning and says why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from sidestep_core.inference import compare as C

from . import calls, spec as S
from .apply_adapter import apply_lm, check_fits
from .comfy_glue import COMPARE_EVENT, dora_base, log, progress_text, release_memory, runs_root, send, text
from .graph_render import Sampling, encode_again, render_audio
from .schema import build_schema
from .values import AdapterRef

GRID_KEY = "sidestep_grid"  # the node's UI output read by web/sidestep.js: rows, strengths, cell files


def _run_path(value: str) -> Optional[Path]:
    value = (value or "").strip()
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else runs_root() / p


def _rows(adapter: Optional[AdapterRef], run: str, lora_names: str, checkpoints: str) -> list:
    files = [Path(folder_paths.get_full_path_or_raise("loras", n)) for n in calls.lines(lora_names)]
    return calls.compare_rows(adapter, _run_path(run), checkpoints, files)


def _patches(row: C.Row, model, adapter: Optional[AdapterRef]) -> Optional[dict]:
    """The row's adapter as a ComfyUI-format state dict, checked against the connected model first; None for a
    run's checkpoint that holds a planner-LM adapter only."""
    from sidestep_core.adapters import AdapterFormatError, read_adapter_weights, to_comfyui_state_dict
    from sidestep_core.adapters.comfy_export import needs_base
    from sidestep_core.planner.lm_adapter import has_dit_adapter
    from sidestep_core.planner.write import lm_adapter_folder

    if row.path.is_dir() and lm_adapter_folder(row.path) is not None and not has_dit_adapter(row.path):
        return None

    try:
        aw = read_adapter_weights(row.path)
    except AdapterFormatError:
        if row.path.is_file():  # a file only ComfyUI reads: it places what it can, as LoraLoader does
            return comfy.utils.load_torch_file(str(row.path), safe_load=True)
        raise
    check_fits(model, aw)
    own = adapter is not None and Path(adapter.run_dir) in row.path.parents
    if needs_base(aw) and not own:
        raise ValueError(f"{row.path}: a PEFT-style DoRA needs the weights it was trained on; compare it through "
                         "the connected Train Adapter output")
    base = dora_base(aw, adapter) if own else None
    try:
        return to_comfyui_state_dict(aw, base=base)[0]
    finally:
        if base is not None:
            base = None
            release_memory()


class CompareAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.COMPARE, hidden=(io.Hidden.unique_id, io.Hidden.prompt))

    @classmethod
    def validate_inputs(cls, strengths=None):
        """A typo in ``strengths`` is named when the prompt is queued, not after the training run before it.
        (A linked value arrives as None: it is checked when the node runs.)"""
        if strengths is None:
            return True
        try:
            C.parse_strengths(strengths)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, run="", lora_names="", checkpoints="last 3", **_):
        """Render again when the selection names other files or one changed (a run that gained checkpoints, a
        rewritten LoRA). ComfyUI passes widget values only (a linked input such as ``adapter`` is None here); a
        connected adapter invalidates through its Train Adapter node."""
        try:
            rows = _rows(None, run, lora_names, checkpoints)
        except (ValueError, OSError):
            return ""  # execute reports it
        return calls.files_state(*(r.path for r in rows))

    @classmethod
    def execute(cls, model, positive, negative, latent: dict, vae, checkpoints="last 3", strengths="0.5, 0.8, 1.0",
                seed=0, steps=8, cfg=1.0, sampler="euler", scheduler="simple", adapter: Optional[AdapterRef] = None,
                run="", lora_names="", clip=None) -> io.NodeOutput:
        node = cls.hidden.unique_id
        plan = C.make_plan(_rows(adapter, run, lora_names, checkpoints), C.parse_strengths(strengths))
        conditioning = _LMConditioning(plan, clip, cls.hidden.prompt, node, positive, negative)
        renders = plan.renders()
        runs = [r for r in dict.fromkeys(C.run_of(row.path) for row in plan.rows) if r is not None]
        chart_run = runs[0] if runs else None
        recorded = C.recorded_render_seconds(chart_run)
        frames = int(latent["samples"].shape[-1])
        each = C.estimate_seconds(recorded, int(steps), frames)
        cost = C.cost_line(len(renders), each, f"the run's preview of step {recorded['step']}" if recorded else "")
        out_dir = runs_root() / "compare" / f"{time.strftime('%Y%m%d-%H%M%S')}-{node or 'node'}"
        output_root = Path(folder_paths.get_output_directory())
        grid = {"rows": [r.label for r in plan.rows], "strengths": list(plan.strengths), "cost": cost,
                "cells": [[None] * len(plan.strengths) for _ in plan.rows]}
        log.info("Side-Step Compare: %s", cost)
        progress_text(node, cost)
        send(COMPARE_EVENT, {"node": node, "event": "plan", **grid})

        s = Sampling(int(seed), int(steps), float(cfg), sampler, scheduler)
        bar = comfy.utils.ProgressBar(len(renders), node_id=node)
        done: dict = {}
        cached: tuple = (None, None)  # (row, its patches): each row's adapter is read once
        for i, (r, strength) in enumerate(renders):
            mm.throw_exception_if_processing_interrupted()  # Cancel: stop between renders
            row = None if r is None else plan.rows[r]
            if r is not None and cached[0] != r:
                cached = (r, _patches(row, model, adapter))
            t0 = time.perf_counter()
            pos, neg = conditioning.of(r, strength)
            audio = render_audio(model, cached[1] if r is not None else None, strength, s, pos, neg, latent, vae)
            took = time.perf_counter() - t0
            if each is None:  # no recorded preview: the first render tells
                each = took
                cost = C.cost_line(len(renders), each, "measured on the first render")
                grid["cost"] = cost
                progress_text(node, cost)
            refs = write_cell(out_dir, i, C.cell_name(row, strength), audio, output_root)
            done[(r, strength)] = (audio, refs, took)
            for rr, cc in plan.cells():
                if plan.key(rr, cc) == (r, strength):
                    grid["cells"][rr][cc] = refs[0]
                    send(COMPARE_EVENT, {"node": node, "event": "cell", "row": rr, "col": cc, "audio": refs[0]})
            bar.update_absolute(i + 1, len(renders))
            progress_text(node, f"{cost}\nrendered {i + 1}/{len(renders)}: {C.cell_name(row, strength)}")

        cells = [done[plan.key(rr, cc)] for rr, cc in plan.cells()]
        batch = {"waveform": torch.cat([a["waveform"] for a, _, _ in cells]),
                 "sample_rate": cells[0][0]["sample_rate"]}
        names = {k: v[1][0]["filename"] for k, v in done.items()}
        table = C.table(plan, lambda rr, cc: names[plan.key(rr, cc)], val=C.val_loss_at(chart_run), markdown=False)
        took = sum(t for _, _, t in done.values())
        summary = (f"{len(plan.rows)} adapter(s) × {len(plan.strengths)} strength(s), seed {seed}: {len(renders)} "
                   f"render(s) in {C.fmt_seconds(took)}; audio batch {batch['waveform'].shape[0]} (row by row); "
                   f"files in {out_dir}")
        title = f"{chart_run.name if chart_run else 'no training run'}: loss and the compared checkpoints"
        img = C.chart(chart_run, plan.rows, title=title)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        summary = "\n".join([summary, *conditioning.notes])
        ui_out = {**text(summary, table).as_dict(), GRID_KEY: [grid]}
        return io.NodeOutput(batch, image, summary + "\n\n" + table, ui=ui_out)


def write_cell(folder: Path, index: int, stem: str, audio: dict, output_root: Path) -> list[dict]:
    """Each clip of a render as ``NN_<cell>.flac`` (``_k`` for the k-th of a batched latent), as ``/view`` refs."""
    from sidestep_core.inference.generate import write_flac

    refs = []
    for k, w in enumerate(audio["waveform"]):
        path = folder / f"{index:02d}_{stem}{f'_{k}' if k else ''}.flac"
        write_flac(path, w, audio["sample_rate"])
        refs.append(calls.view_ref(path, output_root))
    return refs


class _LMConditioning:
    """Each cell's positive and negative: the graph's own, or — for a row with a planner-LM adapter, when the CLIP
    is connected and the graph can be followed — its encoder run again with that LM adapter patched in."""

    def __init__(self, plan: C.Plan, clip, prompt: Optional[dict], node: Optional[str], positive, negative):
        from sidestep_core.planner.write import lm_adapter_folder

        self.clip, self.given = clip, (positive, negative)
        self.lm = {r: lm_adapter_folder(row.path) if row.path.is_dir() else None for r, row in enumerate(plan.rows)}
        self.notes: list[str] = []
        self.sources = None
        self._cache: dict = {}
        if not any(self.lm.values()):
            if clip is not None:
                self.notes.append("no compared checkpoint has a planner-LM adapter: the CLIP is not used")
            return
        codes = any("audio_codes" in c[1] for c in positive)
        if clip is None:
            if codes:
                self.notes.append("the grid hears the audio codes your graph wrote with the plain LM; connect the "
                                  "CLIP to hear each checkpoint's planner-LM adapter write them")
            return
        self.sources, why = calls.encoding_plan(prompt, node, "positive", "negative", "clip")
        if self.sources is None:
            self.notes.append(f"the grid hears the codes your graph wrote, not each checkpoint's planner-LM adapter: "
                              f"{why}")
        else:
            self.notes.append("each checkpoint's planner-LM adapter writes the audio codes (TextEncodeAceStepAudio1.5 "
                              f"node {self.sources[0].node_id} run again with it)" + (f"; {why}" if why else ""))

    def of(self, row: Optional[int], strength: float):
        folder = self.lm.get(row) if row is not None else None
        if self.sources is None or folder is None or strength == 0:
            return self.given
        key = (row, strength)
        if key not in self._cache:  # one cell at a time: the renders go row by row
            patched, _ = apply_lm(self.clip, folder, strength)
            self._cache = {key: encode_again(patched, self.sources)}
        return self._cache[key]
