"""Compare Adapters in-process, on the comfyui-min model: a Train Adapter run with previews (a checkpoint each step),
then 3 checkpoints × 3 strengths rendered through ComfyUI's model patcher and sampler with one seed. The audio is
one batch of 9 in grid order, each cell equals rendering that checkpoint at that strength on its own, the cost is
stated from the run's recorded preview time, the table and chart name the checkpoints, and Cancel stops it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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

    train, cmp = pack_module("train_adapter"), pack_module("compare_adapters")
    calls, values = pack_module("calls"), pack_module("values")
    models = H.write_model_set()
    dit = models / "diffusion_models" / H.DIT_NAME
    out = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(out))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    train.TrainAdapter.hidden = _io.HiddenHolder.from_dict({})
    cmp.CompareAdapters.hidden = _io.HiddenHolder.from_dict({"unique_id": "7"})
    info = load_acestep(dit, parts=set()).info
    bundle = calls.bundle_from_info(dit, "diffusion_models/" + H.DIT_NAME, info, None)
    cache = make_cache(tmp_path_factory.mktemp("ds") / "cache", frames=(24, 32), cond_len=(5, 7), hidden=2048)
    dataset = values.DatasetRef(cache, 2, 2, 0, (), "ds-cmp")
    graph = H.generation_values(comfy, models, SECONDS)
    torch.set_num_threads(1)
    trained = train.TrainAdapter.execute(
        bundle, dataset, adapter="lora", rank=4, alpha=4.0, max_steps=3, learning_rate=5e-2, optimizer="adamw",
        scheduler="constant", batch_size=1, crop_seconds=0.0, gradient_checkpointing=False, cfg_ratio=0.5,
        dropout=0.0, seed=7, save_every=1, output_name="cmp", resume=False, estimate_steps=0, tensorboard=False,
        precision="fp32", warmup_steps=0, preview_every=3, preview_steps=1, preview_seed=5,
        **{f"preview_{k}": v for k, v in graph.items()})
    yield cmp, trained.result[0], graph, out
    comfy.model_management.unload_all_models()


def test_compare_renders_the_grid_as_one_batch(setup):
    from sidestep_core.inference.compare import select_checkpoints

    cmp, adapter, graph, out = setup
    assert (adapter.run_dir / "previews" / "timing.json").is_file()  # Train Adapter recorded its preview time
    res = cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="last 3", strengths="0.5, 0.8, 1.0",
                                      seed=11, steps=1, cfg=1.0, sampler="euler", scheduler="simple")
    audio, image, table = res.result
    frames = round(SECONDS * 48000 / 1920)
    assert audio["waveform"].shape == (9, 2, frames * 1920) and audio["sample_rate"] == 48000
    assert torch.isfinite(audio["waveform"]).all()
    grid = res.ui["sidestep_grid"][0]
    assert grid["rows"] == ["step_1", "step_2", "final"] and grid["strengths"] == [0.5, 0.8, 1.0]
    assert grid["cost"].startswith("9 render(s) × about") and "preview of step 3" in grid["cost"]
    files = [c for row in grid["cells"] for c in row]
    assert len({c["filename"] for c in files}) == 9
    assert all((out / c["subfolder"] / c["filename"]).is_file() and c["type"] == "output" for c in files)
    assert image.shape == (1, 384, 768, 3)
    lines = table.splitlines()
    assert "9 render(s)" in lines[0] and "strength 0.8" in table and any(x.startswith("final ") for x in lines)

    # a cell is that checkpoint at that strength, rendered alone with the same seed; cells differ by both
    wave = audio["waveform"].view(3, 3, 2, -1)
    assert not torch.equal(wave[0, 2], wave[2, 2]) and not torch.equal(wave[2, 0], wave[2, 2])
    final = select_checkpoints(adapter.run_dir, "final")
    alone = cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="final", strengths="0.8", seed=11,
                                        steps=1, cfg=1.0, sampler="euler", scheduler="simple")
    assert [r.label for r in final] == alone.ui["sidestep_grid"][0]["rows"]
    torch.testing.assert_close(alone.result[0]["waveform"][0], wave[2, 1], rtol=1e-4, atol=1e-5)


def test_strength_zero_is_the_base_model_once_and_files_compare_too(setup):
    import folder_paths

    cmp, adapter, graph, out = setup
    loras = out.parent / "loras_cmp"
    loras.mkdir(exist_ok=True)
    lora = loras / "my_style.safetensors"
    lora.write_bytes(H.write_test_lora().read_bytes())
    folder_paths.add_model_folder_path("loras", str(loras))
    res = cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="final", strengths="0, 1", seed=11,
                                      steps=1, cfg=1.0, sampler="euler", scheduler="simple",
                                      lora_names="my_style.safetensors\n")
    grid = res.ui["sidestep_grid"][0]
    assert grid["rows"] == ["final", "my_style"]
    assert grid["cells"][0][0] == grid["cells"][1][0]  # the base model, rendered once
    assert grid["cost"].startswith("3 render(s)")
    wave = res.result[0]["waveform"]
    assert wave.shape[0] == 4 and torch.equal(wave[0], wave[2]) and not torch.equal(wave[1], wave[3])


def test_cancel_stops_before_the_next_render(setup):
    import comfy.model_management as mm

    cmp, adapter, graph, _ = setup
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="all", strengths="1", seed=0,
                                        steps=1, cfg=1.0, sampler="euler", scheduler="simple")
    finally:
        mm.interrupt_current_processing(False)


def test_a_selection_the_run_does_not_have_is_refused(setup):
    cmp, adapter, graph, _ = setup
    with pytest.raises(ValueError, match="step_9"):
        cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="step_9", strengths="1", seed=0, steps=1,
                                    cfg=1.0, sampler="euler", scheduler="simple")
