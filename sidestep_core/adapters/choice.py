"""Choosing one adapter out of a training run: ``final``, ``step_N``, ``last`` and their EMA twins.

A run folder (``OUT`` of ``sidestep train``) holds ``final/`` and ``checkpoints/step_N/``; with EMA on, each of them
has an ``ema/`` subfolder that is an adapter of its own. A choice names one of them:

``final`` · ``step_N`` · ``last`` (the newest checkpoint, else ``final``) · ``ema`` (= ``final/ema``) ·
``step_N/ema`` · ``last/ema``.

A plain adapter folder or file (not a run) answers ``final`` with itself and ``ema`` with its ``ema/`` subfolder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

EMA = "ema"
FINAL = "final"
LAST = "last"
_STEP = re.compile(r"step_(\d+)")
_STATE = "training_state.json"  # marks a complete checkpoint (sidestep_core.training.state)


class CheckpointChoiceError(ValueError):
    """The chosen checkpoint does not exist (message starts with the run's path and lists what does)."""


def is_training_run(path: Union[str, Path]) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "training_config.json").is_file())


def run_checkpoints(run: Union[str, Path], *, ema: bool = True) -> list[tuple[str, Path]]:
    """``(choice, adapter folder)`` of every complete checkpoint of a run by step, then ``final``; each followed by
    its EMA twin (``step_N/ema``, ``ema``) where one was saved and ``ema`` is True."""
    run = Path(run).expanduser()
    steps = []
    root = run / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP.fullmatch(p.name)
            if m and p.is_dir() and (p / _STATE).is_file():
                steps.append((int(m.group(1)), p))
    found = [(f"step_{n}", p) for n, p in sorted(steps)]
    if (run / FINAL).is_dir():
        found.append((FINAL, run / FINAL))
    out = []
    for label, folder in found:
        out.append((label, folder))
        if ema and (folder / EMA).is_dir():
            out.append((EMA if label == FINAL else f"{label}/{EMA}", folder / EMA))
    return out


def resolve_checkpoint(path: Union[str, Path], choice: str = FINAL) -> Path:
    """The adapter folder (or file) that ``choice`` names in run folder ``path``; see the module docstring."""
    path = Path(path).expanduser()
    choice = (choice or FINAL).strip().strip("/") or FINAL
    base, _, sub = choice.partition("/")
    if base == EMA and not sub:
        base, sub = FINAL, EMA
    if sub not in ("", EMA) or not (base in (FINAL, LAST) or _STEP.fullmatch(base)):
        raise CheckpointChoiceError(f"{path}: unknown checkpoint choice {choice!r}; use final, last, step_N, "
                                    "ema, step_N/ema or last/ema")
    if not is_training_run(path):
        if base == FINAL and path.exists() and (not sub or (path / EMA).is_dir()):
            return path / EMA if sub else path
        if not path.exists():
            raise CheckpointChoiceError(f"{path}: no such file or folder (an adapter or a training run)")
        raise CheckpointChoiceError(f"{path}: an adapter, not a training run folder, and it has no {choice!r} "
                                    "checkpoint (choose final" + (", ema" if (path / EMA).is_dir() else "") + ")")
    found = run_checkpoints(path)
    labels = dict(found)
    if base == LAST:
        steps = [label for label, _ in found if _STEP.fullmatch(label)]
        base = steps[-1] if steps else FINAL
    want = (EMA if base == FINAL else f"{base}/{EMA}") if sub else base
    if want in labels:
        return labels[want]
    have = ", ".join(label for label, _ in found) or "nothing yet"
    hint = " (EMA weights are saved only by runs trained with --ema-decay)" if sub else ""
    raise CheckpointChoiceError(f"{path}: no checkpoint {choice!r}{hint}; this run has: {have}")
