"""Checkpoints: the inference-ready adapter plus the full training state, in safetensors + JSON (no pickle).

A checkpoint folder ``checkpoints/step_N/`` holds the adapter files, ``training_state.safetensors`` (optimizer
tensors, RNG states) and ``training_state.json`` (step, epoch, data position, optimizer/scheduler scalars, python
and numpy RNG, …). The folder is assembled under a temporary name and renamed into place, so a crash leaves either
the previous checkpoint set or the complete new one; ``training_state.json`` is written last and marks it valid.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open

from ..fsutil import atomic_save_file, atomic_write_json

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointStateError(ValueError):
    """A training checkpoint that cannot be resumed from (message starts with its path)."""


# ----------------------------------------------------------------------------------------------------------
# JSON-safe encoding of nested state (tensors go to safetensors under a dotted key)
# ----------------------------------------------------------------------------------------------------------


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64) if value.dtype == np.uint32
                                        else np.ascontiguousarray(value))
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__intdict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in the training state ({key})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__intdict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__intdict__"]}
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_python_state(s: Any) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step}"


def write_dir_atomically(final: Path, fill) -> Path:
    """Create folder ``final`` atomically: ``fill(tmp)`` writes everything into a hidden sibling folder that is then
    renamed into place (an existing ``final`` is replaced as a whole, never mixed with new files)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_checkpoint(final: Path, write_adapter, state: dict[str, Any]) -> Path:
    """A checkpoint folder: ``write_adapter(folder)`` writes the inference-ready adapter, then the training state
    (tensors first, the JSON that marks the checkpoint complete last)."""

    def fill(tmp: Path) -> None:
        write_adapter(tmp)
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(state, "state", tensors)
        atomic_save_file(tensors, tmp / STATE_TENSORS, {"format": "sidestep-training-state"})
        atomic_write_json(tmp / STATE_JSON, {"format": FORMAT, "complete": True, "state": encoded})

    return write_dir_atomically(final, fill)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The decoded training state of a checkpoint folder; raises ``CheckpointStateError`` if it is unusable."""
    import json

    folder = Path(folder)
    jpath, tpath = folder / STATE_JSON, folder / STATE_TENSORS
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointStateError(f"{jpath}: missing or unreadable training state ({exc})") from exc
    if not isinstance(doc, dict) or not doc.get("complete") or doc.get("format") != FORMAT:
        raise CheckpointStateError(f"{jpath}: incomplete or unknown training-state format")
    try:
        with safe_open(str(tpath), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointStateError(f"{tpath}: unreadable training tensors ({exc})") from exc
    try:
        state = _decode(doc["state"], tensors)
    except KeyError as exc:
        raise CheckpointStateError(f"{tpath}: tensor {exc} referenced by {jpath.name} is missing") from exc
    if isinstance(state, dict):
        _check_adapter_files(folder, state)
    return state


def _check_adapter_files(folder: Path, state: dict[str, Any]) -> None:
    """The adapters a checkpoint's state says it holds must be there, readable and finite: resume loads them, so a
    damaged one makes the whole checkpoint damaged (and ``--resume auto`` falls back past it)."""
    from ..planner.lm_adapter import LM_FOLDER, read_lm_adapter
    from .adapters import read_adapter

    for present, where, read in ((state.get("adapter") is not None, folder, read_adapter),
                                 (state.get("lm") is not None, folder / LM_FOLDER, read_lm_adapter)):
        if not present:
            continue
        try:
            tensors = read(where).tensors
        except ValueError as exc:  # missing, truncated, not safetensors, an unreadable config
            raise CheckpointStateError(str(exc)) from None
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointStateError(f"{where}: adapter tensor {key} holds NaN or infinite values")


# Optimizer state tensors shaped like their parameter (AdamW, Prodigy, momentum; Prodigy's p0 and s may be sliced).
_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check_state(state: Any, folder: Path, params: list[torch.nn.Parameter]) -> None:
    """Refuse a decoded training state that cannot be resumed from — tampered or damaged — before anything of it is
    applied: the step must be the folder's own (``step_N``), counters non-negative integers, the RNG states
    loadable and every optimizer moment shaped like its parameter and finite."""
    folder = Path(folder)

    def bad(what: str) -> CheckpointStateError:
        return CheckpointStateError(f"{folder}: damaged training state: {what}")

    if not isinstance(state, dict):
        raise bad("not a mapping")
    for key in ("step", "epoch", "batch_pos"):
        v = state.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"{key} is {v!r}, not a non-negative integer")
    m = _STEP_DIR.match(folder.name)
    if m and int(m.group(1)) != state["step"]:
        raise bad(f"step {state['step']} in a folder named {folder.name}")
    try:
        saved = state["optimizer"]["state"]
        groups = state["optimizer"]["param_groups"]
        rngs = list(state["rng"])
        smoother = dict(state["smoother"])
        float(smoother.get("value", 0.0)), int(smoother.get("count", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"missing or malformed {exc}") from None
    if not rngs:
        raise bad("no RNG state")
    sched = state.get("schedule")
    if sched is not None:
        ints = [sched.get(k) if isinstance(sched, dict) else None for k in ("total", "warmup", "anchor_step")]
        progress = sched.get("anchor_progress") if isinstance(sched, dict) else None
        if (any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints) or ints[0] < 1
                or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0):
            raise bad(f"learning-rate schedule {sched!r}")
    for rng in rngs:
        _check_rng(rng, bad)
    index = [i for g in groups for i in g.get("params", [])]
    if sorted(index) != list(range(len(params))):
        raise bad(f"optimizer state for {len(index)} parameters, the adapter has {len(params)}")
    for key, entry in saved.items():
        try:
            p = params[int(key)]
        except (ValueError, IndexError):
            raise bad(f"optimizer state for unknown parameter {key!r}") from None
        if not isinstance(entry, dict):
            raise bad(f"optimizer state of parameter {key} is not a mapping")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name in _PER_ELEMENT and tuple(value.shape) != tuple(p.shape):
                raise bad(f"optimizer {name} of parameter {key} has shape {tuple(value.shape)}, the parameter "
                          f"{tuple(p.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise bad(f"optimizer {name} of parameter {key} holds NaN or infinite values")


def _check_rng(rng: Any, bad) -> None:
    """Load each generator's state into a scratch generator of the same kind (nothing global changes)."""
    try:
        random.Random().setstate(_to_python_state(rng["python"]))
        np.random.RandomState().set_state(rng["numpy"])
        torch.Generator().set_state(rng["torch_cpu"])
    except Exception as exc:  # each library raises its own type for a malformed state
        raise bad(f"unusable RNG state ({type(exc).__name__}: {exc})") from None


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder under ``OUT/checkpoints`` (valid or not), by step."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def is_valid(folder: Path) -> bool:
    try:
        read_checkpoint(folder)
    except CheckpointStateError:
        return False
    return True


def latest_valid_checkpoint(out: Path) -> Optional[Path]:
    for _, folder in reversed(list_checkpoints(out)):
        if is_valid(folder):
            return folder
    return None


def prune_checkpoints(out: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never ``protect``); returns what was removed."""
    if keep <= 0:
        return []
    ckpts = list_checkpoints(out)
    removed = []
    for _, folder in ckpts[:-keep]:
        if folder.resolve() != Path(protect).resolve():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# ----------------------------------------------------------------------------------------------------------
# optimizer
# ----------------------------------------------------------------------------------------------------------


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict[str, Any], source: str) -> None:
    sd = {"state": {int(k): v for k, v in saved["state"].items()}, "param_groups": saved["param_groups"]}
    n_saved = [len(g["params"]) for g in sd["param_groups"]]
    n_now = [len(g["params"]) for g in opt.param_groups]
    if n_saved != n_now:
        raise CheckpointStateError(
            f"{source}: optimizer state is for parameter groups of sizes {n_saved}, the model has {n_now}"
        )
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointStateError(f"{source}: optimizer state does not fit ({exc})") from exc
