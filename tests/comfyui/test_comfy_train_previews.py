"""Train Adapter with previews through the user's graph, in-process: a ComfyUI MODEL (comfyui-min DiT), positive and
negative CONDITIONING, a LATENT and a VAE. Every N steps the node patches a clone of the MODEL with the live adapter
(ComfyUI's model patcher), samples with ComfyUI's sampler and decodes as VAEDecodeAudio does. The FLAC files land in
``<run>/previews/``, the node's UI output plays the last one, and the adapter equals a run without previews."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as H

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: train_helpers
SECONDS = 0.4


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    import folder_paths
    from comfy_api.latest import _io
    from pack_loader import pack_module
    from sidestep_core.model import load_acestep
    from train_helpers import make_cache

    ext, calls, values = pack_module("train_adapter"), pack_module("calls"), pack_module("values")
    models = H.write_model_set()
    dit = models / "diffusion_models" / H.DIT_NAME
    out = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    ext.TrainAdapter.hidden = _io.HiddenHolder.from_dict({})
    info = load_acestep(dit, parts=set()).info
    bundle = calls.bundle_from_info(dit, "diffusion_models/" + H.DIT_NAME, info, None)
    cache = make_cache(tmp_path_factory.mktemp("ds") / "cache", frames=(24, 32), cond_len=(5, 7), hidden=2048)
    dataset = values.DatasetRef(cache, 2, 2, 0, (), "ds-test")
    graph = {f"preview_{k}": v for k, v in H.generation_values(comfy, models, SECONDS).items()}
    yield ext, bundle, dataset, graph, out
    comfy.model_management.unload_all_models()


def settings(name: str, **kw):
    return dict(adapter="lora", rank=4, alpha=4.0, max_steps=3, learning_rate=1e-2, optimizer="adamw",
                scheduler="constant", batch_size=1, crop_seconds=0.0, gradient_checkpointing=False, cfg_ratio=0.5,
                dropout=0.1, seed=7, save_every=0, output_name=name, resume=False, estimate_steps=0,
                tensorboard=False, precision="fp32", warmup_steps=0, **kw)


def adapter_tensors(ref) -> dict:
    from sidestep_core.training.adapters import find_adapter

    return load_file(str(find_adapter(ref.path)[1]))


def test_previews_render_the_users_graph_and_change_nothing(setup):
    from sidestep_core.audio.decode import decode_audio

    ext, bundle, dataset, graph, out = setup
    torch.set_num_threads(1)
    plain = ext.TrainAdapter.execute(bundle, dataset, **settings("plain"))
    with_prev = ext.TrainAdapter.execute(bundle, dataset, **settings("prev", preview_every=2, preview_seed=5),
                                         **graph)
    run = with_prev.result[0].run_dir
    files = sorted(p.name for p in (run / "previews").glob("*.flac"))
    assert files == ["step_2.flac", "step_3.flac"]  # every 2 steps, and the last step
    timing = json.loads((run / "previews" / "timing.json").read_text())  # what the newest one took (Compare)
    assert timing["step"] == 3 and timing["seconds"] > 0 and timing["frames"] == round(SECONDS * 48000 / 1920)
    for name in files:
        dec = decode_audio(run / "previews" / name)
        assert dec.source_rate == 48000 and dec.source_channels == 2
        assert dec.waveform.shape[-1] == round(SECONDS * 48000 / 1920) * 1920
        assert torch.isfinite(dec.waveform).all() and dec.waveform.abs().max() > 0
    ui_out = with_prev.ui
    assert ui_out["audio"] and ui_out["audio"][0]["type"] == "temp"
    assert "preview of step 3" in ui_out["text"][0] and "2 preview(s)" in ui_out["text"][0]
    ref = ui_out["audio"][0]
    temp = Path(ext.folder_paths.get_temp_directory()) / ref["subfolder"] / ref["filename"]
    shown = decode_audio(temp).waveform
    last = decode_audio(run / "previews" / "step_3.flac").waveform
    assert shown.shape == last.shape and (shown - last).abs().max() < 1e-3
    assert "audio" not in (plain.ui or {})
    a, b = adapter_tensors(plain.result[0]), adapter_tensors(with_prev.result[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the previews differ between steps (the adapter changed) but not the noise: same seed, same graph
    s2, s3 = (decode_audio(run / "previews" / n).waveform for n in files)
    assert not torch.equal(s2, s3)
    # queued again: nothing trained, the stored last preview is shown
    again = ext.TrainAdapter.execute(bundle, dataset, **{**settings("prev", preview_every=2, preview_seed=5),
                                                         "resume": True}, **graph)
    assert "reusing" in again.ui["text"][0] and again.ui["audio"]


def test_a_half_wired_preview_graph_is_refused(setup):
    ext, bundle, dataset, graph, _ = setup
    with pytest.raises(ValueError, match="preview_vae"):
        ext.TrainAdapter.execute(bundle, dataset, **settings("half"), **{**graph, "preview_vae": None})


def test_the_node_lists_the_samples_it_left_out(setup, tmp_path):
    """A damaged sample in the dataset folder: the run trains on the rest and the node's result names the file (and
    Estimate Gradients' does)."""
    from pack_loader import pack_module
    from train_helpers import make_cache

    ext, bundle, _, _, _ = setup
    cache = make_cache(tmp_path / "cache", frames=(24, 32, 28), cond_len=(5, 7, 6), hidden=2048)
    damaged = cache / json.loads((cache / "manifest.json").read_text())["samples"][1]["file"]
    damaged.write_bytes(damaged.read_bytes()[:64])
    dataset = pack_module("values").DatasetRef(cache, 3, 3, 0, (), "ds-damaged")
    out = ext.TrainAdapter.execute(bundle, dataset, **{**settings("damaged"), "max_steps": 2})
    assert out.result[0].steps == 2
    assert f"skipped {damaged}: not a readable safetensors sample" in out.ui["text"][0]
    # Estimate Gradients on the same folder: its result lists the file too
    from comfy_api.latest import _io

    estimate = pack_module("estimate_gradients").EstimateGradients
    estimate.hidden = _io.HiddenHolder.from_dict({})
    ranked = estimate.execute(bundle, dataset, batches=1, runs=1)
    assert ranked.result[0].targets and f"skipped {damaged}" in ranked.ui.as_dict()["text"][0]
