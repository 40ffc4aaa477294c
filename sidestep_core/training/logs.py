"""Training logs: ``OUT/loss.csv``, TensorBoard events in ``OUT/runs``, loss smoothing and speed/ETA tracking.

On resume the CSV is cut back to the checkpoint's step and TensorBoard purges later events, so steps that ran after
the checkpoint in an interrupted run are not listed twice.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from ..fsutil import atomic_write_bytes, naming

log = logging.getLogger("sidestep.train")

CSV_FIELDS = ("step", "epoch", "loss", "smoothed_loss", "lr", "grad_norm", "val_loss", "elapsed_s", "lm_loss")


class LossSmoother:
    """Bias-corrected exponential moving average (so the first values are not pulled towards 0)."""

    def __init__(self, beta: float = 0.9, value: float = 0.0, count: int = 0):
        self.beta, self.value, self.count = beta, value, count

    def update(self, x: float) -> float:
        self.count += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.smoothed

    @property
    def smoothed(self) -> float:
        return self.value / (1 - self.beta ** self.count) if self.count else float("nan")

    def state(self) -> dict:
        return {"beta": self.beta, "value": self.value, "count": self.count}


class CsvLog:
    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        self._truncate_after(resume_step)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._w = csv.writer(self._fh)
        if new:
            with naming(self.path):
                self._w.writerow(CSV_FIELDS)
                self._fh.flush()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = read_csv_rows(self.path)
        ours = bool(rows) and rows[0][:1] == ["step"]  # a file saved over by a spreadsheet may have lost it
        keep = [rows[0] if ours else list(CSV_FIELDS)]
        keep += [r for r in rows[1 if ours else 0:] if r and r[0].isdigit() and int(r[0]) <= step]
        buf = io.StringIO()
        csv.writer(buf).writerows(keep)
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))

    def write(self, **row) -> None:
        with naming(self.path):
            self._w.writerow([_fmt(row.get(k)) for k in CSV_FIELDS])
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_csv_rows(path: Path) -> list[list[str]]:
    """The rows of a ``loss.csv``. It is only a log: a file another program saved in another encoding or mangled
    gives the rows that still parse (undecodable bytes replaced, reading stopped at a line the csv module refuses)
    instead of ending the run that reads it."""
    rows: list[list[str]] = []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        try:
            for row in csv.reader(fh):
                rows.append(row)
        except csv.Error:
            pass
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


class TensorBoard:
    """SummaryWriter that never takes training down with it: a failing write disables logging with a warning."""

    def __init__(self, logdir: Path, resume_step: int, enabled: bool = True):
        self.w = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.w = SummaryWriter(str(logdir), purge_step=resume_step + 1 if resume_step else None, flush_secs=10)
        except Exception as exc:  # tensorboard missing or unwritable folder
            log.warning("TensorBoard logging disabled: %s", exc)

    def scalars(self, step: int, values: dict) -> None:
        self._call(lambda: [self.w.add_scalar(k, v, step) for k, v in values.items() if v is not None])

    def histogram(self, tag: str, values: Sequence[float], step: int) -> None:
        import numpy as np

        self._call(lambda: self.w.add_histogram(tag, np.asarray(values, dtype=np.float32), step, bins=20))

    def _call(self, fn) -> None:
        if self.w is None:
            return
        try:
            fn()
        except Exception as exc:
            log.warning("TensorBoard logging disabled after an error: %s", exc)
            self.close()

    def close(self) -> None:
        if self.w is not None:
            try:
                self.w.close()
            finally:
                self.w = None


class Speed:
    """Steps per second over a sliding window of recent steps, and the ETA it implies."""

    def __init__(self, window: int = 20):
        self.window = window
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        self.times = self.times[-(self.window + 1):]

    def steps_per_s(self) -> Optional[float]:
        if len(self.times) < 2:
            return None
        dt = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / dt if dt > 0 else None

    def eta_s(self, remaining: int) -> Optional[float]:
        sps = self.steps_per_s()
        return remaining / sps if sps else None
