"""EMA of the adapter weights: the average's maths, ema/ folders beside every checkpoint and final/, and exact
resume (an interrupted and resumed run writes bit-identical EMA tensors)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sidestep_core.training import train
from sidestep_core.training.adapters import find_adapter
from train_helpers import fast_config, make_cache, single_thread, stop_after  # noqa: F401


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ema") / "cache", frames=(40, 56, 48), cond_len=(6, 9, 7), seed=3)


def _tensors(folder):
    kind, weights = find_adapter(folder)
    return kind, load_file(str(weights))


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_ema_folders_hold_the_average_of_the_checkpoints(tiny_original, clips, tmp_path, kind):
    out = tmp_path / "run"
    cfg = fast_config(adapter=kind, max_steps=4, save_every=1, keep_checkpoints=0, ema_decay=0.75,
                      ema_start_step=2)
    train(cfg, tiny_original, clips, out)
    expected = None
    for step in range(1, 5):
        ckpt = out / "checkpoints" / f"step_{step}"
        found, w = _tensors(ckpt)
        ema_kind, ema = _tensors(ckpt / "ema")
        assert found == ema_kind == kind and ema.keys() == w.keys()
        # follows the weights through step 2, averages after
        expected = w if step <= 2 else {k: 0.75 * expected[k] + 0.25 * w[k] for k in w}
        for k in w:
            torch.testing.assert_close(ema[k], expected[k], rtol=1e-5, atol=1e-7)
        assert step <= 2 or any(not torch.equal(ema[k], w[k]) for k in w)
    _, final_ema = _tensors(out / "final" / "ema")
    _, last_ema = _tensors(out / "checkpoints" / "step_4" / "ema")
    assert all(torch.equal(final_ema[k], last_ema[k]) for k in final_ema)
    with safe_open(str(find_adapter(out / "final" / "ema")[1]), framework="pt") as f:
        meta = f.metadata()
    assert meta["sidestep_ema_decay"] == "0.75" and meta["sidestep_adapter"] == kind


def test_ema_resume_is_bit_exact(tiny_original, clips, tmp_path):
    cfg = fast_config(adapter="lora", dropout=0.1, cfg_ratio=0.5, batch_size=2, max_steps=6, save_every=0,
                      ema_decay=0.9, ema_start_step=1, learning_rate=5e-3)
    train(cfg, tiny_original, clips, tmp_path / "full")
    part = train(cfg, tiny_original, clips, tmp_path / "split", should_stop=stop_after(3))
    assert part.step == 3 and (tmp_path / "split" / "checkpoints" / "step_3" / "ema").is_dir()
    train(cfg.replace(resume="auto"), tiny_original, clips, tmp_path / "split")
    for sub in ("final/ema", "checkpoints/step_6/ema", "final"):
        _, a = _tensors(tmp_path / "full" / sub)
        _, b = _tensors(tmp_path / "split" / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)


def test_ema_off_writes_no_ema_folder_and_bad_decay_is_refused(tiny_original, clips, tmp_path):
    train(fast_config(max_steps=2), tiny_original, clips, tmp_path / "plain")
    assert not (tmp_path / "plain" / "final" / "ema").exists()
    with pytest.raises(ValueError, match="ema_decay"):
        fast_config(ema_decay=1.0).validate()
