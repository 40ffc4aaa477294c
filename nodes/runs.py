"""Where a Train Adapter node's run lives, and whether queueing it again reuses, resumes or starts over.

A run folder is ``<root>/<output_name>-<fingerprint>``; the fingerprint covers the model, the dataset and every
setting that changes what is trained, but not the length of the run (steps/epochs) or bookkeeping (checkpoint
cadence, logging). So:

- the same inputs again, after a finished run: the finished adapter is reused, nothing is trained;
- a stopped (cancelled) run, ``resume`` on: training continues from its last checkpoint;
- more steps than a finished run had, ``resume`` on: training continues up to the new length;
- ``resume`` off: the old run is moved aside (``…​.old-N``, nothing is deleted) and training starts over.

No ComfyUI import.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sidestep_core.config import RUN_ONLY_FIELDS, TrainConfig
from sidestep_core.fsutil import atomic_write_json
from sidestep_core.training import state as st

MARKER = "sidestep_node_run.json"
# Settings that do not change what a step trains: excluded from the run folder's fingerprint.
LENGTH_FIELDS = ("max_steps", "epochs")
BOOKKEEPING_FIELDS = ("save_every", "keep_checkpoints", "tensorboard", "estimate_steps", "log_every",
                      "histogram_every", "val_every", "preview_codes")


def safe_name(name: str, fallback: str = "sidestep_adapter") -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned[:80] or fallback


def run_fingerprint(cfg: TrainConfig, model_identity: str, dataset_identity: str) -> str:
    settings = {k: v for k, v in cfg.to_dict(include_run=False).items()
                if k not in LENGTH_FIELDS + BOOKKEEPING_FIELDS and k not in RUN_ONLY_FIELDS}
    if not cfg.fused_backward:  # added later: runs without it keep the folder names they had
        del settings["fused_backward"]
    what = {"model": model_identity, "dataset": dataset_identity, "settings": settings}
    if cfg.trains_lm:  # another planner LM is another run (runs that train the DiT alone keep their names)
        what["lm"] = _lm_identity(Path(cfg.lm))
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _lm_identity(path: Path) -> str:
    """The planner LM's content identity, made as the model's: another LM file, even of the same name and size, is
    another run (the core refuses to resume a run on a different LM)."""
    from sidestep_core.planner.loading import planner_identity

    try:
        return planner_identity(path)
    except (OSError, ValueError):
        return path.name  # training reports the missing or broken LM


@dataclass(frozen=True)
class RunPlan:
    out: Path
    action: str  # reuse | resume | fresh
    note: str = ""


def _length(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in LENGTH_FIELDS}


def read_marker(out: Path) -> Optional[dict]:
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(out: Path, cfg: TrainConfig, status: str, step: int, total: int) -> None:
    atomic_write_json(out / MARKER, {"status": status, "step": step, "total_steps": total, **_length(cfg)})


def has_run(out: Path) -> bool:
    return bool(st.list_checkpoints(out)) or (out / "final").exists()


def plan_run(root: Path, output_name: str, cfg: TrainConfig, model_identity: str, dataset_identity: str,
             resume: bool) -> RunPlan:
    out = Path(root) / f"{safe_name(output_name)}-{run_fingerprint(cfg, model_identity, dataset_identity)}"
    marker = read_marker(out)
    if (marker and marker.get("status") == "complete" and (out / "final").is_dir()
            and all(marker.get(k) == v for k, v in _length(cfg).items())):
        return RunPlan(out, "reuse", f"reusing the finished adapter in {out} (same model, dataset and settings)")
    if not has_run(out):
        return RunPlan(out, "fresh")
    if resume:
        return RunPlan(out, "resume", f"continuing the run in {out}")
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    aside = out.with_name(f"{out.name}.old-{n}")
    out.rename(aside)
    return RunPlan(out, "fresh", f"resume is off: the previous run was moved to {aside}")
