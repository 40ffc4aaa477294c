"""Data-parallel training through accelerate with two CPU processes (gloo): both ranks train, rank 0 alone writes.

``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up, so the test uses the
multi-process launcher (torch.distributed.run underneath) and keeps the model on the CPU with ``--device cpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import make_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes(tiny_original, tmp_path):
    data = make_cache(tmp_path / "ds", frames=(40, 56, 48), cond_len=(6, 9, 7))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "sidestep_core", "train", "--checkpoint", str(tiny_original), "--dataset", str(data),
           "--out", str(out), "--rank", "4", "--alpha", "4", "--max-steps", "4", "--save-every", "2",
           "--precision", "fp32", "--crop-seconds", "0", "--estimate-steps", "0", "--no-tensorboard", "--plain",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("done: 4 steps") == 1  # only rank 0 reports
    conf = json.loads((out / "training_config.json").read_text())
    assert conf["plan"]["processes"] == 2
    assert conf["plan"]["steps_per_epoch"] == 2  # 3 clips over 2 ranks (padded to 4 batches)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    state = json.loads((out / "checkpoints" / "step_4" / "training_state.json").read_text())["state"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # gathered from both ranks
    rows = (out / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # header + one row per step, written once
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
