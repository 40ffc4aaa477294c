"""Train Adapter in-process with ``train_models`` both: the tiny planner LM picked from ComfyUI's text_encoders
folder (``planner_lm`` auto lists only planner LMs), both adapters in the run, the LM's in ``final/lm``; an LM asked
for but absent is a clear error naming where to put one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import comfy_harness as H

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: train_helpers


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    import folder_paths
    from comfy_api.latest import _io
    from pack_loader import pack_module
    from sidestep_core.data.cache import WORK_DIR, write_safetensors
    from sidestep_core.data.preprocess import SILENCE_CACHE
    from sidestep_core.model import load_acestep
    from sidestep_core.planner import make_tiny_planner
    from sidestep_core.vae import load_vae, silence_latent_from_vae
    from train_helpers import make_cache

    ext, calls, values, glue = (pack_module(m) for m in ("train_adapter", "calls", "values", "comfy_glue"))
    models = H.write_model_set()
    dit = models / "diffusion_models" / H.DIT_NAME
    out = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(out))
    ext.TrainAdapter.hidden = _io.HiddenHolder.from_dict({})
    info = load_acestep(dit, parts=set()).info
    bundle = calls.bundle_from_info(dit, "diffusion_models/" + H.DIT_NAME, info, None)
    cache = make_cache(tmp_path_factory.mktemp("ds") / "cache", frames=(24, 32), cond_len=(5, 7), hidden=2048)
    # what preprocessing keeps for a layout without silence_latent.pt (the LM's codes pad with it)
    silence = silence_latent_from_vae(load_vae(models / "vae" / H.VAE_NAME, dtype=torch.float32))
    write_safetensors(cache / WORK_DIR / SILENCE_CACHE, {"silence_latent": silence}, {"vae": "test"})
    dataset = values.DatasetRef(cache, 2, 2, 0, (), "ds-test")
    lm_root = tmp_path_factory.mktemp("lm")
    lm_file = make_tiny_planner(lm_root, "comfyui-split", 0)
    yield ext, glue, bundle, dataset, lm_file
    comfy.model_management.unload_all_models()


def settings(name: str, **kw):
    return dict(adapter="lora", rank=4, alpha=4.0, max_steps=2, learning_rate=1e-2, scheduler="constant",
                batch_size=1, crop_seconds=0.0, cfg_ratio=0.5, dropout=0.0, seed=7, save_every=0, output_name=name,
                resume=False, estimate_steps=0, tensorboard=False, precision="fp32", warmup_steps=0,
                train_models="both", lm_rank=4, **kw)


def test_train_adapter_trains_the_dit_and_the_planner_lm(setup):
    import folder_paths

    ext, glue, bundle, dataset, lm_file = setup
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="no 5 Hz planner LM found"):
        ext.TrainAdapter.execute(bundle, dataset, **settings("no_lm"))
    folder_paths.add_model_folder_path("text_encoders", str(lm_file.parent), is_default=True)
    assert glue.dynamic_options("planner_lms") == [lm_file.name]  # the 0.6B encoder is not listed
    out = ext.TrainAdapter.execute(bundle, dataset, **settings("both"))
    ref = out.result[0]
    lines = out.ui["text"][0]
    assert "lora rank 4 + planner LM LoRA rank 4, 2 steps (complete)" in lines and "final/lm" in lines, lines
    assert (ref.path / "adapter_model.safetensors").is_file()
    assert (ref.path / "lm" / "adapter_model.safetensors").is_file()
    from sidestep_core.planner.lm_adapter import read_lm_adapter

    saved = read_lm_adapter(ref.path / "lm")
    assert saved.shape["hidden_size"] == 32 and saved.metadata["sidestep_steps"] == "2"
    # Export Adapter writes the DiT's file and says why the tiny LM's adapter has no ComfyUI form
    import folder_paths as fp
    from pack_loader import pack_module

    loras = Path(fp.get_output_directory()) / "loras"
    exported = pack_module("export_adapter").ExportAdapter.execute(ref, name="both", directory=str(loras))
    assert Path(exported.result[0]).name == "both.safetensors" and (loras / "both.safetensors").is_file()
    assert "ComfyUI runs only the 1.7B (width 2048) and 4B" in "\n".join(exported.ui.as_dict()["text"])


def test_previews_run_with_audio_codes_while_both_adapters_train(comfy, setup, tmp_path):
    """The preview graph's positive conditioning carries audio codes (TextEncodeAceStepAudio1.5 with
    generate_audio_codes on): each preview samples the DiT, adapter applied, on those codes while the planner LM
    trains beside it. (The codes themselves come from the LM as it was when the graph encoded them.)"""
    import folder_paths

    ext, glue, bundle, dataset, lm_file = setup
    folder_paths.add_model_folder_path("text_encoders", str(lm_file.parent), is_default=True)
    models = H.write_model_set()
    patcher = comfy.sd.load_diffusion_model(str(models / "diffusion_models" / H.DIT_NAME),
                                            model_options={"dtype": torch.float32})
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae" / H.VAE_NAME)))
    g = torch.Generator().manual_seed(3)
    frames = 10  # 0.4 s
    with torch.inference_mode():
        cond = torch.randn(1, 6, 1024, generator=g) * 0.1
        lyrics = torch.randn(1, 5, 1024, generator=g) * 0.1
        codes = torch.randint(0, 64000, (frames // 5,), generator=g).tolist()
        positive = [[cond, {"conditioning_lyrics": lyrics, "audio_codes": [codes]}]]
        negative = [[torch.zeros_like(cond), {"conditioning_lyrics": torch.zeros_like(lyrics)}]]
        latent = {"samples": torch.zeros(1, 64, frames), "type": "audio"}
    out = ext.TrainAdapter.execute(bundle, dataset, **settings("codes_previews", preview_every=2, preview_seed=1),
                                   preview_model=patcher, preview_positive=positive, preview_negative=negative,
                                   preview_latent=latent, preview_vae=vae)
    run = out.result[0].run_dir
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step_2.flac", "timing.json"]
    assert (out.result[0].path / "lm" / "adapter_model.safetensors").is_file()
    assert "connect preview_clip to hear the planner LM's adapter as it trains" in out.ui["text"][0]
    # With the CLIP and a graph it can follow, each preview patches the CLIP's LM with the LoRA as it is then and
    # runs the encoder again; ComfyUI's LM is the 1.7B, so the tiny LM's LoRA is refused there (training goes on).
    from comfy_api.latest import _io

    clip = comfy.sd.load_clip([str(models / "text_encoders" / n) for n in (H.TE_NAME, H.LM_NAME)],
                              clip_type=comfy.sd.CLIPType.ACE)
    prompt = {"1": {"class_type": "DualCLIPLoader", "inputs": {}}, "2": ENCODER,
              "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
              "9": {"class_type": "SideStepTrainAdapter", "inputs": {
                  "preview_positive": ["2", 0], "preview_negative": ["3", 0], "preview_clip": ["1", 0]}}}
    ext.TrainAdapter.hidden = _io.HiddenHolder.from_dict({_io.Hidden.unique_id: "9", _io.Hidden.prompt: prompt})
    try:
        out = ext.TrainAdapter.execute(bundle, dataset, **settings("codes_previews_clip", preview_every=2,
                                                                   preview_seed=1),
                                       preview_model=patcher, preview_positive=positive, preview_negative=negative,
                                       preview_latent=latent, preview_vae=vae, preview_clip=clip)
    finally:
        ext.TrainAdapter.hidden = _io.HiddenHolder.from_dict({})
    lines = out.ui["text"][0]
    assert "the planner LM's adapter as it trains writes the audio codes at each preview" in lines, lines
    assert "previews stopped at step 2" in lines and "ComfyUI runs only the 1.7B (width 2048) and 4B" in lines
    assert (out.result[0].path / "lm" / "adapter_model.safetensors").is_file()
    del clip


ENCODER = {"class_type": "TextEncodeAceStepAudio1.5", "inputs": {
    "clip": ["1", 0], "tags": "tst, synth", "lyrics": "", "seed": 3, "bpm": 120, "duration": 0.4,
    "timesignature": "4", "language": "en", "keyscale": "C major", "generate_audio_codes": True, "cfg_scale": 2.0,
    "temperature": 0.85, "top_p": 0.9, "top_k": 0, "min_p": 0.0}}


def test_compare_with_the_clip_follows_the_graph_or_says_why(comfy, setup):
    """Compare Adapters on a run with a planner-LM adapter: without the CLIP it says the grid hears the graph's own
    codes; with it, a positive that does not come straight from TextEncodeAceStepAudio1.5 is named as the reason;
    a graph it can follow runs the encoder again with the checkpoint's LM adapter patched into the CLIP's LM —
    which ComfyUI builds at 1.7B size, so the tiny LM's adapter is refused there, naming both sizes."""
    import folder_paths
    from comfy_api.latest import _io
    from pack_loader import pack_module

    ext, glue, bundle, dataset, lm_file = setup
    folder_paths.add_model_folder_path("text_encoders", str(lm_file.parent), is_default=True)
    torch.set_num_threads(1)
    adapter = ext.TrainAdapter.execute(bundle, dataset, **settings("both")).result[0]
    cmp = pack_module("compare_adapters")
    models = H.write_model_set()
    graph = H.generation_values(comfy, models, 0.4)
    with torch.inference_mode():
        pos, extra = graph["positive"][0]
        graph["positive"] = [[pos, {**extra, "audio_codes": [[1, 2]]}]]
    clip = comfy.sd.load_clip([str(models / "text_encoders" / n) for n in (H.TE_NAME, H.LM_NAME)],
                              clip_type=comfy.sd.CLIPType.ACE)
    prompt = {"1": {"class_type": "DualCLIPLoader", "inputs": {}}, "2": ENCODER,
              "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
              "4": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0],
                                                                     "conditioning_2": ["2", 0]}},
              "9": {"class_type": "SideStepCompareAdapters",
                    "inputs": {"positive": ["4", 0], "negative": ["3", 0], "clip": ["1", 0]}}}

    def compare(**kw):
        cmp.CompareAdapters.hidden = _io.HiddenHolder.from_dict({_io.Hidden.unique_id: "9", _io.Hidden.prompt: prompt})
        res = cmp.CompareAdapters.execute(**graph, adapter=adapter, checkpoints="final", strengths="1.0", steps=1,
                                          **kw)
        return res.result[2]

    assert "connect the CLIP to hear each checkpoint's planner-LM adapter" in compare()
    assert ("not each checkpoint's planner-LM adapter: positive comes from ConditioningCombine (node 4)"
            in compare(clip=clip))
    prompt["9"]["inputs"]["positive"] = ["2", 0]
    with pytest.raises(ValueError, match=r"trained on a planner LM of width 32, 2 layers, but the LM given has "
                                         r"width 2048"):
        compare(clip=clip)
    del clip
    comfy.model_management.unload_all_models()
