"""Choosing a result by ear (``sidestep_core.inference.compare``, ``sidestep compare``): which adapters a selection
names in a real run (3 steps, a checkpoint each, EMA on, a validation split), the grid of renders, the table and the
loss chart with the compared checkpoints marked."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from sidestep_core.audio.decode import decode_audio
from sidestep_core.inference import compare as C
from sidestep_core.inference.generate import Generator, Prompt
from train_helpers import fast_config, make_cache, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def run_dir(tiny_original, tmp_path_factory):
    """A real 3-step LoRA run: checkpoints/step_1..3 (each with ema/), final (+ ema/), a validation loss."""
    from sidestep_core.training import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cmp_run")
    cache = make_cache(root / "cache", frames=(40, 48, 56, 44), cond_len=(6, 7, 9, 8))
    res = train(fast_config(max_steps=3, save_every=1, learning_rate=5e-2, ema_decay=0.5, val_split=0.25,
                            keep_checkpoints=0), tiny_original, cache, root / "out")
    assert res.status == "complete"
    return root / "out"


def labels(rows):
    return [r.label for r in rows]


def test_selections_name_the_runs_adapters(run_dir):
    everything = C.select_checkpoints(run_dir, "all")
    # the checkpoint of the last step holds final's weights: listed once, as final
    assert labels(everything) == ["step_1", "step_1/ema", "step_2", "step_2/ema", "final", "ema"]
    assert [r.step for r in everything] == [1, 1, 2, 2, 3, 3]
    assert labels(C.select_checkpoints(run_dir, "last 2")) == ["step_2", "final"]
    assert labels(C.select_checkpoints(run_dir, "last 3")) == ["step_1", "step_2", "final"]
    assert labels(C.select_checkpoints(run_dir, "final, step_1 ema")) == ["final", "step_1", "ema"]
    assert labels(C.select_checkpoints(run_dir, "last, step_2/ema, last 1")) == ["step_3", "step_2/ema", "final"]
    assert labels(C.select_checkpoints(run_dir, "")) == labels(everything)
    with pytest.raises(ValueError, match="no checkpoint 'step_9'"):
        C.select_checkpoints(run_dir, "step_9")
    with pytest.raises(ValueError, match="unknown checkpoint choice"):
        C.select_checkpoints(run_dir, "best")
    # a plain adapter folder: itself, and its EMA twin
    adapter = run_dir / "final"
    assert labels(C.select_checkpoints(adapter, "all")) == ["final"]
    assert labels(C.select_checkpoints(adapter, "final, ema")) == ["final", "final/ema"]
    assert C.run_of(run_dir / "checkpoints" / "step_2" / "ema") == run_dir


def test_strengths_plan_and_table():
    assert C.parse_strengths("0.5, 0.8 1") == [0.5, 0.8, 1.0]
    assert C.parse_strengths([1, 1.0, 0]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a number"):
        C.parse_strengths("0.5, loud")
    with pytest.raises(ValueError, match="at least one"):
        C.parse_strengths(" , ")
    rows = [C.Row("step_1", C.Path("a"), 1), C.Row("final", C.Path("b"), 3)]
    plan = C.make_plan(rows, [0.0, 0.5, 1.0])
    assert plan.renders() == [(None, 0.0), (0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]  # the base model once
    assert len(plan.cells()) == 6 and plan.key(1, 0) == (None, 0.0) and plan.key(1, 2) == (1, 1.0)
    text = C.table(plan, lambda r, c: f"{r}{c}", val={3: 0.25}, markdown=False)
    lines = text.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "val", "loss", "strength", "0", "strength", "0.5",
                                "strength", "1"]
    assert lines[2].split() == ["final", "3", "0.25000", "10", "11", "12"]
    assert C.table(plan, lambda r, c: "x").startswith("| checkpoint | step | strength 0 |")
    # the same label from two runs is told apart by the run folder
    twice = C.make_plan([C.Row("final", C.Path("r1/final"), 3), C.Row("final", C.Path("r2/final"), 3)], [1.0])
    assert labels(twice.rows) == ["final (r1)", "final (r2)"]


def test_cost_from_a_recorded_preview(tmp_path):
    assert C.recorded_render_seconds(tmp_path) is None
    (tmp_path / "previews").mkdir()
    (tmp_path / "previews" / C.TIMING_FILE).write_text(json.dumps({"seconds": 2.0, "steps": 8, "frames": 100,
                                                                  "step": 40}))
    rec = C.recorded_render_seconds(tmp_path)
    assert C.estimate_seconds(rec, 8, 100) == 2.0
    assert C.estimate_seconds(rec, 4, 200) == 2.0  # half the steps, twice the length
    assert C.cost_line(9, 2.0, "from the preview of step 40") == \
        "9 render(s) × about 2.0 s (from the preview of step 40) ≈ 18s"
    assert "measured on the first" in C.cost_line(9, None, "")


def test_chart_marks_the_compared_checkpoints(run_dir):
    val = C.val_loss_at(run_dir)
    assert sorted(val) == [1, 2, 3] and all(v > 0 for v in val.values())  # a validation loss at each checkpoint
    rows = C.select_checkpoints(run_dir, "step_1, final")
    plain = C.chart(run_dir, [])
    marked = C.chart(run_dir, rows)
    assert marked.size == (768, 384)
    a, b = np.asarray(plain), np.asarray(marked)
    assert (a != b).any(axis=-1).sum() > 100  # two labelled lines drawn
    from sidestep_core.training.chart import MARK, VAL

    colours = set(map(tuple, b.reshape(-1, 3).tolist()))
    assert MARK in colours and VAL in colours
    assert (run_dir / "loss.png").is_file()  # every run folder has one


def test_render_grid_is_one_seed_and_leaves_no_adapter(tiny_original, run_dir):
    gen = Generator.load(tiny_original / "acestep-v15-turbo", device="cpu")
    p = Prompt("lofi beat", seconds=0.4, seed=5)
    plan = C.make_plan(C.select_checkpoints(run_dir, "step_1, final"), [0.0, 1.0])
    seen = []
    out = C.render(gen, p, plan, before=lambda i, row, s: seen.append(C.cell_name(row, s)))
    assert seen == ["base", "step_1_x1", "final_x1"]
    assert gen.adapter is None
    base = gen.generate(p)
    assert torch.equal(out[(None, 0.0)].waveform, base.waveform)
    gen.set_adapter(run_dir / "final", 1.0)
    assert torch.equal(out[(1, 1.0)].waveform, gen.generate(p).waveform)
    gen.remove_adapter()
    assert not torch.equal(out[(0, 1.0)].waveform, out[(1, 1.0)].waveform)


def _cli(name: str, *argv: str) -> int:
    from sidestep_core.commands import generate as cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd.register(sub, name)
    return cmd.run(parser.parse_args([name, *argv]))


def test_compare_cli_writes_the_grid_table_and_chart(tiny_original, run_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cmp"
    rc = _cli("compare", "--checkpoint", str(tiny_original / "acestep-v15-turbo"), "--caption", "x",
              "--seconds", "0.4", "--adapter", str(run_dir), "--checkpoints", "last", "2", "ema",
              "--strengths", "0", "0.5", "1", "--out", str(out), "--device", "cpu")
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["step_2", "final", "ema"]
    assert doc["strengths"] == [0.0, 0.5, 1.0]
    assert len(doc["renders"]) == 1 + 3 * 2  # the base model once
    assert doc["grid"][0][0] == doc["grid"][2][0] == "00_base.flac"
    assert doc["grid"][1][2] == "04_final_x1.flac"
    md = (out / "compare.md").read_text()
    for r in doc["renders"]:
        assert (out / r["file"]).is_file() and r["file"] in md
    assert "val loss" in md and "compare.png" in md
    with Image.open(out / "compare.png") as img:
        assert img.size == (768, 384)
    assert decode_audio(out / doc["grid"][2][1]).waveform.shape == (2, 10 * 1920)
    err = capsys.readouterr().err
    assert "cost: 7 render(s)" in err and "render 7/7: ema_x1" in err
