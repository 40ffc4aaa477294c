"""Choosing a result by ear: every chosen checkpoint of a run (or several adapters) × every strength, one seed.

This module is the part the CLI (``sidestep compare``) and the ComfyUI Compare node share: which adapters a
selection names, the strengths, the cost stated before rendering, the table and the loss chart with the compared
checkpoints marked. Rendering is the caller's (the core :class:`~.generate.Generator` here, ComfyUI's sampler in
the node).

A selection is a comma-separated list of:

``all`` (every checkpoint of the run by step, then ``final``; with their EMA twins) · ``last N`` (the N newest of
those, EMA twins left out) · any choice :func:`~sidestep_core.adapters.choice.resolve_checkpoint` takes
(``final``, ``last``, ``step_N``, ``ema``, ``step_N/ema``, ``last/ema``).

A run saves a checkpoint at its last step, so ``final`` holds the same weights as the newest ``step_N`` when both
exist at one step: ``all`` and ``last N`` then list it once, as ``final``.

Strength 0 is the base model: it is rendered once and stands in every row's 0 column.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from ..adapters.choice import EMA, FINAL, is_training_run, resolve_checkpoint, run_checkpoints

_LAST_N = re.compile(r"last (\d+)")
_STEP = re.compile(r"step_(\d+)")
TIMING_FILE = "timing.json"  # <run>/previews/timing.json: what the newest preview render took (Train Adapter)


@dataclass(frozen=True)
class Row:
    """One adapter of the grid: ``label`` (``step_200``, ``ema``, a file name), its folder or file, its step."""

    label: str
    path: Path
    step: Optional[int] = None


def adapter_step(path: Union[str, Path]) -> Optional[int]:
    """The optimizer step an adapter was saved at (``sidestep_steps`` in its metadata), or None."""
    from ..model.loading import read_header
    from ..training.adapters import find_adapter

    try:
        _, weights = find_adapter(Path(path))
        meta = read_header(weights).get("__metadata__") or {}
        return int(meta["sidestep_steps"])
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _step_of(label: str, path: Path) -> Optional[int]:
    m = _STEP.match(label)
    return int(m.group(1)) if m else adapter_step(path)


def _label(path: Path) -> str:
    """A run's adapter folder by the choice that names it: ``step_N``, ``final``, ``step_N/ema``, ``ema``."""
    if path.name != EMA:
        return path.name
    return EMA if path.parent.name == FINAL else f"{path.parent.name}/{EMA}"


def _run_rows(run: Path) -> list[Row]:
    """Every checkpoint of ``run`` as rows (the ``all`` selection)."""
    found = run_checkpoints(run)
    final = dict(found).get(FINAL)
    final_step = adapter_step(final) if final is not None else None
    rows = []
    for label, path in found:
        base = label.partition("/")[0]
        if final_step is not None and base == f"step_{final_step}":
            continue  # the same weights as final (and its EMA twin as ema)
        rows.append(Row(label, path, final_step if base in (FINAL, EMA) else _step_of(label, path)))
    return rows


def _tokens(selection: str) -> list[str]:
    """``"last 3, ema"`` / ``"final step_100 ema"`` → the choices (``last N`` kept together); empty → ``all``."""
    words = [w for w in re.split(r"[,\s]+", selection or "") if w]
    out: list[str] = []
    for w in words:
        if w.isdigit() and out and out[-1].lower() == "last":
            out[-1] = f"last {w}"
        else:
            out.append(w)
    return out or ["all"]


def select_checkpoints(run: Union[str, Path], selection: str = "all") -> list[Row]:
    """The rows ``selection`` (see the module docstring) names in run folder ``run``, in order, each once. A plain
    adapter (no run) answers ``final`` / ``all`` / ``last N`` with itself and ``ema`` with its EMA twin."""
    run = Path(run).expanduser()
    is_run = is_training_run(run)
    rows: list[Row] = []
    for token in _tokens(selection):
        low = token.lower()
        m = _LAST_N.fullmatch(low)
        if low == "all" or m:
            if not is_run:
                found = [adapter_row(resolve_checkpoint(run, FINAL))]
            else:
                found = _run_rows(run)
                if not found:
                    raise ValueError(f"{run}: training run without checkpoints or final adapter")
            if m:
                plain = [r for r in found if not r.label.endswith(EMA)]
                n = int(m.group(1))
                if n < 1:
                    raise ValueError(f"checkpoints: {token!r}: N must be at least 1")
                found = plain[-n:]
            rows += found
        else:
            path = resolve_checkpoint(run, low)
            if not is_run:
                rows.append(adapter_row(path) if path == run else Row(f"{adapter_row(run).label}/{EMA}", path))
                continue
            rows.append(Row(_label(path), path, _step_of(_label(path).partition("/")[0], path)))
    out, seen = [], set()
    for r in rows:
        if r.path not in seen:
            seen.add(r.path)
            out.append(r)
    return out


def adapter_row(path: Union[str, Path]) -> Row:
    """A single adapter (folder or file) as a row, labelled by its name."""
    path = Path(path).expanduser()
    return Row(path.stem if path.is_file() else path.name, path, adapter_step(path))


def parse_strengths(value: Union[str, Iterable[float]]) -> list[float]:
    """``"0.5, 0.8, 1"`` (or numbers) → ``[0.5, 0.8, 1.0]``, each once, in the order given."""
    items = re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else list(value)
    out: list[float] = []
    bad: list[str] = []
    for item in items:
        if item == "":
            continue
        try:
            s = float(item)
        except (TypeError, ValueError):
            bad.append(str(item))
            continue
        if s not in out:
            out.append(s)
    # every value named, without quotes: ComfyUI's front end shows an apostrophe in a node error as "&amp;apos;"
    if bad:
        raise ValueError(f"strengths: {', '.join(bad)} is not a number (numbers separated by commas, e.g. 0.5, 0.8, "
                         "1.0)")
    if not out:
        raise ValueError("strengths: give at least one, e.g. 0.5, 0.8, 1.0")
    return out


@dataclass(frozen=True)
class Plan:
    """The grid to render: ``rows`` × ``strengths``; strength 0 (the base model) is rendered once."""

    rows: tuple[Row, ...]
    strengths: tuple[float, ...]

    def cells(self) -> list[tuple[int, int]]:
        """(row, column) of every cell, row by row."""
        return [(r, c) for r in range(len(self.rows)) for c in range(len(self.strengths))]

    def renders(self) -> list[tuple[Optional[int], float]]:
        """What is actually rendered, in order: (row, strength), row None for the base model."""
        out: list[tuple[Optional[int], float]] = [(None, 0.0)] if 0.0 in self.strengths else []
        return out + [(r, s) for r in range(len(self.rows)) for s in self.strengths if s != 0.0]

    def key(self, row: int, column: int) -> tuple[Optional[int], float]:
        """The render a cell shows."""
        s = self.strengths[column]
        return (None, 0.0) if s == 0.0 else (row, s)


def make_plan(rows: Sequence[Row], strengths: Sequence[float]) -> Plan:
    """The grid of ``rows`` (each adapter once) × ``strengths``."""
    seen: set = set()
    rows = [r for r in rows if not (r.path in seen or seen.add(r.path))]
    if not rows:
        raise ValueError("compare: no adapter to compare (connect a run or name adapters)")
    labels = [r.label for r in rows]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:  # the same label from two runs: tell them apart by their folder
        rows = [Row(f"{r.label} ({(run_of(r.path) or r.path.parent).name})" if r.label in dup else r.label,
                    r.path, r.step) for r in rows]
    return Plan(tuple(rows), tuple(strengths))


# ----- the cost, stated before rendering -----


def recorded_render_seconds(run: Optional[Union[str, Path]]) -> Optional[dict]:
    """What the newest preview of ``run`` took to render (``{"seconds", "steps", "frames", "step"}``), as Train
    Adapter recorded it; None when the run has no record."""
    if run is None:
        return None
    try:
        data = json.loads((Path(run) / "previews" / TIMING_FILE).read_text())
        return data if float(data["seconds"]) > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_seconds(recorded: Optional[dict], steps: int, frames: int) -> Optional[float]:
    """Seconds per render of ``steps`` sampler steps over ``frames`` latent frames, scaled from a recorded preview
    (sampling dominates and grows with both; a rough figure, named as such)."""
    if not recorded:
        return None
    r_steps, r_frames = max(int(recorded.get("steps") or steps), 1), max(int(recorded.get("frames") or frames), 1)
    return float(recorded["seconds"]) * (steps / r_steps) * (frames / r_frames)


def cost_line(renders: int, seconds_each: Optional[float], source: str) -> str:
    if seconds_each is None:
        return f"{renders} render(s); time per render measured on the first one"
    return (f"{renders} render(s) × about {seconds_each:.1f} s ({source}) ≈ {fmt_seconds(renders * seconds_each)}")


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, m, r = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{r:02d}s" if m else f"{r}s"


# ----- the table and the chart -----


def val_loss_at(run: Optional[Union[str, Path]]) -> dict[int, float]:
    """{step: validation loss} of a run's ``loss.csv`` (empty without a validation split)."""
    if run is None:
        return {}
    from ..training.chart import read_val_loss

    return dict(zip(*read_val_loss(Path(run) / "loss.csv")))


def table(plan: Plan, cell_text: Callable[[int, int], str], *, val: Optional[dict[int, float]] = None,
          markdown: bool = True) -> str:
    """The grid as a table: one line per row (checkpoint, step, validation loss where the run has one), one
    column per strength; ``cell_text(row, column)`` fills the cells (a file link, a render time …)."""
    val = val or {}
    head = ["checkpoint", "step"] + (["val loss"] if val else []) + [f"strength {s:g}" for s in plan.strengths]
    lines = []
    for i, row in enumerate(plan.rows):
        v = val.get(row.step) if row.step is not None else None
        cells = [row.label, "" if row.step is None else str(row.step)]
        if val:
            cells.append("" if v is None else f"{v:.5f}")
        lines.append(cells + [cell_text(i, c) for c in range(len(plan.strengths))])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(c) for c in lines])


def chart(run: Optional[Union[str, Path]], rows: Sequence[Row], title: str = "", width: int = 768,
          height: int = 384):
    """The run's loss curve (raw, smoothed, validation where there is one) with a labelled line at each compared
    checkpoint's step, as a ``PIL.Image``; without a run, a picture that says so."""
    from ..training.chart import read_loss_csv, read_val_loss, render_loss_image

    csv_path = Path(run) / "loss.csv" if run is not None else Path("/nonexistent")
    marks = [(r.step, r.label) for r in rows if r.step is not None]
    return render_loss_image(*read_loss_csv(csv_path), title=title or "loss and the compared checkpoints",
                             width=width, height=height, val=read_val_loss(csv_path), marks=marks)


def run_of(path: Union[str, Path]) -> Optional[Path]:
    """The run folder an adapter folder belongs to (``run/final``, ``run/checkpoints/step_N``, their ``ema/``)."""
    p = Path(path).expanduser()
    for cand in (p, *p.parents[:4]):
        if is_training_run(cand):
            return cand
    return None


def cell_name(row: Optional[Row], strength: float) -> str:
    """File stem of a render: ``base`` or ``<label>_x<strength>`` (``/`` of ``step_N/ema`` → ``-``)."""
    if row is None:
        return "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{row.label}_x{strength:g}").strip("-")


# ----- rendering with the core model (the CLI; the ComfyUI node renders through ComfyUI's sampler) -----


def render(gen, prompt, plan: Plan, settings=None, *,
           before: Optional[Callable[[int, Optional[Row], float], None]] = None) -> dict:
    """Every render of ``plan`` with the core :class:`~.generate.Generator`: the same noise for all, so the renders
    differ by the adapter and its strength alone. Without a planner LM the conditions are encoded once; with one,
    each render's LM (with the row's LM adapter at the cell's strength) writes its codes first, so the grid hears
    the LM adapter too. ``before(i, row, strength)`` is called before each render (progress, cost). Returns
    ``{plan key: GeneratedAudio}``; leaves no adapter on."""
    s = gen.settings(settings)
    cond = gen.conditions(prompt) if gen.planner is None else None
    out = {}
    try:
        for i, (r, strength) in enumerate(plan.renders()):
            row = None if r is None else plan.rows[r]
            if before is not None:
                before(i, row, strength)
            if row is None:
                gen.remove_adapter()
            elif gen.adapter_path != str(row.path):
                gen.set_adapter(row.path, strength)
            else:
                gen.set_strength(strength)
            result = gen.generate(prompt, s, cond)
            result.label, result.strength = cell_name(row, strength), strength
            out[(r, strength)] = result
    finally:
        gen.remove_adapter()
    return out
