"""``sidestep demo``: every stage runs on the embedded tiny model and says where its output went."""

from __future__ import annotations

import json

import pytest
import torch

from sidestep_core.cli import main


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    work, cache = tmp_path / "work", tmp_path / "cache"
    code = main(["--plain", "demo", "--workdir", str(work), "--cache-dir", str(cache), "--steps", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("tiny model", "synthetic audio", "preprocess", "estimate gradients", "train a lora adapter",
                  "a LoRA on the planner LM together", "export for ComfyUI", "apply the exported file"):
        assert stage in out, stage
    paths = {}
    for line in out.split("outputs:")[1].strip().splitlines():
        key, value = line.split(None, 1)
        paths[key] = value.strip()
    assert set(paths) == {"model", "lm", "audio", "dataset", "estimate", "adapter", "lm_adapter", "comfyui_file",
                          "audio@0", "audio@1"}
    assert len(list((work / "audio").glob("*.wav"))) == 3
    assert json.loads((work / "dataset" / "manifest.json").read_text())
    est = json.loads((work / "estimate.json").read_text())
    assert est["train_settings"]["target_modules"]
    assert (work / "run" / "final" / "adapter_model.safetensors").is_file()

    # the planner LM's LoRA trained in the same run: a loss every step, and its B matrices (zero at init) moved
    from sidestep_core.planner.lm_adapter import read_lm_adapter

    assert paths["lm"] == str(cache / "tiny-original-seed0" / "acestep-5Hz-lm-1.7B")
    assert paths["lm_adapter"] == str(work / "run" / "final" / "lm")
    lm = read_lm_adapter(paths["lm_adapter"])
    ups = [t for k, t in lm.tensors.items() if k.endswith("lora_B.weight")]
    assert ups and all(t.abs().sum() > 0 for t in ups)
    rows = (work / "run" / "loss.csv").read_text().splitlines()
    header = rows[0].split(",")
    lm_losses = [float(r.split(",")[header.index("lm_loss")]) for r in rows[1:]]
    assert len(lm_losses) == 4 and all(v > 0 for v in lm_losses)
    assert "LM loss" in out and "ComfyUI runs only the 1.7B" in out and "it stays a PEFT folder" in out

    from sidestep_core.adapters import read_adapter_weights

    exported = read_adapter_weights(paths["comfyui_file"])
    assert exported.format == "comfyui" and exported.adapter_type == "lora"
    assert sorted(exported.modules) == sorted(est["train_settings"]["target_modules"])
    # every adapter file carries what ComfyUI users need to know about it
    assert exported.meta_value("sidestep_trigger_tag") == "sdemo"
    for key in ("sidestep_adapter", "sidestep_adapter_options", "sidestep_base_variant", "sidestep_base_identity",
                "sidestep_recommended_shift", "sidestep_recommended_steps", "sidestep_steps", "sidestep_version"):
        assert key in exported.metadata, key
    assert exported.meta_value("sidestep_steps") == 4 and exported.meta_value("sidestep_recommended_shift") == 3.0
    from sidestep_core.audio.decode import decode_audio

    base, adapted = decode_audio(paths["audio@0"]), decode_audio(paths["audio@1"])
    assert base.waveform.shape == adapted.waveform.shape == (2, 50 * 1920)  # 2 s at 48 kHz, stereo
    assert not torch.equal(base.waveform, adapted.waveform)


def test_demo_model_cache_without_lm_gets_the_lm(tmp_path):
    """A demo cache written before the demo trained the LM is completed with the same LM a fresh cache has."""
    from sidestep_core.tiny.writer import default_demo_checkpoint, make_tiny_checkpoint

    old = make_tiny_checkpoint(tmp_path / "old" / "tiny-original-seed0", "original", "tiny", 0)
    assert old.planner is None
    upgraded = default_demo_checkpoint(tmp_path / "old")
    fresh = default_demo_checkpoint(tmp_path / "new")
    assert upgraded.planner is not None and upgraded.planner.name == fresh.planner.name
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (upgraded.planner / name).read_bytes() == (fresh.planner / name).read_bytes(), name
