"""Sample metadata from the forms users already have: an ACE-Step / Side-Step dataset JSON, sidecar text files,
or nothing at all.

Dataset JSON: a bare list of samples, ``{"samples": [...]}`` or ``{"metadata": {...}, "samples": [...]}``.
Sidecars next to ``song.wav``: ``song.txt`` with ``key: value`` lines and a final ``lyrics:`` block (aliases
below), or ``song.caption.txt`` + ``song.lyrics.txt``, or a plain ``song.txt`` that is only lyrics. Sidecars are
UTF-8 (with or without BOM); UTF-16 with a BOM and Windows-1252 / Latin-1 are read too, with a note.

Hostile input costs a field, never the run: a value of the wrong JSON type (a list as caption, an object as bpm)
is ignored with a warning instead of being turned into prompt text, absurdly long text is cut with a warning, and
only regular files are read as sidecars.
"""

from __future__ import annotations

import hashlib
import json
import errno
import math
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..text.prompts import INSTRUMENTAL

TAG_POSITIONS = ("prepend", "append", "replace")
PROMPT_OVERRIDES = ("caption", "genre")

# Sidecar keys and their aliases (case-insensitive; spaces and dashes count as underscores).
KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "caption": ("caption", "description", "desc", "prompt"),
    "genre": ("genre", "genres", "style"),
    "bpm": ("bpm", "tempo"),
    "keyscale": ("keyscale", "key", "key_scale", "scale"),
    "timesignature": ("timesignature", "signature", "time_signature", "timesig", "sig", "meter"),
    "language": ("language", "lang", "vocal_language"),
    "is_instrumental": ("is_instrumental", "instrumental"),
    "custom_tag": ("custom_tag", "trigger", "trigger_word", "tags", "tag"),
    "prompt_override": ("prompt_override",),
    "repeat": ("repeat", "repeats"),
    "duration": ("duration",),
    "lyrics": ("lyrics", "lyric"),
}
_ALIAS = {alias: key for key, aliases in KEY_ALIASES.items() for alias in aliases}
_KEY_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z _-]*?)\s*:\s?(.*)$")
# Text longer than the prompts can use is cut (the model reads at most 2048 lyric and 256 caption tokens).
MAX_LYRICS_CHARS = 16_000
MAX_CAPTION_CHARS = 4_000
MAX_FIELD_CHARS = 200  # bpm, key, language, tag ...
MAX_SIDECAR_BYTES = 1 << 20
MAX_JSON_BYTES = 256 << 20  # a dataset JSON of 100,000 songs is a few tens of MB
MAX_REPEAT = 100  # visits per epoch; a typo of 10**9 would make training build a list of a billion visits
MAX_EXTRA_DEPTH = 32  # passed-through JSON values nested deeper are dropped (they would break JSON writing)
_INSTRUMENTAL_LYRICS = re.compile(r"^\s*\[?\s*instrumental\s*\]?\s*$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


class MetadataError(ValueError):
    """Metadata that cannot be read; the message starts with the file's path."""


@dataclass
class SampleMeta:
    """What a user said about one audio file (nothing derived yet)."""

    caption: str = ""
    genre: str = ""
    lyrics: str = ""
    bpm: Optional[str] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str] = None
    language: Optional[str] = None
    duration: Optional[float] = None  # as declared; prompts always use the decoded length
    is_instrumental: Optional[bool] = None
    custom_tag: str = ""
    prompt_override: Optional[str] = None
    repeat: Optional[int] = None
    source: str = "default"  # dataset-json | sidecar:<names> | default
    extra: dict[str, Any] = field(default_factory=dict)  # passed through untouched (id, raw_lyrics, labeled ...)
    warnings: list[str] = field(default_factory=list)  # fields ignored or cut, legacy encodings read

    @property
    def declares_instrumental(self) -> bool:
        """The user said so: ``is_instrumental`` true, or lyrics that are only ``[Instrumental]``."""
        return bool(self.is_instrumental) or bool(_INSTRUMENTAL_LYRICS.match(self.lyrics or "x"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetSettings:
    """Dataset-wide settings (the ``metadata`` object of a dataset JSON)."""

    custom_tag: str = ""
    tag_position: str = "prepend"
    genre_ratio: float = 0.0  # percent of samples (with a genre) whose prompt uses the genre instead
    all_instrumental: bool = False
    name: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# value normalisation
# ----------------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def norm_bpm(value: Any) -> Optional[str]:
    """A tempo as the prompt writes it: ``120`` for 120 / 120.0 / "120 bpm"; None when absent or unreadable."""
    text = _text(value).lower().removesuffix("bpm").strip()
    if not text or text in ("n/a", "na", "none", "null"):
        return None
    try:
        num = float(text)
    except ValueError:
        return None
    if not math.isfinite(num) or num <= 0:
        return None
    return str(int(num)) if num.is_integer() else f"{num:g}"


def norm_timesignature(value: Any) -> Optional[str]:
    """Both front ends write the numerator only (``4`` for 4/4, ``6`` for 6/8), as their menus offer it."""
    text = _text(value)
    if not text or text.lower() in ("n/a", "na", "none", "null"):
        return None
    if re.fullmatch(r"\d+\s*/\s*\d+", text):
        text = text.split("/")[0].strip()
    if re.fullmatch(r"\d+(\.0+)?", text):
        text = str(int(float(text)))
    return text


def norm_optional(value: Any) -> Optional[str]:
    text = _text(value)
    return None if not text or text.lower() in ("n/a", "none", "null") else text


def norm_bool(value: Any) -> Optional[bool]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    return None


def norm_float(value: Any) -> Optional[float]:
    try:
        num = float(_text(value).lower().removesuffix("s").strip())
    except ValueError:
        return None
    return num if math.isfinite(num) and num > 0 else None


def norm_int(value: Any) -> Optional[int]:
    num = norm_float(value)
    return int(num) if num is not None else None


def norm_override(value: Any) -> Optional[str]:
    text = _text(value).lower()
    return text if text in PROMPT_OVERRIDES else None


def _kind(value: Any) -> str:
    kinds = {bool: "a true/false value", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _type_problem(key: str, value: Any) -> Optional[str]:
    """Why ``value`` cannot be the ``key`` field (None when it can): prompts take text and numbers only, and
    true/false only for ``is_instrumental``."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool):
        return None if key == "is_instrumental" else _kind(value)
    return None if isinstance(value, (int, float)) else _kind(value)


def _cut(value: str, limit: int, key: str, warnings: list[str]) -> str:
    if len(value) <= limit:
        return value
    warnings.append(f"{key} cut to {limit} characters (it has {len(value)})")
    return value[:limit]


def _too_deep(value: Any, limit: int = MAX_EXTRA_DEPTH) -> bool:
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d >= limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def meta_from_fields(fields: dict[str, Any], source: str, warnings: Optional[list[str]] = None) -> SampleMeta:
    """Build a :class:`SampleMeta` from canonical keys (values may be strings, numbers or bools).

    Values of another type are ignored with a warning; text is cut to what prompts can use."""
    known = {"caption", "genre", "lyrics", "bpm", "keyscale", "timesignature", "language", "duration",
             "is_instrumental", "custom_tag", "prompt_override", "repeat"}
    warnings = list(warnings or [])
    fields = dict(fields)
    for key in known & fields.keys():
        problem = _type_problem(key, fields[key])
        if problem:
            warnings.append(f"{key} ignored: {problem} is not a valid {key}")
            fields[key] = None
        elif isinstance(fields[key], str):
            limit = {"lyrics": MAX_LYRICS_CHARS, "caption": MAX_CAPTION_CHARS, "genre": MAX_CAPTION_CHARS}
            fields[key] = _cut(fields[key], limit.get(key, MAX_FIELD_CHARS), key, warnings)
    extra = {}
    for key, value in fields.items():
        if key in known:
            continue
        if _too_deep(value):
            warnings.append(f"{key} ignored: nested deeper than {MAX_EXTRA_DEPTH} levels")
        else:
            extra[key] = value
    repeat = norm_int(fields.get("repeat"))
    if repeat is not None and repeat > MAX_REPEAT:
        warnings.append(f"repeat {repeat} lowered to {MAX_REPEAT}")
        repeat = MAX_REPEAT
    lang = norm_optional(fields.get("language"))
    return SampleMeta(
        caption=_text(fields.get("caption")),
        genre=_text(fields.get("genre")),
        lyrics=_text(fields.get("lyrics")),
        bpm=norm_bpm(fields.get("bpm")),
        keyscale=norm_optional(fields.get("keyscale")),
        timesignature=norm_timesignature(fields.get("timesignature")),
        language=lang.lower() if lang else None,
        duration=norm_float(fields.get("duration")),
        is_instrumental=norm_bool(fields.get("is_instrumental")),
        custom_tag=_text(fields.get("custom_tag")),
        prompt_override=norm_override(fields.get("prompt_override")),
        repeat=repeat,
        source=source,
        extra=extra,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------------------------------------
# dataset JSON
# ----------------------------------------------------------------------------------------------------------


def load_dataset_json(path: str | Path) -> tuple[DatasetSettings, list[Any]]:
    """Read a dataset JSON in any of its three shapes; returns the settings and the raw sample entries."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MetadataError(f"{path}: not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise MetadataError(f"{path}: {st.st_size >> 20} MiB is too large for a dataset JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:  # not UTF-8, not JSON, a number of more than 4300 digits
        raise MetadataError(f"{path}: not a readable dataset JSON ({str(exc)[:200]})") from exc
    except RecursionError:
        raise MetadataError(f"{path}: not a readable dataset JSON (nested too deeply)") from None
    warnings = []
    text = json.dumps(data, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" escapes: lone surrogates no file, prompt or header can hold
        data = json.loads(text.encode("utf-8", "replace").decode("utf-8"))
        warnings.append("invalid characters (lone UTF-16 surrogates) replaced by '?'")
    meta: dict[str, Any] = {}
    if isinstance(data, list):
        samples = data
    elif isinstance(data, dict) and isinstance(data.get("samples"), list):
        samples = data["samples"]
        meta = data.get("metadata") or {}
        if not isinstance(meta, dict):
            raise MetadataError(f"{path}: 'metadata' must be an object")
    else:
        raise MetadataError(f"{path}: expected a list of samples or an object with a 'samples' list")
    meta = dict(meta)
    for key in ("custom_tag", "tag_position", "genre_ratio", "all_instrumental", "name"):
        value = meta.get(key)
        if isinstance(value, (list, dict)) or (isinstance(value, bool) and key != "all_instrumental"):
            warnings.append(f"metadata.{key} ignored: {_kind(value)} is not a valid {key}")
            meta[key] = None
    position = _text(meta.get("tag_position")).lower() or "prepend"
    if position not in TAG_POSITIONS:
        raise MetadataError(f"{path}: tag_position must be one of {', '.join(TAG_POSITIONS)}, not {position!r}")
    ratio = norm_float(meta.get("genre_ratio")) or 0.0
    settings = DatasetSettings(
        custom_tag=_cut(_text(meta.get("custom_tag")), MAX_FIELD_CHARS, "metadata.custom_tag", warnings),
        tag_position=position,
        genre_ratio=min(100.0, max(0.0, ratio)),
        all_instrumental=bool(norm_bool(meta.get("all_instrumental"))),
        name=_cut(_text(meta.get("name")), MAX_FIELD_CHARS, "metadata.name", warnings),
        warnings=warnings,
    )
    return settings, samples


def json_entry_meta(entry: dict[str, Any]) -> SampleMeta:
    """Metadata of one dataset-JSON sample (its audio location is resolved elsewhere)."""
    fields = {k: v for k, v in entry.items() if k not in ("audio_path", "filename")}
    if "keyscale" not in fields and "key" in fields:
        fields["keyscale"] = fields.pop("key")
    if "timesignature" not in fields and "time_signature" in fields:
        fields["timesignature"] = fields.pop("time_signature")
    return meta_from_fields(fields, "dataset-json")


# ----------------------------------------------------------------------------------------------------------
# sidecars
# ----------------------------------------------------------------------------------------------------------


def _decode_text(data: bytes) -> tuple[str, Optional[str]]:
    """Text of a sidecar and, when it was not UTF-8, the encoding it was read as."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), "UTF-16"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "Latin-1"


def _read_text(path: Path, warnings: list[str]) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if len(data) > MAX_SIDECAR_BYTES:
        warnings.append(f"{path.name} read only to its first {MAX_SIDECAR_BYTES >> 20} MiB")
        data = data[:MAX_SIDECAR_BYTES]
    try:
        text, encoding = _decode_text(data)
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not text ({exc.reason})") from exc
    if _CONTROL.search(text):
        raise MetadataError(f"{path}: not text (holds control characters; binary data?)")
    if encoding:
        warnings.append(f"{path.name} is not UTF-8; read as {encoding}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: Path, warnings: list[str]) -> str:
    """A user's text file other than a sidecar (``--lyrics-file``), read as sidecars are: only a regular file
    (a FIFO would wait forever, ``/dev/zero`` never end), at most 1 MiB, UTF-8 or a legacy encoding with a note."""
    if not _sidecar_exists(path):
        raise MetadataError(f"{path}: no such file")
    return _read_text(path, warnings)


def _canonical(key: str) -> Optional[str]:
    return _ALIAS.get(re.sub(r"[\s-]+", "_", key.strip().lower()))


def parse_sidecar_text(text: str) -> Optional[dict[str, str]]:
    """``key: value`` lines ending in a ``lyrics:`` block, or None when the text is not in that form.

    The form is recognised by its first non-empty line being a known key, so lyrics that happen to contain a
    colon are not mistaken for it. Lines without a known key continue the previous value.
    """
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    m = _KEY_LINE.match(first)
    if not m or _canonical(m.group(1)) is None:
        return None
    fields: dict[str, str] = {}
    current: Optional[str] = None
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line)
        key = _canonical(m.group(1)) if m else None
        if key == "lyrics":
            rest = [m.group(2)] + lines[i + 1:]
            fields["lyrics"] = "\n".join(rest).strip("\n").strip()
            break
        if key is not None:
            fields[key] = m.group(2).strip()
            current = key
        elif current is not None and line.strip():
            fields[current] = (fields[current] + "\n" + line.strip()).strip()
    return fields


def sidecar_paths(audio: Path) -> dict[str, Path]:
    stem = audio.with_suffix("")
    return {
        "txt": stem.with_name(stem.name + ".txt"),
        "caption": stem.with_name(stem.name + ".caption.txt"),
        "lyrics": stem.with_name(stem.name + ".lyrics.txt"),
        "labels": stem.with_name(stem.name + LABELS_SUFFIX),
    }


# Generated labels (``sidestep label``) live in their own sidecar, ``song.labels.txt``: ``key: value`` lines after
# ``#`` comment lines. They only fill what the user's own metadata leaves empty, so a user's value always wins.
LABELS_SUFFIX = ".labels.txt"
LABEL_FIELDS = ("caption", "bpm", "keyscale", "timesignature", "language")


def missing_label_fields(meta: SampleMeta) -> list[str]:
    """The fields auto-labelling may fill: an empty caption, an unknown bpm / key / time signature / language."""
    return [k for k in LABEL_FIELDS if (not meta.caption.strip() if k == "caption" else getattr(meta, k) is None)]


def read_labels(audio: Path, inside: Optional[Path] = None) -> Optional[dict[str, str]]:
    """The fields of ``song.labels.txt``, or None when there is none (``inside``: see :func:`read_sidecars`)."""
    path = sidecar_paths(audio)["labels"]
    if not _sidecar_exists(path, inside):
        return None
    warnings: list[str] = []
    text = "\n".join(ln for ln in _read_text(path, warnings).split("\n") if not ln.lstrip().startswith("#"))
    fields = parse_sidecar_text(text) or {}
    return {k: v for k, v in fields.items() if k in LABEL_FIELDS and v.strip()}


def fill_from_labels(meta: SampleMeta, audio: Path, inside: Optional[Path] = None) -> SampleMeta:
    """``meta`` with its missing fields taken from the song's generated labels (never replacing a given value)."""
    labels = read_labels(audio, inside)
    if not labels:
        return meta
    filled = meta_from_fields(labels, "labels")
    used = [k for k in missing_label_fields(meta) if k in labels]
    for key in used:
        setattr(meta, key, getattr(filled, key))
    if used:
        meta.source = f"{meta.source}+{sidecar_paths(audio)['labels'].name}"
    return meta


def read_sidecars(audio: Path, inside: Optional[Path] = None) -> Optional[SampleMeta]:
    """Metadata from the sidecar files of ``audio``, or None when it has none. With ``inside`` (the dataset
    folder), a sidecar that is a symbolic link must point into it, as audio links must."""
    paths = sidecar_paths(audio)
    fields: dict[str, Any] = {}
    used: list[str] = []
    warnings: list[str] = []
    if _sidecar_exists(paths["txt"], inside):
        text = _read_text(paths["txt"], warnings)
        parsed = parse_sidecar_text(text)
        fields.update(parsed if parsed is not None else {"lyrics": text.strip()})
        used.append(paths["txt"].name)
    for key in ("caption", "lyrics"):  # the upstream pair overrides song.txt for its own field
        if _sidecar_exists(paths[key], inside):
            fields[key] = _read_text(paths[key], warnings).strip()
            used.append(paths[key].name)
    if not used:
        return None
    return meta_from_fields(fields, "sidecar:" + "+".join(used), warnings)


def _sidecar_exists(path: Path, inside: Optional[Path] = None) -> bool:
    """A sidecar is a regular file; anything else by that name (a FIFO, a device, a link loop) is an error
    instead of a hang or a traceback, and so is a link out of ``inside`` (a downloaded dataset whose
    ``song.lyrics.txt`` links to a private file would put that file into the prompts and the manifest)."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR) and not path.is_symlink():
            return False  # no such file (a name one step too long cannot exist either)
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MetadataError(f"{path}: not a regular file")
    if inside is not None and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(Path(inside).resolve()):
            raise MetadataError(f"{path}: a symbolic link to {target}, outside the audio folder (allow outside "
                                "paths to use it)")
    return True


# ----------------------------------------------------------------------------------------------------------
# what the prompts use
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedMeta:
    """The fields the prompts are built from, after defaults, tags and the genre choice."""

    caption: str  # training caption (tag applied)
    lyrics: str
    language: str
    bpm: Optional[str]
    keyscale: Optional[str]
    timesignature: Optional[str]
    is_instrumental: bool
    used_genre: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uses_genre(meta: SampleMeta, settings: DatasetSettings, audio_sha256: str) -> bool:
    """Whether this sample's prompt uses its genre instead of its caption.

    ``prompt_override`` decides when set. Otherwise ``genre_ratio`` percent of the samples that have a genre
    are chosen by a hash of their audio, so the choice never changes when other files come or go (upstream
    shuffles the whole list with a fixed seed, which would re-pick, and so re-encode, samples on every edit).
    """
    if meta.prompt_override is not None:
        return meta.prompt_override == "genre" and bool(meta.genre)
    if not meta.genre or settings.genre_ratio <= 0:
        return False
    bucket = int(hashlib.sha256(("genre:" + audio_sha256).encode()).hexdigest()[:8], 16) % 10000
    return bucket < settings.genre_ratio * 100


def apply_tag(text: str, tag: str, position: str) -> str:
    if not tag:
        return text
    if position == "replace" or not text:
        return tag
    return f"{text}, {tag}" if position == "append" else f"{tag}, {text}"


def resolve(
    meta: SampleMeta,
    settings: DatasetSettings,
    *,
    audio_sha256: str,
    default_caption: str,
    default_language: str,
) -> ResolvedMeta:
    used_genre = uses_genre(meta, settings, audio_sha256)
    text = meta.genre if used_genre else (meta.caption or default_caption)
    tag = meta.custom_tag or settings.custom_tag
    instrumental = bool(settings.all_instrumental or meta.declares_instrumental or not meta.lyrics)
    lyrics = INSTRUMENTAL if instrumental else meta.lyrics
    return ResolvedMeta(
        caption=apply_tag(text, tag, settings.tag_position),
        lyrics=lyrics,
        language=meta.language or default_language,
        bpm=meta.bpm,
        keyscale=meta.keyscale,
        timesignature=meta.timesignature,
        is_instrumental=instrumental,
        used_genre=used_genre,
    )
