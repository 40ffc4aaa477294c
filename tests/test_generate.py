"""End-to-end text-to-music on the tiny checkpoint: files, lengths, determinism, conditions identical to the
preprocessing cache, base-variant CFG, adapters and the comparison helper."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sidestep_core.audio.decode import decode_audio
from sidestep_core.inference.generate import (
    Generator,
    Prompt,
    SamplerSettings,
    compare,
    flac_bytes,
    frames_for,
    write_flac,
)
from train_helpers import fast_config, make_cache, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def gen(tiny_original):
    torch.set_num_threads(1)
    return Generator.load(tiny_original / "acestep-v15-turbo", device="cpu")


@pytest.fixture(scope="module")
def run_dir(tiny_original, tmp_path_factory):
    """A real (2-step) LoRA training run: checkpoints/step_1, step_2 and final."""
    from sidestep_core.training import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    cache = make_cache(root / "cache", frames=(40, 56), cond_len=(6, 9))
    res = train(fast_config(max_steps=2, save_every=1, learning_rate=5e-2), tiny_original, cache, root / "out")
    assert res.status == "complete"
    return root / "out"


def _cli(*argv: str) -> int:
    from sidestep_core.commands import generate as cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd.register(sub, "generate")
    args = parser.parse_args(["generate", *argv])
    return cmd.run(args)


def test_cli_writes_48k_stereo_flac_of_the_right_length_deterministically(tiny_original, tmp_path):
    common = ["--checkpoint", str(tiny_original / "acestep-v15-turbo"), "--caption", "calm piano",
              "--lyrics", "[verse]\nhello", "--seconds", "1.3", "--bpm", "90", "--key", "C major",
              "--device", "cpu"]
    a, b, c = tmp_path / "a.flac", tmp_path / "b.flac", tmp_path / "c.flac"
    assert _cli(*common, "--seed", "7", "--out", str(a)) == 0
    assert _cli(*common, "--seed", "7", "--out", str(b)) == 0
    assert _cli(*common, "--seed", "8", "--out", str(c)) == 0
    import av

    with av.open(str(a)) as f:
        s = f.streams.audio[0]
        assert s.codec_context.name == "flac" and s.rate == 48000 and s.channels == 2
    da = decode_audio(a)
    assert da.sample_rate == 48000 and da.source_rate == 48000 and da.source_channels == 2
    assert da.waveform.shape == (2, frames_for(1.3) * 1920) == (2, 32 * 1920)  # round(32.5) = 32, as ComfyUI rounds
    assert a.read_bytes() == b.read_bytes()
    assert not torch.equal(da.waveform, decode_audio(c).waveform)


def test_flac_roundtrip_is_16_bit_exact(tmp_path):
    w = torch.sin(torch.linspace(0, 300, 10000))[None].repeat(2, 1) * torch.tensor([[0.5], [-0.25]])
    path = write_flac(tmp_path / "x.flac", w)
    back = decode_audio(path).waveform
    assert back.shape == w.shape
    assert (back - w).abs().max() < 1.0 / 32767
    assert flac_bytes(w) == path.read_bytes()


def test_conditions_equal_the_preprocessing_cache(tiny_original, gen, tmp_path):
    """The same caption/lyrics/metas and duration give tensor-for-tensor the conditions preprocessing cached."""
    from preprocess_helpers import tone, write_audio
    from sidestep_core.data.preprocess import preprocess

    audio = tmp_path / "audio"
    write_audio(audio / "song.wav", tone(1.0, 48000), 48000)
    (audio / "song.txt").write_text("caption: dreamy synthwave\nbpm: 100\nkey: A minor\ntimesignature: 4\n"
                                    "language: en\nlyrics:\n[chorus]\nneon lights\n")
    res = preprocess(tiny_original / "acestep-v15-turbo", audio, tmp_path / "cache")
    assert res.samples == 1
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    sample = manifest["samples"][0]
    cached = load_file(str(tmp_path / "cache" / sample["file"]))
    prompt = Prompt("dreamy synthwave", "[chorus]\nneon lights", seconds=1.0, bpm="100", keyscale="A minor",
                    timesignature="4", language="en")
    cond = gen.conditions(prompt)
    assert cond.frames == cached["target_latents"].shape[0] == 25
    assert torch.equal(cond.encoder_hidden_states[0], cached["encoder_hidden_states"])
    assert torch.equal(cond.encoder_attention_mask[0], cached["encoder_attention_mask"])
    assert torch.equal(cond.context_latents[0], cached["context_latents"])


def test_generation_is_independent_of_the_global_rng(gen):
    p = Prompt("x", seconds=0.4, seed=3)
    torch.manual_seed(0)
    a = gen.generate(p)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    b = gen.generate(p)
    assert torch.equal(a.waveform, b.waveform)
    torch.manual_seed(0)
    gen.generate(p)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG


def test_base_variant_uses_cfg_with_the_null_condition(tiny_original):
    g = Generator.load(tiny_original / "acestep-v15-turbo", variant="base", device="cpu")
    assert not g.turbo
    calls = []
    dec = g.model.decoder
    orig = dec.forward

    def spy(*a, **kw):
        calls.append(kw["hidden_states"].shape[0])
        return orig(*a, **kw)

    dec.forward = spy
    try:
        p = Prompt("x", seconds=0.4, seed=1)
        guided = g.generate(p, SamplerSettings(steps=3, guidance=3.0, shift=2.0))
        assert calls == [2, 2, 2]  # [cond; null] every step
        calls.clear()
        plain = g.generate(p, SamplerSettings(steps=3, guidance=1.0, shift=2.0))
        assert calls == [1, 1, 1]
    finally:
        dec.forward = orig
    assert guided.settings.steps == 3 and not torch.equal(guided.waveform, plain.waveform)
    interval = g.generate(p, SamplerSettings(steps=3, guidance=3.0, shift=2.0, cfg_interval=(0.0, 0.0)))
    # guidance outside the interval is the plain conditional (up to batch-size float noise: the batch is doubled)
    torch.testing.assert_close(interval.latents, plain.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(interval.latents, guided.latents, rtol=1e-3, atol=1e-3)


def test_adapter_strengths_and_compare(gen, run_dir, tmp_path):
    p = Prompt("lofi beat", seconds=0.6, seed=5)
    base = gen.generate(p)
    gen.set_adapter(run_dir / "final", 0.0)
    zero = gen.generate(p)
    gen.set_strength(1.0)
    one = gen.generate(p)
    gen.remove_adapter()
    assert torch.equal(zero.waveform, base.waveform)
    assert not torch.equal(one.waveform, base.waveform)
    assert torch.equal(gen.generate(p).waveform, base.waveform)  # removing restores the base model exactly

    results = compare(gen, p, run_dir)
    assert [r.label for r in results] == ["base", "strength_0.5", "strength_1", "step_1", "step_2"]
    assert torch.equal(results[0].waveform, base.waveform)
    assert torch.equal(results[2].waveform, one.waveform)
    assert torch.equal(results[4].waveform, one.waveform)  # final == last checkpoint here
    assert not torch.equal(results[3].waveform, results[4].waveform)
    assert all(r.waveform.shape == (2, frames_for(0.6) * 1920) for r in results)
    assert gen.adapter is None


def test_compare_cli_writes_a_table(tiny_original, run_dir, tmp_path):
    out = tmp_path / "cmp"
    rc = _cli("--checkpoint", str(tiny_original / "acestep-v15-turbo"), "--caption", "x", "--seconds", "0.4",
              "--adapter", str(run_dir), "--compare", "--strengths", "0", "1", "--out", str(out), "--device", "cpu")
    assert rc == 0
    table = (out / "compare.md").read_text()
    doc = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in doc["renders"]] == ["base", "step_1_x1", "final_x1"]  # step_2 is final
    for r in doc["renders"]:
        assert (out / r["file"]).is_file() and r["file"] in table
    assert decode_audio(out / doc["renders"][0]["file"]).waveform.shape == (2, 10 * 1920)


def test_prompt_parsing():
    p = Prompt.from_dict({"caption": "a", "key": "D major", "duration": 3, "bpm": 120, "seed": "4"})
    assert (p.keyscale, p.seconds, p.bpm, p.seed) == ("D major", 3.0, "120", 4)
    assert Prompt.from_dict("just a caption").caption == "just a caption"
    with pytest.raises(ValueError, match="unknown prompt field"):
        Prompt.from_dict({"caption": "a", "colour": "red"})
    with pytest.raises(ValueError, match="seconds"):
        Prompt.from_dict({"caption": "a", "seconds": 0})
    assert Prompt("x", lyrics="  ").prompt_inputs("acestep").lyrics == "[Instrumental]"
    assert np.isclose(Prompt("x", seconds=2.02).frames, 50)


def test_cli_entries(monkeypatch, tiny_original, tmp_path):
    """The COMMANDS entries the CLI needs: "generate" and "compare" (the same module, comparison mode)."""
    from sidestep_core import cli

    monkeypatch.setitem(cli.COMMANDS, "generate", "generate")
    monkeypatch.setitem(cli.COMMANDS, "compare", "generate")
    ck = str(tiny_original / "acestep-v15-turbo")
    assert cli.main(["--plain", "generate", "--checkpoint", ck, "--caption", "x", "--seconds", "0.2",
                     "--device", "cpu", "--out", str(tmp_path / "g.flac")]) == 0
    assert (tmp_path / "g.flac").is_file()
    assert cli.main(["compare", "--checkpoint", ck, "--caption", "x", "--seconds", "0.2", "--device", "cpu",
                     "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["renders"][0]["label"] == "base"
    assert cli.main(["generate", "--checkpoint", ck, "--caption", "x", "--out", str(tmp_path / "x.wav"),
                     "--device", "cpu"]) == 2  # user error: reported, exit code 2


def test_a_lyrics_file_is_read_like_a_sidecar(tiny_original, tmp_path, capsys):
    """``--lyrics-file`` saved by Windows Notepad (Windows-1252) ended in a bare UnicodeDecodeError line naming no
    file; a FIFO waited forever and /dev/zero was read until the memory ran out. Now a legacy encoding is read with
    a note, and anything but a regular text file is one line and exit 2, before the model loads."""
    import os

    from sidestep_core import cli

    ck = str(tiny_original / "acestep-v15-turbo")
    args = ["--plain", "generate", "--checkpoint", ck, "--caption", "x", "--seconds", "0.2", "--device", "cpu",
            "--out", str(tmp_path / "g.flac"), "--lyrics-file"]
    os.mkfifo(tmp_path / "fifo.txt")
    for path, reason in ((tmp_path / "fifo.txt", "not a regular file"), ("/dev/zero", "not a regular file"),
                         (tmp_path / "missing.txt", "no such file")):
        assert cli.main([*args, str(path)]) == 2
        assert capsys.readouterr().err == f"error: {path}: {reason}\n"
    notepad = tmp_path / "lyrics.txt"
    notepad.write_bytes("[verse]\r\ncafé, señor\r\n".encode("cp1252"))
    assert cli.main([*args, str(notepad)]) == 0
    assert "note: lyrics.txt is not UTF-8; read as Windows-1252" in capsys.readouterr().err
