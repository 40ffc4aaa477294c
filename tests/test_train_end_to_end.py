"""The whole path on CPU: synthetic audio -> real preprocessing (tiny VAE, text encoder, condition encoder) ->
``sidestep train`` of a LoRA -> an adapter that loads back. The README demo's route, timed."""

from __future__ import annotations

import time

import pytest

from preprocess_helpers import tone, write_audio
from sidestep_core.training import find_adapter, read_adapter
from train_helpers import run_cli, single_thread  # noqa: F401


@pytest.mark.slow
def test_preprocess_synthetic_audio_then_train_a_lora(tiny_original, tmp_path):
    from sidestep_core.data.preprocess import PreprocessConfig, preprocess

    audio = tmp_path / "audio"
    for i, f0 in enumerate((220.0, 330.0)):
        write_audio(audio / f"song{i}.wav", tone(3.0, 48000, 2, f0), 48000)
        (audio / f"song{i}.txt").write_text("synthetic tones, ambient")
    t0 = time.perf_counter()
    result = preprocess(tiny_original, audio, tmp_path / "cache", config=PreprocessConfig(device="cpu"))
    assert result.samples == 2 and not result.failures
    out = tmp_path / "out"
    rc = run_cli("--checkpoint", str(tiny_original), "--dataset", str(tmp_path / "cache"), "--out", str(out),
                 "--rank", "8", "--alpha", "8", "--learning-rate", "1e-3", "--max-steps", "10", "--save-every", "0",
                 "--device", "cpu", "--plain")
    elapsed = time.perf_counter() - t0
    assert rc == 0
    kind, _ = find_adapter(out / "final")
    adapter = read_adapter(out / "final")
    assert kind == "lora" and adapter.metadata["sidestep_steps"] == "10"
    assert len(adapter.tensors) == 64  # 32 modules x lora_A/lora_B
    print(f"preprocess + train: {elapsed:.1f} s")
