"""Training previews: files and TensorBoard audio, isolation (eval/train flags, every RNG, grad mode), and a training
run with previews equal to one without, step for step."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sidestep_core.audio.decode import decode_audio
from sidestep_core.inference.generate import frames_for
from sidestep_core.inference.previews import PreviewRenderer, load_preview_prompts, log_audio
from sidestep_core.training import train
from sidestep_core.training.adapters import find_adapter
from sidestep_core.training.loop import _Trainer
from train_helpers import fast_config, make_cache, single_thread  # noqa: F401

PROMPTS = [{"caption": "warm lofi", "lyrics": "", "seconds": 0.5, "seed": 11, "bpm": 80, "key": "E minor"},
           {"caption": "fast punk", "lyrics": "[verse]\nhey", "seconds": 0.3, "seed": 12, "name": "punk"}]


@pytest.fixture(scope="module")
def decoder_model(tiny_original):
    from sidestep_core.model import load_acestep

    return load_acestep(tiny_original, dtype=torch.float32, parts={"decoder", "null_condition_emb"}).model


@pytest.fixture(scope="module")
def renderer(tiny_original, tmp_path_factory):
    torch.set_num_threads(1)
    return PreviewRenderer.build(tiny_original, tmp_path_factory.mktemp("prev"), PROMPTS, every=2, device="cpu")


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ds") / "cache", frames=(40, 56), cond_len=(6, 9))


def test_prompt_lists(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompts": PROMPTS}))
    assert [p.caption for p in load_preview_prompts(f)] == ["warm lofi", "fast punk"]
    assert load_preview_prompts(str(f))[0].keyscale == "E minor"
    assert load_preview_prompts('["a", {"caption": "b", "seconds": 2}]')[1].seconds == 2.0
    assert load_preview_prompts(None) == [] and load_preview_prompts("") == []
    with pytest.raises(ValueError, match="prompt 0"):
        load_preview_prompts([{"lyrics": "no caption"}])
    with pytest.raises(ValueError, match="cannot read"):
        load_preview_prompts(tmp_path / "missing.json")


def test_render_writes_flac_json_and_tensorboard_audio(renderer, decoder_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "runs"))
    renderer.writer = writer
    try:
        paths = renderer.maybe_render(4, decoder_model.decoder)
    finally:
        renderer.writer = None
        writer.close()
    folder = renderer.out_dir / "previews" / "step_4"
    assert [p.name for p in paths] == ["00_warm_lofi.flac", "01_punk.flac"]
    for p, spec in zip(paths, PROMPTS):
        d = decode_audio(p)
        assert p.parent == folder and d.sample_rate == 48000 and d.source_channels == 2
        assert d.waveform.shape == (2, frames_for(spec["seconds"]) * 1920)
    doc = json.loads((folder / "previews.json").read_text())
    assert doc["step"] == 4 and doc["turbo"] and doc["settings"]["steps"] == 8
    assert [e["file"] for e in doc["previews"]] == ["00_warm_lofi.flac", "01_punk.flac"]
    acc = EventAccumulator(str(tmp_path / "runs"), size_guidance={"audio": 0})
    acc.Reload()
    assert sorted(acc.Tags()["audio"]) == ["preview/00_warm_lofi", "preview/01_punk"]
    clip = acc.Audio("preview/01_punk")[0]
    assert clip.step == 4 and clip.sample_rate == 48000 and clip.length_frames == frames_for(0.3) * 1920


def test_schedule(renderer, decoder_model):
    assert not renderer.due(0) and not renderer.due(3) and renderer.due(6)
    assert renderer.maybe_render(3, decoder_model.decoder) == []
    first = renderer.maybe_render(6, decoder_model.decoder)
    assert len(first) == 2
    assert renderer.maybe_render(6, decoder_model.decoder, force=True) == []  # already rendered
    assert len(renderer.maybe_render(7, decoder_model.decoder, force=True)) == 2


def test_render_is_isolated_and_deterministic(renderer, decoder_model):
    dec = decoder_model.decoder
    dec.train()
    dec.layers[1].eval()  # a submodule deliberately left in eval mode stays so
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = renderer.render(100, dec)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert dec.training and dec.layers[0].training and not dec.layers[1].training
    assert torch.is_grad_enabled()
    torch.manual_seed(999)
    b = renderer.render(101, dec)
    for pa, pb in zip(a.paths, b.paths):
        assert pa.read_bytes() == pb.read_bytes()  # same seed, same noise, whatever the global RNG
    dec.eval()


def test_bf16_base_with_fp32_adapter(renderer, tiny_original):
    """The training loop's bf16 layout: frozen bf16 decoder, fp32 LoRA, rendered under autocast."""
    from sidestep_core.model import load_acestep
    from sidestep_core.training.adapters import inject_adapter

    dec = load_acestep(tiny_original, dtype=torch.bfloat16, parts={"decoder"}).model.decoder
    adapter = inject_adapter(dec, fast_config(adapter="lora"))
    r = renderer.render(200, adapter.module)
    for p in r.paths:
        w = decode_audio(p).waveform
        assert torch.isfinite(w).all() and w.abs().max() > 0
    doc = json.loads((r.paths[0].parent / "previews.json").read_text())
    assert doc["dtype"] == "bfloat16"


def test_build_leaves_the_rng_alone_and_base_models_use_cfg(tiny_original, decoder_model, tmp_path):
    from sidestep_core.inference.generate import SamplerSettings

    torch.manual_seed(5)
    state = torch.get_rng_state()
    r = PreviewRenderer.build(tiny_original, tmp_path, PROMPTS[:1], every=1, device="cpu", variant="base",
                              settings=SamplerSettings(steps=2, guidance=3.0))
    assert torch.equal(state, torch.get_rng_state())
    assert not r.turbo and r.settings.steps == 2 and r.null is not None
    seen = []
    dec = decoder_model.decoder
    orig = dec.forward

    def spy(*a, **kw):
        seen.append(kw["hidden_states"].shape[0])
        return orig(*a, **kw)

    dec.forward = spy
    try:
        assert len(r.maybe_render(1, dec)) == 1
    finally:
        dec.forward = orig
    assert seen == [2, 2]  # [cond; null condition] at each of the 2 steps


def test_log_audio_without_writer_is_a_noop():
    assert log_audio(None, "x", torch.zeros(2, 10), 1) is False

    class Disabled:
        w = None

    assert log_audio(Disabled(), "x", torch.zeros(2, 10), 1) is False


# ----------------------------------------------------------------------------------------------------------
# the training loop
# ----------------------------------------------------------------------------------------------------------


def _train_with_hook(monkeypatch, hook, cfg, ckpt, data, out):
    """Run the real loop, calling ``hook(trainer, step)`` after every optimizer step (where the preview hook sits)."""
    orig = _Trainer._train_step

    def patched(self, group):
        res = orig(self, group)
        hook(self, self.step + 1)
        return res

    with monkeypatch.context() as m:
        m.setattr(_Trainer, "_train_step", patched)
        return train(cfg, ckpt, data, out)


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_training_with_previews_equals_training_without(tiny_original, two_clips, tmp_path, kind):
    """Adapter dropout (global RNG), CFG dropout and noise are on: previews every 2 steps must change nothing."""
    cfg = fast_config(adapter=kind, dropout=0.1, cfg_ratio=0.5, max_steps=6, learning_rate=5e-3)
    plain = train(cfg, tiny_original, two_clips, tmp_path / "plain")
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(PROMPTS))
    withp = train(cfg.replace(preview_every=2, preview_prompts=str(f)), tiny_original, two_clips, tmp_path / "prev")
    rendered = sorted(p.name for p in (tmp_path / "prev" / "previews").iterdir())
    assert rendered == ["step_2", "step_4", "step_6"]
    assert withp.losses == plain.losses
    a = load_file(str(find_adapter(tmp_path / "plain" / "final")[1]))
    b = load_file(str(find_adapter(tmp_path / "prev" / "final")[1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_equality_check_detects_a_disturbed_rng(monkeypatch, tiny_original, two_clips, tmp_path):
    """Control: a hook that draws from the global RNG (or leaves the model in eval) does change the run."""
    cfg = fast_config(adapter="lora", dropout=0.1, cfg_ratio=0.5, max_steps=4, learning_rate=5e-3)
    plain = train(cfg, tiny_original, two_clips, tmp_path / "plain")
    drawn = _train_with_hook(monkeypatch, lambda t, s: torch.rand(1), cfg, tiny_original, two_clips,
                             tmp_path / "rng")
    assert drawn.losses[0] == plain.losses[0] and drawn.losses != plain.losses
    left_eval = _train_with_hook(monkeypatch, lambda t, s: t.adapter.module.eval(), cfg, tiny_original, two_clips,
                                 tmp_path / "eval")
    assert left_eval.losses != plain.losses


# ----------------------------------------------------------------------------------------------------------
# train(step_hook=...): a generic rank-0 per-step hook, isolated like the previews
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_a_step_hook_that_renders_and_draws_randomness_changes_nothing(tiny_original, two_clips, renderer,
                                                                       tmp_path, kind):
    """The hook renders a real preview, draws from every global RNG, reseeds torch (as ComfyUI's noise does),
    switches the module to train mode and exports the live adapter — and the run equals one without a hook."""
    cfg = fast_config(adapter=kind, dropout=0.1, cfg_ratio=0.5, max_steps=5, learning_rate=5e-3)
    plain = train(cfg, tiny_original, two_clips, tmp_path / "plain")
    seen = []

    def hook(step, adapter):
        assert not torch.is_grad_enabled() and not adapter.module.training
        seen.append((step, len(adapter.comfyui_state_dict()[0])))
        if step % 2 == 0:
            renderer.render(step, adapter.module)
        torch.manual_seed(1234)
        torch.rand(3), random.random(), np.random.rand()
        adapter.module.train()

    hooked = train(cfg, tiny_original, two_clips, tmp_path / "hook", step_hook=hook)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and all(n > 0 for _, n in seen)
    assert hooked.losses == plain.losses
    a = load_file(str(find_adapter(tmp_path / "plain" / "final")[1]))
    b = load_file(str(find_adapter(tmp_path / "hook" / "final")[1]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "oft"])
def test_live_adapter_export_equals_the_saved_files_export(tiny_original, two_clips, tmp_path, kind):
    """``Adapter.comfyui_state_dict()`` (in memory, during training) is what exporting the saved adapter gives."""
    from sidestep_core.adapters import read_adapter_weights, to_comfyui_state_dict
    from sidestep_core.model import load_acestep

    cfg = fast_config(adapter=kind, max_steps=2, learning_rate=5e-2)
    live = {}

    def hook(step, adapter):
        live[step] = adapter.comfyui_state_dict()[0]

    train(cfg, tiny_original, two_clips, tmp_path / "run", step_hook=hook)
    base = load_acestep(tiny_original, dtype=torch.float32, parts={"decoder"}).model.decoder
    saved, _ = to_comfyui_state_dict(read_adapter_weights(tmp_path / "run" / "final"), base=base)
    got = live[2]
    assert got.keys() == saved.keys()
    for k in saved:
        assert got[k].device.type == "cpu" and not got[k].requires_grad
        torch.testing.assert_close(got[k].float(), saved[k].float(), rtol=1e-6, atol=1e-7, msg=k)
