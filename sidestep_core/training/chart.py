"""The loss curve as a picture (Pillow only): ``OUT/loss.png`` of every run, and the Train Adapter node's IMAGE."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

from ..fsutil import atomic_write_bytes
from .logs import read_csv_rows

BG = (24, 24, 28)
GRID = (60, 60, 68)
RAW = (120, 160, 220)
SMOOTH = (255, 170, 60)
TEXT = (220, 220, 220)
VAL = (120, 220, 140)
MARK = (230, 90, 200)


def read_loss_csv(path: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, loss, smoothed loss) from the trainer's ``loss.csv``; empty lists when it is missing."""
    steps, loss, smooth = [], [], []
    for row in _dict_rows(path):
        try:
            s, v = int(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
        steps.append(s)
        loss.append(v)
        try:
            smooth.append(float(row.get("smoothed_loss") or v))
        except ValueError:
            smooth.append(v)
    return steps, loss, smooth


def read_val_loss(path: Path) -> tuple[list[int], list[float]]:
    """(steps, validation loss) of the rows of ``loss.csv`` that have one (runs with a validation split)."""
    steps, val = [], []
    for row in _dict_rows(path):
        try:
            s, v = int(row["step"]), float(row.get("val_loss") or "nan")
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(v):
            steps.append(s)
            val.append(v)
    return steps, val


def _dict_rows(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    header, *rows = read_csv_rows(path) or [[]]
    return [dict(zip(header, row)) for row in rows]


def render_loss_image(steps: Sequence[int], loss: Sequence[float], smoothed: Optional[Sequence[float]] = None,
                      title: str = "", width: int = 768, height: int = 384, *,
                      val: Optional[tuple[Sequence[int], Sequence[float]]] = None,
                      marks: Sequence[tuple[int, str]] = ()):
    """A ``PIL.Image`` (RGB) of the raw loss (thin) and the smoothed loss (thick) over the steps; ``val`` (steps,
    values) adds the validation loss as dots joined by a line, ``marks`` (step, label) a labelled vertical line each
    (the checkpoints a comparison rendered)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 16, 28, 32
    pw, ph = width - left - right, height - top - bottom
    draw.text((left, 6), title or "loss", fill=TEXT)
    finite = [(s, v) for s, v in zip(steps, loss) if math.isfinite(v)]
    if not finite:
        draw.text((left, top + ph // 2), "no steps yet", fill=TEXT)
        return img
    val_pts = list(zip(*val)) if val else []
    s0, s1 = min(s for s, _ in finite), max(s for s, _ in finite)
    vals = [v for _, v in finite] + [v for v in (smoothed or []) if math.isfinite(v)] + [v for _, v in val_pts]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def xy(s: float, v: float) -> tuple[float, float]:
        x = left + (0.5 if s1 == s0 else (s - s0) / (s1 - s0)) * pw
        return x, top + (1 - (v - lo) / (hi - lo)) * ph

    for i in range(5):
        y = top + i * ph / 4
        draw.line([(left, y), (left + pw, y)], fill=GRID)
        draw.text((4, y - 6), f"{hi - i * (hi - lo) / 4:.4g}", fill=TEXT)
    draw.text((left, top + ph + 8), f"step {s0}", fill=TEXT)
    draw.text((left + pw - 70, top + ph + 8), f"step {s1}", fill=TEXT)
    _polyline(draw, [xy(s, v) for s, v in finite], RAW, 1)
    if smoothed:
        pts = [xy(s, v) for s, v in zip(steps, smoothed) if math.isfinite(v)]
        _polyline(draw, pts, SMOOTH, 2)
    if val_pts:
        pts = [xy(s, v) for s, v in val_pts]
        _polyline(draw, pts, VAL, 2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
        draw.text((left + pw - 200, 6), "validation loss", fill=VAL)
    rows: dict[float, int] = {}  # labels of marks at the same step are stacked
    for step, text in marks:
        x = xy(step, lo)[0]
        draw.line([(x, top), (x, top + ph)], fill=MARK, width=1)
        n = rows.get(x, 0)
        rows[x] = n + 1
        draw.text((min(x + 3, left + pw - 6 * len(text)), top + 4 + 12 * n), text, fill=MARK)
    return img


def write_loss_png(out_dir: Path, title: str = "") -> Path:
    """Render ``OUT/loss.csv`` into ``OUT/loss.png`` (written atomically)."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "loss.csv"
    img = render_loss_image(*read_loss_csv(csv_path), title=title, val=read_val_loss(csv_path))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out_dir / "loss.png", buf.getvalue())
    return out_dir / "loss.png"


def _polyline(draw, pts, color, width) -> None:
    if len(pts) == 1:
        x, y = pts[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    elif pts:
        draw.line(pts, fill=color, width=width)
