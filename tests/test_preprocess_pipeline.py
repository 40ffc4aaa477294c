"""End to end: ``sidestep preprocess`` on tiny checkpoints in every layout, a folder with every format and
convention, broken files, re-runs, edits, resume, and reading the cache (ours and legacy ``.pt`` folders)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from preprocess_helpers import FORMATS, tiny_checkpoint, tone, write_audio, write_format
from sidestep_core.cli import main
from sidestep_core.data import load_dataset
from sidestep_core.data.preprocess import PreprocessConfig, preprocess

SECONDS = 0.13  # three latent frames: the tiny VAE still costs about 4 s per second of audio on two cores
ENCODER_WIDTH = 64  # the tiny profile's condition-encoder width


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _by_id(manifest):
    return {s["id"]: s for s in manifest["samples"]}


def _run(args):
    return main(["--plain", "preprocess", *map(str, args)])


def _dataset(folder):
    """Every format, mono / stereo / 5.1, 8–96 kHz, odd lengths, each sidecar convention, and broken files."""
    for name, codec, container, rate, channels in FORMATS:
        write_format(folder, name, codec, container, rate, channels, SECONDS)
    (folder / "pcm.txt").write_text(
        "caption: bright synth arpeggio\nbpm: 128\nkey: E minor\nsignature: 4/4\nlanguage: de\n"
        "lyrics:\n[verse]\nlicht\n"
    )
    (folder / "lossless.caption.txt").write_text("solo acoustic guitar")
    (folder / "lossless.lyrics.txt").write_text("[Instrumental]")
    (folder / "lossy.txt").write_text("[chorus]\nsing along")  # plain text: lyrics only
    broken = folder / "broken"
    broken.mkdir()
    (broken / "garbage.mp3").write_bytes(np.random.default_rng(0).bytes(3000))
    (broken / "empty.wav").write_bytes(b"")
    write_audio(broken / "silent.wav", np.zeros((2, 9000), np.float32), 48000)
    write_audio(broken / "tiny.wav", tone(0.02, 48000), 48000)  # half a latent frame
    write_audio(broken / "badmeta.wav", tone(SECONDS, 48000), 48000)
    (broken / "badmeta.txt").write_bytes(b"caption: \x00\x01\x02")  # binary, not text


EXPECTED_FAILURES = {
    "broken/garbage.mp3": ("cannot be opened", "no audio", "decoding failed"),
    "broken/empty.wav": ("empty file",),
    "broken/silent.wav": ("silent",),
    "broken/tiny.wav": ("shorter than one latent frame",),
    "broken/badmeta.wav": ("unreadable metadata",),
}


def _check_sample(out, entry, silence):
    t = load_file(str(out / entry["file"]))
    frames = entry["frames"]
    assert frames == int(entry["duration"] * 48000) // 1920 >= 1
    assert t["target_latents"].shape == (frames, 64) and t["target_latents"].dtype == torch.bfloat16
    assert t["context_latents"].shape == (frames, 128)
    length = entry["lyric_tokens"] + 1 + entry["text_tokens"]  # lyrics, one timbre token, caption
    assert entry["encoder_tokens"] == length
    assert t["encoder_hidden_states"].shape == (length, ENCODER_WIDTH)
    assert t["encoder_attention_mask"].dtype == torch.bool and bool(t["encoder_attention_mask"].all())
    ctx = t["context_latents"].float()
    assert torch.equal(ctx[:, 64:], torch.ones(frames, 64))
    assert torch.allclose(ctx[:, :64], silence[0, :frames].to(torch.bfloat16).float())
    for v in t.values():
        assert torch.isfinite(v.float()).all()


def _silence():
    from sidestep_core.model import load_acestep

    return load_acestep(tiny_checkpoint("original").dit, parts=set()).silence_latent


@pytest.mark.slow
def test_folder_with_every_format_and_broken_files(tmp_path):
    ck = tiny_checkpoint("original")
    audio, out = tmp_path / "audio", tmp_path / "cache"
    audio.mkdir()
    _dataset(audio)
    assert _run(["--checkpoint", ck.root, "--audio-dir", audio, "--out", out]) == 0

    m = _manifest(out)
    assert (m["format"], m["format_version"], m["prompt_style"]) == ("sidestep-preprocessed", 2, "acestep")
    assert m["model"]["layout"] == "original" and m["model"]["variant"] == "turbo" and m["model"]["dtype"] == "bfloat16"
    samples = _by_id(m)
    assert sorted(samples) == sorted(f[0] for f in FORMATS)
    silence = _silence()
    for entry in samples.values():
        _check_sample(out, entry, silence)
        assert abs(entry["duration"] - SECONDS) < 0.05
        assert "- duration: 1 seconds\n" in entry["text_prompt"]  # the real length, never 0

    pcm = samples["pcm.wav"]
    assert pcm["caption"] == "bright synth arpeggio" and pcm["metadata_source"] == "sidecar:pcm.txt"
    assert "- bpm: 128\n- timesignature: 4\n- keyscale: E minor\n" in pcm["text_prompt"]
    assert pcm["lyric_prompt"] == "# Languages\nde\n\n# Lyric\n[verse]\nlicht<|endoftext|>"
    assert samples["lossless.flac"]["caption"] == "solo acoustic guitar"
    assert samples["lossy.mp3"]["lyrics"] == "[chorus]\nsing along"
    plain = samples["voice.opus"]
    assert plain["caption"] == "" and plain["lyrics"] == "[Instrumental]" and plain["language"] == "unknown"
    assert samples["surround.wav"]["source_channels"] == 6 and samples["phone.wav"]["source_sample_rate"] == 8000
    assert samples["aac.m4a"]["source_sample_rate"] == 96000

    failed = {f["path"]: f["reason"] for f in m["failed"]}
    assert set(failed) == set(EXPECTED_FAILURES)
    for path, needles in EXPECTED_FAILURES.items():
        assert any(n in failed[path] for n in needles), (path, failed[path])
        assert "\n" not in failed[path]
    passes = {p["name"]: p for p in m["stats"]["passes"]}
    assert passes["pass1_vae_text"]["items"] == len(FORMATS) and passes["pass1_vae_text"]["peak_rss_bytes"] > 0
    assert passes["pass2_condition_encoder"]["items"] == len(FORMATS)
    assert list((out / ".work").glob("*.safetensors")) == []  # intermediates are removed after pass 2

    # a second run encodes nothing
    before = {s["id"]: s["key"] for s in m["samples"]}
    result = preprocess(ck.root, audio, out)
    assert (result.encoded, result.reused, result.passes) == (0, len(FORMATS), [])  # no model was even loaded
    assert {f.path for f in result.failures} == set(EXPECTED_FAILURES)  # and broken files stay reported
    assert {s["id"]: s["key"] for s in _manifest(out)["samples"]} == before

    # training reads the cache through load_dataset
    data = load_dataset(out)
    assert {s.id for s in data} == set(samples)
    one = data[0].load()
    assert set(one) == {"target_latents", "encoder_hidden_states", "encoder_attention_mask", "context_latents"}
    assert data[0].duration == pytest.approx(SECONDS, abs=0.05)


@pytest.mark.slow
def test_edits_new_and_deleted_files(tmp_path):
    ck = tiny_checkpoint("original")
    audio, out = tmp_path / "audio", tmp_path / "cache"
    for name, freq in (("a.wav", 300), ("b.wav", 400), ("c.wav", 500)):
        write_audio(audio / name, tone(SECONDS, 48000, 2, freq=freq), 48000)
        (audio / name).with_suffix(".txt").write_text(f"caption: {name} song\n")
    preprocess(ck.root, audio, out)
    before = {s["id"]: s["key"] for s in _manifest(out)["samples"]}

    # editing one caption re-encodes that file only; its old tensors are removed
    (audio / "b.txt").write_text("caption: b.wav song, now with strings\n")
    result = preprocess(ck.root, audio, out)
    assert (result.encoded, result.reused) == (1, 2)
    after = {s["id"]: s["key"] for s in _manifest(out)["samples"]}
    assert after["b.wav"] != before["b.wav"]
    assert {k: v for k, v in after.items() if k != "b.wav"} == {k: v for k, v in before.items() if k != "b.wav"}
    assert not (out / f"{before['b.wav']}.safetensors").exists()
    assert _by_id(_manifest(out))["b.wav"]["caption"] == "b.wav song, now with strings"

    # new files are picked up, deleted ones dropped, renamed ones reused (same content, same key)
    write_audio(audio / "sub" / "new.wav", tone(SECONDS, 48000, 2, freq=600), 48000)
    (audio / "c.wav").unlink()
    (audio / "a.wav").rename(audio / "renamed.wav")
    (audio / "a.txt").rename(audio / "renamed.txt")
    result = preprocess(ck.root, audio, out)
    m = _by_id(_manifest(out))
    assert result.encoded == 1 and set(m) == {"renamed.wav", "b.wav", "sub/new.wav"}
    assert m["renamed.wav"]["key"] == before["a.wav"] and m["renamed.wav"]["audio"] == "renamed.wav"
    assert not (out / f"{before['c.wav']}.safetensors").exists()
    assert len(list(out.glob("*.safetensors"))) == 3


@pytest.mark.slow
def test_every_layout_gives_the_same_tensors(tmp_path):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", tone(SECONDS, 44100, 2), 44100)
    write_audio(audio / "b.flac", tone(SECONDS, 48000, 1, freq=600), 48000, "flac")
    (audio / "b.txt").write_text("caption: test\nlyrics:\nla la\n")
    results = {}
    for layout in ("original", "comfyui-split", "comfyui-aio"):
        ck = tiny_checkpoint(layout)
        out = tmp_path / layout
        assert _run(["--checkpoint", ck.dit, "--audio-dir", audio, "--out", out]) == 0
        m = _manifest(out)
        assert m["model"]["layout"] == layout and m["num_samples"] == 2
        results[layout] = {s["id"]: load_file(str(out / s["file"])) for s in m["samples"]}
    ref = results["original"]
    for layout, res in results.items():
        for sid, tensors in res.items():
            for name, t in tensors.items():
                # ComfyUI layouts derive the silence latent from the VAE; the original ships the same one
                assert torch.allclose(t.float(), ref[sid][name].float(), atol=1e-2), (layout, sid, name)
            assert torch.equal(tensors["encoder_hidden_states"], ref[sid]["encoder_hidden_states"])
            assert torch.equal(tensors["target_latents"], ref[sid]["target_latents"])


@pytest.mark.slow
def test_dataset_json_comfyui_style_and_trimming(tmp_path):
    ck = tiny_checkpoint("original")
    audio, out = tmp_path / "audio", tmp_path / "out"
    write_audio(audio / "one.wav", tone(0.3, 48000, 2), 48000)
    write_audio(audio / "two.wav", tone(SECONDS, 48000, 2, freq=700), 48000)
    write_audio(tmp_path / "elsewhere.wav", tone(SECONDS, 48000, 2), 48000)
    (audio / "dataset.json").write_text(json.dumps({
        "metadata": {"custom_tag": "zq", "tag_position": "prepend", "all_instrumental": True},
        "samples": [
            {"audio_path": "one.wav", "caption": "ambient pads", "bpm": 90, "keyscale": "D major",
             "timesignature": "3", "lyrics": "ignored: all instrumental", "language": "fr"},
            {"filename": "two.wav", "caption": "drums", "custom_tag": "own"},
            {"audio_path": "../elsewhere.wav", "caption": "outside"},
        ],
    }))
    rc = _run(["--checkpoint", ck.root, "--audio-dir", audio, "--out", out, "--dataset-json",
               audio / "dataset.json", "--prompt-style", "comfyui", "--max-duration", "0.2"])
    assert rc == 0
    m = _manifest(out)
    assert m["prompt_style"] == "comfyui" and m["settings"]["timbre_reference"] == "silence[:T]"
    s = _by_id(m)
    one = s["one.wav"]
    assert one["trimmed"] and one["duration"] == pytest.approx(0.2) and one["frames"] == 5
    assert any("trimmed to 0.2 s" in n for n in one["notes"])
    assert one["text_prompt"] == (
        "# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n# Caption\nzq, ambient pads"
        "\n\n# Metas\n- bpm: 90\n- timesignature: 3\n- keyscale: D major\n- duration: 1 seconds\n"
        "<|endoftext|>\n<|endoftext|>"
    )
    assert one["lyric_prompt"] == "# Languages\nfr\n\n# Lyric\n[Instrumental]<|endoftext|><|endoftext|>"
    assert s["two.wav"]["caption"] == "own, drums" and s["two.wav"]["language"] == "en"
    assert [f["path"] for f in m["failed"]] == ["../elsewhere.wav"]
    assert "outside the dataset folder" in m["failed"][0]["reason"]
    _check_sample(out, one, _silence())


@pytest.mark.slow
def test_interrupted_run_resumes_after_pass_one(tmp_path):
    ck = tiny_checkpoint("original")
    audio, out = tmp_path / "audio", tmp_path / "out"
    write_audio(audio / "a.wav", tone(SECONDS, 48000, 2), 48000)

    class Stop(Exception):
        pass

    def stop_in_pass2(event):
        if event.get("stage") == "pass2":
            raise Stop

    with pytest.raises(Stop):
        preprocess(ck.root, audio, out, progress=stop_in_pass2)
    assert len(list((out / ".work").glob("*.safetensors"))) == 1 and not (out / "manifest.json").exists()
    events = []
    result = preprocess(ck.root, audio, out, progress=events.append)
    assert [p.name for p in result.passes] == ["pass2_condition_encoder"]  # pass 1 was not repeated
    assert result.encoded == 1 and result.samples == 1
    assert not list((out / ".work").glob("*.safetensors"))
    stages = {e["stage"] for e in events if "done" in e}
    assert {"hash", "pass2", "done"} <= stages
    for e in events:
        if e.get("stage") == "pass2" and e["done"] < e["total"]:
            assert e["current"] == "a.wav" and "eta_s" in e


@pytest.mark.slow
def test_nothing_usable_exits_two(tmp_path, capsys):
    # a model whose VAE produces NaN: every file fails with that reason
    src = tiny_checkpoint("original")
    root = tmp_path / "ck"
    shutil.copytree(src.root, root)
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["encoder.conv1.bias"] = torch.full_like(state["encoder.conv1.bias"], float("nan"))
    save_file(state, str(weights))
    audio, out = tmp_path / "audio", tmp_path / "out"
    write_audio(audio / "a.wav", tone(SECONDS, 48000, 2), 48000)
    (audio / "b.mp3").write_bytes(b"not audio" * 100)
    assert _run(["--checkpoint", root, "--audio-dir", audio, "--out", out]) == 2
    m = _manifest(out)
    assert m["num_samples"] == 0
    failed = {f["path"]: f["reason"] for f in m["failed"]}
    assert failed["a.wav"] == "NaN/Inf in the VAE latents"
    assert "b.mp3" in failed
    assert "no usable samples" in capsys.readouterr().err


def test_empty_folder_and_bad_settings(tmp_path):
    ck = tiny_checkpoint("original")
    (tmp_path / "audio").mkdir()
    assert _run(["--checkpoint", ck.root, "--audio-dir", tmp_path / "audio", "--out", tmp_path / "out"]) == 2
    assert not (tmp_path / "out").exists()  # said early: nothing loaded, no empty manifest
    assert _run(["--checkpoint", ck.root, "--audio-dir", tmp_path / "nope", "--out", tmp_path / "out"]) == 2
    with pytest.raises(ValueError, match="max_duration"):
        preprocess(ck.root, tmp_path / "audio", tmp_path / "out", config=PreprocessConfig(max_duration=601))


def test_legacy_pt_folders_load(tmp_path):
    """ACE-Step / Side-Step tensor folders: torch.save dicts, read with weights_only=True."""
    folder = tmp_path / "tensors"
    folder.mkdir()
    for i, frames in enumerate((7, 9)):
        torch.save({
            "target_latents": torch.randn(frames, 64).bfloat16(),
            "attention_mask": torch.ones(frames).bfloat16(),
            "encoder_hidden_states": torch.randn(30, 2048).bfloat16(),
            "encoder_attention_mask": torch.ones(30).bfloat16(),  # Side-Step: model dtype, not bool
            "context_latents": torch.randn(frames, 128).bfloat16(),
            "metadata": {"caption": f"song {i}", "duration": frames / 25, "bpm": None, "is_instrumental": True},
        }, folder / f"s{i}.pt")
    torch.save({"text_hidden_states": torch.zeros(1)}, folder / "s9.tmp.pt")  # an unfinished intermediate
    samples = load_dataset(folder)
    assert [s.id for s in samples] == ["s0", "s1"] and samples[0].format == "legacy-pt"
    t = samples[1].load()
    assert t["target_latents"].shape == (9, 64) and t["encoder_attention_mask"].dtype == torch.bool
    assert samples[0].caption == "song 0" and samples[0].duration == pytest.approx(0.28)
    # an upstream manifest.json listing the files (paths from another machine)
    (folder / "manifest.json").write_text(json.dumps({"samples": ["C:\\data\\tensors\\s1.pt"], "num_samples": 1}))
    assert [s.id for s in load_dataset(folder)] == ["s1"]
    # pickled objects are refused rather than executed
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"target_latents": torch.zeros(1), "x": object()}, bad / "x.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="x.pt"):
        load_dataset(bad)[0].load()


@pytest.mark.slow
def test_trigger_tag_setting_applies_unless_the_dataset_json_has_one(tmp_path):
    ck = tiny_checkpoint("original")
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", tone(SECONDS, 48000, 2), 48000)
    (audio / "a.caption.txt").write_text("warm pads")
    rc = _run(["--checkpoint", ck.root, "--audio-dir", audio, "--out", tmp_path / "out", "--trigger-tag", "zz",
               "--tag-position", "append"])
    assert rc == 0
    assert _by_id(_manifest(tmp_path / "out"))["a.wav"]["caption"] == "warm pads, zz"
    (audio / "dataset.json").write_text(json.dumps({"metadata": {"custom_tag": "own"},
                                                    "samples": [{"audio_path": "a.wav", "caption": "warm pads"}]}))
    rc = _run(["--checkpoint", ck.root, "--audio-dir", audio, "--out", tmp_path / "out2", "--trigger-tag", "zz",
               "--dataset-json", audio / "dataset.json"])
    assert rc == 0
    assert _by_id(_manifest(tmp_path / "out2"))["a.wav"]["caption"] == "own, warm pads"
    with pytest.raises(ValueError, match="tag_position"):
        PreprocessConfig(tag_position="middle").validate()
