"""Sample metadata from the forms users already have: an ACE-Step / Side-Step dataset JSON, sidecar text files,
or nothing at all.

Dataset JSON: a bare list of samples, ``{"samples": [...]}`` or ``{"metadata": {...}, "samples": [...]}``.
Sidecars next to ``song.wav``: ``song.txt`` with ``key: value`` lines and a final ``lyrics:`` block (aliases
below), or ``song.caption.txt`` + ``song.lyrics.txt``, or a plain ``song.txt`` that is only lyrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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


def meta_from_fields(fields: dict[str, Any], source: str) -> SampleMeta:
    """Build a :class:`SampleMeta` from canonical keys (values may be strings, numbers or bools)."""
    known = {"caption", "genre", "lyrics", "bpm", "keyscale", "timesignature", "language", "duration",
             "is_instrumental", "custom_tag", "prompt_override", "repeat"}
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
        repeat=norm_int(fields.get("repeat")),
        source=source,
        extra={k: v for k, v in fields.items() if k not in known},
    )


# ----------------------------------------------------------------------------------------------------------
# dataset JSON
# ----------------------------------------------------------------------------------------------------------


def load_dataset_json(path: str | Path) -> tuple[DatasetSettings, list[Any]]:
    """Read a dataset JSON in any of its three shapes; returns the settings and the raw sample entries."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path}: not a readable dataset JSON ({exc})") from exc
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
    position = _text(meta.get("tag_position")).lower() or "prepend"
    if position not in TAG_POSITIONS:
        raise MetadataError(f"{path}: tag_position must be one of {', '.join(TAG_POSITIONS)}, not {position!r}")
    ratio = norm_float(meta.get("genre_ratio")) or 0.0
    settings = DatasetSettings(
        custom_tag=_text(meta.get("custom_tag")),
        tag_position=position,
        genre_ratio=min(100.0, max(0.0, ratio)),
        all_instrumental=bool(norm_bool(meta.get("all_instrumental"))),
        name=_text(meta.get("name")),
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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


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
    }


def read_sidecars(audio: Path) -> Optional[SampleMeta]:
    """Metadata from the sidecar files of ``audio``, or None when it has none."""
    paths = sidecar_paths(audio)
    fields: dict[str, Any] = {}
    used = []
    if paths["txt"].is_file():
        text = _read_text(paths["txt"])
        parsed = parse_sidecar_text(text)
        fields.update(parsed if parsed is not None else {"lyrics": text.strip()})
        used.append(paths["txt"].name)
    for key in ("caption", "lyrics"):  # the upstream pair overrides song.txt for its own field
        if paths[key].is_file():
            fields[key] = _read_text(paths[key]).strip()
            used.append(paths[key].name)
    if not used:
        return None
    return meta_from_fields(fields, "sidecar:" + "+".join(used))


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
    instrumental = bool(settings.all_instrumental or meta.is_instrumental or not meta.lyrics)
    lyrics = INSTRUMENTAL if (settings.all_instrumental or meta.is_instrumental or not meta.lyrics) else meta.lyrics
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
