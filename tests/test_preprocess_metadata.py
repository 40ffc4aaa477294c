"""Metadata: dataset JSON shapes, sidecar conventions and aliases, defaults, tags, discovery and path safety."""

from __future__ import annotations

import json

import pytest

from sidestep_core.data import metadata as M
from sidestep_core.data.discovery import collect_items, discover_audio


def _touch(path, data=b"RIFF"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------------
# dataset JSON
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["list", "samples", "metadata"])
def test_dataset_json_shapes(tmp_path, shape):
    samples = [{"audio_path": "a.wav", "caption": "rock", "bpm": 128.0, "timesignature": "3/4"}]
    data = {"list": samples, "samples": {"samples": samples},
            "metadata": {"metadata": {"custom_tag": "zx", "tag_position": "append", "genre_ratio": 30,
                                      "all_instrumental": True}, "samples": samples}}[shape]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    settings, entries = M.load_dataset_json(path)
    assert entries == samples
    meta = M.json_entry_meta(entries[0])
    assert (meta.caption, meta.bpm, meta.timesignature, meta.source) == ("rock", "128", "3", "dataset-json")
    if shape == "metadata":
        assert (settings.custom_tag, settings.tag_position, settings.genre_ratio, settings.all_instrumental) == (
            "zx", "append", 30.0, True)
    else:
        assert settings == M.DatasetSettings()


def test_dataset_json_fields_and_passthrough():
    meta = M.json_entry_meta({
        "filename": "x.wav", "caption": " c ", "genre": "jazz", "lyrics": "[verse]\nhi", "bpm": "n/a",
        "keyscale": "F# minor", "language": "EN", "duration": 31.5, "is_instrumental": "false",
        "custom_tag": "t", "prompt_override": "GENRE", "repeat": 3, "id": "abc", "labeled": True,
    })
    assert meta.caption == "c" and meta.bpm is None and meta.keyscale == "F# minor" and meta.language == "en"
    assert meta.duration == 31.5 and meta.is_instrumental is False and meta.prompt_override == "genre"
    assert meta.repeat == 3 and meta.extra == {"id": "abc", "labeled": True}


@pytest.mark.parametrize("text,match", [
    ("{not json", "not a readable dataset JSON"),
    ('{"foo": 1}', "samples"),
    ('{"metadata": {"tag_position": "middle"}, "samples": []}', "tag_position"),
])
def test_bad_dataset_json(tmp_path, text, match):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(M.MetadataError, match=match) as info:
        M.load_dataset_json(path)
    assert str(info.value).startswith(str(path))


# ----------------------------------------------------------------------------------------------------------
# sidecars
# ----------------------------------------------------------------------------------------------------------


def test_key_value_sidecar_with_aliases_and_lyrics_block(tmp_path):
    audio = _touch(tmp_path / "song.flac")
    (tmp_path / "song.txt").write_text(
        "Caption: warm lo-fi beat\n  with vinyl crackle\nTempo: 84\nKey: A minor\nTime Signature: 4/4\n"
        "lang: JA\ninstrumental: no\ntrigger: zz_style\nLyrics:\n[verse]\nkey: not a field here\n\nsecond line\n"
    )
    meta = M.read_sidecars(audio)
    assert meta.caption == "warm lo-fi beat\nwith vinyl crackle"
    assert (meta.bpm, meta.keyscale, meta.timesignature, meta.language) == ("84", "A minor", "4", "ja")
    assert meta.is_instrumental is False and meta.custom_tag == "zz_style"
    assert meta.lyrics == "[verse]\nkey: not a field here\n\nsecond line"  # everything after lyrics: is lyrics
    assert meta.source == "sidecar:song.txt"


def test_caption_and_lyrics_pair(tmp_path):
    audio = _touch(tmp_path / "a.wav")
    (tmp_path / "a.caption.txt").write_text("ambient drone\n")
    (tmp_path / "a.lyrics.txt").write_text("[Instrumental]\n")
    meta = M.read_sidecars(audio)
    assert (meta.caption, meta.lyrics) == ("ambient drone", "[Instrumental]")
    assert meta.source == "sidecar:a.caption.txt+a.lyrics.txt"


def test_plain_txt_is_lyrics(tmp_path):
    audio = _touch(tmp_path / "b.mp3")
    (tmp_path / "b.txt").write_text("Love: it is all you need\nla la la\n")  # "love" is no known key
    meta = M.read_sidecars(audio)
    assert meta.lyrics == "Love: it is all you need\nla la la" and meta.caption == ""


def test_no_sidecar_and_unreadable_sidecar(tmp_path):
    audio = _touch(tmp_path / "c.wav")
    assert M.read_sidecars(audio) is None
    (tmp_path / "c.txt").write_bytes(b"caption: \x00\x01\x02 binary")
    with pytest.raises(M.MetadataError, match="not text"):
        M.read_sidecars(audio)


@pytest.mark.parametrize("encoding,name", [("latin-1", "Windows-1252"), ("cp1252", "Windows-1252"),
                                           ("utf-16", "UTF-16")])
def test_legacy_encoded_sidecar_is_read_with_a_note(tmp_path, encoding, name):
    audio = _touch(tmp_path / "d.wav")
    (tmp_path / "d.txt").write_bytes("caption: café crème, Motörhead – ‘live’\nlyrics:\nÄrger über Öl\n"
                                     .replace("–", "-" if encoding == "latin-1" else "–")
                                     .replace("‘live’", "live" if encoding == "latin-1" else "‘live’")
                                     .encode(encoding))
    meta = M.read_sidecars(audio)
    assert meta.caption.startswith("café crème, Motörhead") and meta.lyrics == "Ärger über Öl"
    assert meta.warnings == [f"d.txt is not UTF-8; read as {name}"]


def test_wrong_json_types_are_ignored_with_a_warning_never_stringified():
    meta = M.json_entry_meta({"audio_path": "a.wav", "caption": ["rock", "pop"], "bpm": {"value": 120},
                              "custom_tag": ["zz"], "lyrics": True, "keyscale": "C major", "language": "en"})
    assert (meta.caption, meta.bpm, meta.custom_tag, meta.lyrics) == ("", None, "", "")
    assert meta.keyscale == "C major" and meta.language == "en"
    assert sorted(meta.warnings) == ["bpm ignored: an object is not a valid bpm",
                                     "caption ignored: a list is not a valid caption",
                                     "custom_tag ignored: a list is not a valid custom_tag",
                                     "lyrics ignored: a true/false value is not a valid lyrics"]
    r = M.resolve(meta, M.DatasetSettings(), audio_sha256="0" * 64, default_caption="", default_language="en")
    assert "[" not in r.caption and "{" not in str(r.bpm)


def test_wrong_types_in_dataset_metadata_are_ignored(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"metadata": {"custom_tag": ["a", "b"], "all_instrumental": True},
                                "samples": [{"audio_path": "a.wav"}]}))
    settings, _ = M.load_dataset_json(path)
    assert settings.custom_tag == "" and settings.all_instrumental
    assert settings.warnings == ["metadata.custom_tag ignored: a list is not a valid custom_tag"]


def test_deeply_nested_json_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(M.MetadataError, match="nested too deeply"):
        M.load_dataset_json(path)
    # nested values that parse but would break writing the manifest are dropped from the pass-through
    deep: list = []
    for _ in range(200):
        deep = [deep]
    meta = M.json_entry_meta({"audio_path": "a.wav", "deep": deep, "id": 7})
    assert meta.extra == {"id": 7} and "deep ignored: nested deeper than 32 levels" in meta.warnings


def test_absurd_text_is_cut_with_a_warning(tmp_path):
    audio = _touch(tmp_path / "e.wav")
    (tmp_path / "e.txt").write_text("caption: ok\nlyrics:\n" + "la " * 4_000_000)  # 12 MB
    meta = M.read_sidecars(audio)
    assert len(meta.lyrics) == M.MAX_LYRICS_CHARS
    assert any("read only to its first 1 MiB" in w for w in meta.warnings)
    assert any(w.startswith("lyrics cut to 16000 characters") for w in meta.warnings)


@pytest.mark.parametrize("lyrics", ["[instrumental]", "[Instrumental]", "  [INSTRUMENTAL]\n", "instrumental"])
def test_instrumental_lyrics_mean_instrumental(lyrics):
    meta = M.SampleMeta(lyrics=lyrics)
    r = M.resolve(meta, M.DatasetSettings(), audio_sha256="0" * 64, default_caption="", default_language="en")
    none = M.resolve(M.SampleMeta(), M.DatasetSettings(), audio_sha256="0" * 64, default_caption="",
                     default_language="en")
    assert r.is_instrumental and r == none


# ----------------------------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------------------------


def test_defaults_tags_and_instrumental():
    settings = M.DatasetSettings(custom_tag="zx")
    r = M.resolve(M.SampleMeta(), settings, audio_sha256="0" * 64, default_caption="", default_language="unknown")
    assert r.caption == "zx" and r.lyrics == "[Instrumental]" and r.is_instrumental and r.language == "unknown"
    meta = M.SampleMeta(caption="rock", lyrics="[verse]\nyo", language="de")
    for position, expected in (("prepend", "zx, rock"), ("append", "rock, zx"), ("replace", "zx")):
        s = M.DatasetSettings(custom_tag="zx", tag_position=position)
        r = M.resolve(meta, s, audio_sha256="0" * 64, default_caption="d", default_language="en")
        assert r.caption == expected and r.lyrics == "[verse]\nyo" and r.language == "de"
    forced = M.resolve(meta, M.DatasetSettings(all_instrumental=True), audio_sha256="0" * 64, default_caption="",
                       default_language="en")
    assert forced.lyrics == "[Instrumental]"
    own_tag = M.resolve(M.SampleMeta(caption="c", custom_tag="mine"), settings, audio_sha256="0" * 64,
                        default_caption="", default_language="en")
    assert own_tag.caption == "mine, c"


def test_genre_choice_is_per_sample_and_stable():
    settings = M.DatasetSettings(genre_ratio=50)
    shas = [f"{i:064x}" for i in range(200)]
    picks = [M.uses_genre(M.SampleMeta(caption="c", genre="g"), settings, s) for s in shas]
    assert 70 < sum(picks) < 130  # about half
    assert picks == [M.uses_genre(M.SampleMeta(caption="c", genre="g"), settings, s) for s in shas]
    assert not M.uses_genre(M.SampleMeta(caption="c"), settings, shas[0])  # nothing to switch to
    assert M.uses_genre(M.SampleMeta(caption="c", genre="g", prompt_override="genre"), M.DatasetSettings(), shas[0])
    assert not M.uses_genre(M.SampleMeta(caption="c", genre="g", prompt_override="caption"),
                            M.DatasetSettings(genre_ratio=100), shas[0])


def test_value_normalisation():
    assert M.norm_bpm("120 BPM") == "120" and M.norm_bpm(98.5) == "98.5" and M.norm_bpm("fast") is None
    assert M.norm_timesignature("6/8") == "6" and M.norm_timesignature(4) == "4" and M.norm_timesignature("") is None


# ----------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------


def test_discovery_is_recursive_and_skips_hidden_and_output(tmp_path):
    for rel in ("a.wav", "sub/b.FLAC", "sub/deeper/c.opus", ".hidden/d.wav", "sub/.e.mp3", "out/f.wav",
                "notes.txt", "g.aiff", "h.m4a"):
        _touch(tmp_path / rel)
    found = [p.relative_to(tmp_path).as_posix() for p in discover_audio(tmp_path, exclude=[tmp_path / "out"])]
    assert found == ["a.wav", "g.aiff", "h.m4a", "sub/b.FLAC", "sub/deeper/c.opus"]


def test_folder_items_take_sidecars_and_report_bad_metadata(tmp_path):
    _touch(tmp_path / "a.wav")
    _touch(tmp_path / "b.wav")
    (tmp_path / "a.txt").write_text("caption: hi\n")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01bad")
    items, failures, settings = collect_items(tmp_path)
    assert [i.id for i in items] == ["a.wav"] and items[0].meta.caption == "hi"
    assert failures[0].path == "b.wav" and failures[0].reason.startswith("unreadable metadata")


def test_json_paths_resolve_inside_the_folder_only(tmp_path):
    ds = tmp_path / "ds"
    _touch(ds / "audio" / "one.wav")
    _touch(ds / "two.wav")
    _touch(tmp_path / "outside.wav")
    entries = [
        {"audio_path": "audio/one.wav", "caption": "1"},
        {"filename": "two.wav", "caption": "2"},
        {"audio_path": "../outside.wav", "caption": "3"},
        {"audio_path": str(tmp_path / "outside.wav"), "caption": "4"},
        {"audio_path": "missing.wav"},
        {"caption": "no path"},
        "not an object",
        {"audio_path": "audio/one.wav", "caption": "again"},
    ]
    (ds / "dataset.json").write_text(json.dumps({"samples": entries}))
    items, failures, _ = collect_items(ds, dataset_json=ds / "dataset.json")
    assert [(i.id, i.meta.caption) for i in items] == [("audio/one.wav", "1"), ("two.wav", "2"),
                                                       ("audio/one.wav#2", "again")]
    reasons = {f.path: f.reason for f in failures}
    assert "outside the dataset folder" in reasons["../outside.wav"]
    assert "outside the dataset folder" in reasons[str(tmp_path / "outside.wav")]
    assert reasons["missing.wav"].startswith("audio file not found")
    assert any("neither audio_path nor filename" in r for r in reasons.values())
    assert any("not an object" in r for r in reasons.values())
    allowed, failures2, _ = collect_items(ds, dataset_json=ds / "dataset.json", allow_outside=True)
    assert len(allowed) == 5 and allowed[2].rel == str((tmp_path / "outside.wav").resolve())
    # a file name alone is found anywhere in the folder when it is unique
    (ds / "by_name.json").write_text(json.dumps([{"filename": "one.wav"}]))
    items, _, _ = collect_items(ds, dataset_json=ds / "by_name.json")
    assert items[0].rel == "audio/one.wav"


# ----------------------------------------------------------------------------------------------------------
# hostile folders: only regular files are read, everything else is skipped with a reason
# ----------------------------------------------------------------------------------------------------------


def test_special_files_and_links_are_skipped_with_a_reason(tmp_path):
    import os

    root = tmp_path / "songs"
    _touch(root / "good.wav")
    os.symlink("loop_b.wav", root / "loop_a.wav")
    os.symlink("loop_a.wav", root / "loop_b.wav")
    os.mkfifo(root / "pipe.wav")
    os.symlink("/dev/zero", root / "zero.wav")
    os.symlink("missing.wav", root / "broken.wav")
    os.symlink("good.wav", root / "alias.wav")  # inside: followed, with a note
    outside = _touch(tmp_path / "elsewhere" / "far.wav")
    os.symlink(outside, root / "far.wav")
    os.symlink(tmp_path / "elsewhere", root / "linked_dir")
    items, failures, _ = collect_items(root)  # must return at once: nothing may open the FIFO or the device
    reasons = {f.path: f.reason for f in failures}
    assert [i.id for i in items] == ["alias.wav", "good.wav"]
    assert items[0].meta.warnings == ["followed the symbolic link to good.wav"]
    assert reasons["loop_a.wav"] == reasons["loop_b.wav"] == "a symbolic link loop"
    assert reasons["pipe.wav"] == "not a regular file (a FIFO (named pipe))"
    assert reasons["zero.wav"] == "not a regular file (a character device)"
    assert reasons["broken.wav"] == "a broken symbolic link"
    assert reasons["far.wav"].startswith(f"a symbolic link to {outside.resolve()}, outside the audio folder")
    assert reasons["linked_dir/"] == "a symbolic link to a folder (not entered)"
    # outside links follow the JSON rule: allowed on request, and then named
    items, failures, _ = collect_items(root, allow_outside=True)
    far = next(i for i in items if i.id == "far.wav")
    assert far.meta.warnings == [f"followed the symbolic link to {outside.resolve()}"]


def test_a_sidecar_that_is_a_fifo_does_not_hang(tmp_path):
    import os

    _touch(tmp_path / "a.wav")
    os.mkfifo(tmp_path / "a.txt")
    items, failures, _ = collect_items(tmp_path)
    assert not items and "not a regular file" in failures[0].reason


def test_sidecar_links_follow_the_audio_link_rule(tmp_path):
    """A downloaded dataset whose ``song.lyrics.txt`` links to a private file must not put that file into the
    prompts and the manifest: a sidecar link out of the folder fails its song (allowed on request, as audio links
    are); links inside are read. Messages name the sidecar as written, not its target."""
    import os

    root = tmp_path / "songs"
    secret = tmp_path / "private" / "notes.txt"
    secret.parent.mkdir()
    secret.write_text("caption: my bank password\n")
    for name in ("a", "b", "c", "d", "e"):
        _touch(root / f"{name}.wav")
    os.symlink(secret, root / "a.lyrics.txt")
    os.symlink(secret, root / "b.txt")
    os.symlink(secret, root / "c.labels.txt")
    (root / "shared").mkdir()
    (root / "shared" / "cap.txt").write_text("caption: shared caption\n")
    os.symlink("shared/cap.txt", root / "d.txt")
    os.symlink("/dev/zero", root / "e.caption.txt")
    items, failures, _ = collect_items(root)
    reasons = {f.path: f.reason for f in failures}
    assert [i.id for i in items] == ["d.wav"] and items[0].meta.caption == "shared caption"
    for name, sidecar in (("a", "a.lyrics.txt"), ("b", "b.txt"), ("c", "c.labels.txt")):
        assert reasons[f"{name}.wav"] == (f"unreadable metadata: {sidecar}: a symbolic link to {secret}, outside "
                                          "the audio folder (allow outside paths to use it)")
    assert reasons["e.wav"] == "unreadable metadata: e.caption.txt: not a regular file"
    ds = root / "dataset.json"
    ds.write_text(json.dumps([{"audio_path": "c.wav", "caption": "from json"}]))
    assert collect_items(root, dataset_json=ds)[1][0].reason.startswith("unreadable metadata: c.labels.txt: a symb")
    allowed = {i.id: i for i in collect_items(root, allow_outside=True)[0]}
    assert sorted(allowed) == ["a.wav", "b.wav", "c.wav", "d.wav"] and allowed["b.wav"].meta.caption == "my bank password"


def test_json_paths_longer_than_the_file_system_allows(tmp_path):
    _touch(tmp_path / "a.wav")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"audio_path": "x" * 300 + ".wav"}, {"audio_path": "/".join(["y" * 200] * 20)},
                                {"filename": "z" * 100_000}, {"audio_path": "a.wav"}]))
    items, failures, _ = collect_items(tmp_path, dataset_json=path)
    assert [i.id for i in items] == ["a.wav"]
    assert [f.reason.split(" (")[0] for f in failures] == ["audio file not found", "audio file not found",
                                                          "unreadable metadata: a path of 100000 characters"]


def test_file_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path):
    import os

    _touch(tmp_path / "ok.wav")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav"), "wb") as fh:  # Latin-1 bytes in the name
        fh.write(b"RIFF")
    items, failures, _ = collect_items(tmp_path)
    assert [i.id for i in items] == ["ok.wav"]
    assert [(f.path, f.reason) for f in failures] == [
        ("caf\ufffd.wav", "the file name is not valid UTF-8 (rename the file)")]
    json.dumps([f.to_dict() for f in failures]).encode("utf-8")  # the manifest can hold it


def test_absurd_repeat_is_lowered():
    meta = M.json_entry_meta({"audio_path": "a.wav", "repeat": 10**9})
    assert meta.repeat == M.MAX_REPEAT and meta.warnings == [f"repeat {10**9} lowered to {M.MAX_REPEAT}"]


def test_json_with_a_huge_number_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('[{"audio_path": "a.wav", "bpm": ' + "9" * 5000 + "}]")
    with pytest.raises(M.MetadataError, match="not a readable dataset JSON"):
        M.load_dataset_json(path)


def test_lone_surrogates_in_json_are_replaced_with_a_warning(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{"audio_path": "a.wav", "caption": "rock \\ud800 roll", "x": ["\\udfff"], '
                    '"lyrics": "\\ud83d\\ude00"}]')
    settings, entries = M.load_dataset_json(path)
    meta = M.json_entry_meta(entries[0])
    assert meta.caption == "rock ? roll" and meta.extra["x"] == ["?"] and meta.lyrics == "\U0001F600"
    assert settings.warnings == ["invalid characters (lone UTF-16 surrogates) replaced by '?'"]


def test_a_dataset_json_that_is_a_fifo_does_not_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "d.json")
    with pytest.raises(M.MetadataError, match="not a regular file"):
        M.load_dataset_json(tmp_path / "d.json")
