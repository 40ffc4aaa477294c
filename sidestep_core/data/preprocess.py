"""Preprocessing: an audio folder to cached training tensors, in two low-memory passes.

Pass 1 holds the VAE and the Qwen3 text encoder: decode → (normalise) → tiled VAE encode → prompts → caption
states and lyric embeddings, saved as intermediates. Pass 2 holds only the DiT's condition encoder (never the
decoder): lyric + timbre + text packing, ``context_latents`` = silence ‖ ones, the final per-sample file. Memory
is released between passes and each pass's peak is reported.

Conditioning follows inference (acestep15.md §4, §2.4–2.5), including where upstream training differs:
lyrics use the ``# Languages``/``# Lyric`` prompt with the sample's language and no fixed padding; captions
are not padded to 256; the timbre input is the silence latent as inference feeds it (first 750 frames for the
``acestep`` style, all T frames for ``comfyui``'s text2music path), not upstream training's zeros[1, 1, 64].
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from .. import __version__
from ..audio.decode import AudioError, DecodeWorker, decode_audio, peak_dbfs
from ..audio.loudness import MODES as LOUDNESS_MODES
from ..audio.loudness import normalize
from ..conditioning import encode_conditions
from ..model.loading import resolve_dit_folder, weights_identity
from ..text import encoder as te_mod
from ..text.prompts import DEFAULT_LANGUAGE, PROMPT_STYLES, PromptInputs, tokenize
from .. import vae as vae_mod
from .cache import (
    FORMAT,
    FORMAT_VERSION,
    WORK_DIR,
    AudioHashIndex,
    content_key,
    is_sample_filename,
    read_manifest,
    read_record,
    sample_filename,
    write_manifest,
    write_safetensors,
    write_tensors,
)
from . import quality
from .discovery import AUDIO_EXTENSIONS, Failure, Item, collect_items
from .metadata import TAG_POSITIONS, ResolvedMeta, resolve

Progress = Callable[[dict], None]

MODEL_MAX_SECONDS = 600.0  # the silence latent covers 15000 frames = 600 s; the model's longest generation
SILENT_DBFS = -60.0  # a whole file quieter than this is treated as silence
SILENCE_CACHE = "silence_latent.safetensors"


@dataclass
class PreprocessConfig:
    prompt_style: str = "acestep"
    max_duration: float = MODEL_MAX_SECONDS
    normalize: str = "none"  # none | peak | lufs
    peak_db: float = -1.0
    target_lufs: float = -14.0
    chunk_seconds: float = 30.0
    overlap_seconds: float = 2.0
    default_caption: str = ""
    default_language: Optional[str] = None  # None: "unknown" (acestep) / "en" (comfyui)
    custom_tag: str = ""  # trigger tag for every caption, unless the dataset JSON sets its own
    tag_position: str = "prepend"  # prepend | append | replace
    allow_outside_paths: bool = False
    sample_posterior: bool = True  # False: use the posterior mean instead of a seeded sample
    seed: int = 0
    device: str = "auto"
    vae_dtype: Optional[str] = None  # None: float32 on CPU, bfloat16 on CUDA (upstream's choice)
    text_encoder_dtype: Optional[str] = None  # same default
    variant: Optional[str] = None
    vae: Optional[str] = None  # paths overriding discovery
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None

    def validate(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, not {self.prompt_style!r}")
        if self.normalize not in LOUDNESS_MODES:
            raise ValueError(f"normalize must be one of {', '.join(LOUDNESS_MODES)}, not {self.normalize!r}")
        if not (0 < self.max_duration <= MODEL_MAX_SECONDS):
            raise ValueError(f"max_duration must be in (0, {MODEL_MAX_SECONDS:g}] seconds, not {self.max_duration}")
        if self.tag_position not in TAG_POSITIONS:
            raise ValueError(f"tag_position must be one of {', '.join(TAG_POSITIONS)}, not {self.tag_position!r}")
        if self.chunk_seconds <= 0 or self.overlap_seconds < 0:
            raise ValueError("chunk_seconds must be positive and overlap_seconds not negative")

    def language(self) -> str:
        return self.default_language or DEFAULT_LANGUAGE[self.prompt_style]

    def key_settings(self) -> dict:
        """The settings that change a sample's tensors (and so its content key)."""
        return {
            "prompt_style": self.prompt_style,
            "max_duration": self.max_duration,
            "normalize": self.normalize,
            "peak_db": self.peak_db if self.normalize != "none" else None,
            "target_lufs": self.target_lufs if self.normalize == "lufs" else None,
            "chunk_seconds": self.chunk_seconds,
            "overlap_seconds": self.overlap_seconds,
            "sample_posterior": self.sample_posterior,
            "seed": self.seed,
            # explicit precisions only: the device-dependent defaults must not re-encode a cache on another machine
            "vae_dtype": self.vae_dtype,
            "text_encoder_dtype": self.text_encoder_dtype,
        }


@dataclass
class PassReport:
    name: str
    seconds: float = 0.0
    items: int = 0
    audio_seconds: float = 0.0
    peak_rss_bytes: Optional[int] = None  # process resident memory peak during the pass
    rss_before_bytes: Optional[int] = None
    peak_device_bytes: Optional[int] = None  # torch.cuda.max_memory_allocated during the pass

    def to_dict(self) -> dict:
        return asdict(self)


class NoUsableSamples(ValueError):
    """Nothing in the audio folder can be preprocessed; the message lists why, file by file."""


@dataclass
class PreprocessResult:
    out_dir: Path
    manifest_path: Path
    samples: int
    encoded: int  # samples newly encoded by this run
    reused: int
    failures: list[Failure]
    passes: list[PassReport] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (file, warning): kept, but worth knowing
    quality: dict = field(default_factory=dict)  # the dataset report (quality.report)

    @property
    def ok(self) -> bool:
        return self.samples > 0

    def warning_lines(self) -> list[str]:
        """Per-file warnings and the dataset report, as the CLI and the node show them."""
        lines = [f"warning {path}: {text}" for path, text in self.warnings]
        return [one_line(t) for t in lines + (quality.report_lines(self.quality) if self.quality else [])]

    def report_lines(self) -> list[str]:
        """Skipped files, then :meth:`warning_lines`."""
        return [one_line(f"skipped {f.path}: {f.reason}") for f in self.failures] + self.warning_lines()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``): a file named with a line break stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryMonitor:
    """Peak resident memory (sampled every 20 ms) and peak CUDA allocation over a ``with`` block."""

    def __init__(self, report: PassReport, device: torch.device):
        self.report, self.device = report, device
        self._stop = threading.Event()
        self._peak = 0

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss() or 0)

    def __enter__(self):
        self._t0 = time.perf_counter()
        self.report.rss_before_bytes = _rss()
        self._peak = self.report.rss_before_bytes or 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss() or 0)
        self.report.peak_rss_bytes = self._peak or None
        if self.device.type == "cuda":
            self.report.peak_device_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.report.seconds = time.perf_counter() - self._t0
        return False


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Reporter:
    def __init__(self, progress: Optional[Progress]):
        self.progress = progress
        self._t0: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int, current: str = "", message: str = "") -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        start = self._t0.setdefault(stage, now)
        eta = (now - start) / done * (total - done) if done > 0 else None
        event = {"stage": stage, "done": done, "total": total, "current": current, "eta_s": eta}
        if message:
            event["message"] = message
        self.progress(event)

    def note(self, stage: str, current: str, message: str) -> None:
        if self.progress is not None:
            self.progress({"stage": stage, "current": current, "message": message})


@dataclass
class Components:
    checkpoint: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path

    def identities(self) -> dict:
        tok = hashlib.sha256()
        for name in sorted(te_mod._TOKENIZER_FILES):
            p = self.tokenizer / name
            if p.is_file():
                tok.update(name.encode() + p.read_bytes())
        return {
            "vae": weights_identity(vae_mod.vae_weight_files(self.vae)),
            "text_encoder": weights_identity(te_mod.text_encoder_weight_files(self.text_encoder)),
            "tokenizer": tok.hexdigest()[:16],
        }


def find_components(checkpoint: str | Path, cfg: PreprocessConfig) -> Components:
    ckpt = Path(checkpoint).expanduser()
    dit = resolve_dit_folder(ckpt) if ckpt.is_dir() else ckpt
    dit = dit or ckpt
    vae = Path(cfg.vae).expanduser() if cfg.vae else vae_mod.find_vae(dit)
    te = Path(cfg.text_encoder).expanduser() if cfg.text_encoder else te_mod.find_text_encoder(dit)
    tok = te_mod.find_tokenizer(cfg.tokenizer, text_encoder=te, near=dit)
    return Components(ckpt, vae, te, tok)


@dataclass
class _Plan:
    item: Item
    sha: str
    resolved: ResolvedMeta
    key: str
    seed: Optional[int]
    declared_instrumental: bool = False


def _sample_seed(cfg: PreprocessConfig, audio_sha: str) -> Optional[int]:
    """Posterior noise seed: from the audio and the run seed only, so layouts and caption edits share it."""
    if not cfg.sample_posterior:
        return None
    return int(hashlib.sha256(f"{cfg.seed}:{audio_sha}".encode()).hexdigest()[:15], 16)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# the two passes
# ----------------------------------------------------------------------------------------------------------


def _pass1_item(
    plan: _Plan, cfg: PreprocessConfig, vae, text: te_mod.TextEncoder, worker: DecodeWorker
) -> tuple[dict, dict]:
    """Tensors and manifest record of one sample; raises ValueError with a one-line reason."""
    item = plan.item
    decoded = decode_audio(item.path, max_duration=cfg.max_duration, worker=worker)
    wave = decoded.waveform
    notes = []
    if decoded.trimmed:
        notes.append(f"trimmed to {cfg.max_duration:g} s (file is {decoded.source_duration:.1f} s)")
    peak = peak_dbfs(wave)
    if peak < SILENT_DBFS:
        raise AudioError("silent" if peak == float("-inf") else f"silent (peak {peak:.1f} dBFS)")
    hop = vae_mod.vae_hop(vae)
    if wave.shape[-1] < hop:
        raise AudioError(f"shorter than one latent frame ({wave.shape[-1] / 48000:.3f} s < {hop / 48000:.2f} s)")
    loud = normalize(wave, decoded.sample_rate, cfg.normalize, peak_db=cfg.peak_db, lufs=cfg.target_lufs)
    if loud.note:
        notes.append(loud.note)
    latents = vae_mod.encode_audio(
        vae, loud.waveform, seed=plan.seed, chunk_seconds=cfg.chunk_seconds, overlap_seconds=cfg.overlap_seconds
    )
    if not _finite(latents):
        raise ValueError("NaN/Inf in the VAE latents")
    duration = wave.shape[-1] / decoded.sample_rate
    r = plan.resolved
    inputs = PromptInputs(
        caption=r.caption, lyrics=r.lyrics, language=r.language, duration=duration,
        bpm=r.bpm, keyscale=r.keyscale, timesignature=r.timesignature,
    )
    toks = tokenize(text.tokenizer, inputs, cfg.prompt_style)
    text.check_ids(toks.text_ids, "caption")
    text.check_ids(toks.lyric_ids, "lyric")
    caption_states = text.encode_caption(toks.text_ids)
    lyric_states = text.embed_lyrics(toks.lyric_ids)
    if not _finite(caption_states, lyric_states):
        raise ValueError("NaN/Inf in the text encoder output")
    meta = item.meta
    record = {
        "key": plan.key,
        "audio_sha256": plan.sha,
        "duration": duration,
        "frames": int(latents.shape[0]),
        "source_duration": decoded.source_duration,
        "trimmed": decoded.trimmed,
        "source_sample_rate": decoded.source_rate,
        "source_channels": decoded.source_channels,
        **r.to_dict(),
        "genre": meta.genre,
        "raw_caption": meta.caption,
        "custom_tag": meta.custom_tag,
        "prompt_override": meta.prompt_override,
        "declared_duration": meta.duration,
        "repeat": meta.repeat,
        "metadata_source": meta.source,
        "extra": meta.extra,
        "text_prompt": toks.text_prompt,
        "lyric_prompt": toks.lyric_prompt,
        "text_tokens": len(toks.text_ids),
        "lyric_tokens": len(toks.lyric_ids),
        "loudness": {"mode": cfg.normalize, "gain_db": loud.gain_db, "measured": loud.measured},
        "seed": plan.seed,
        "notes": notes,
        "audio_warnings": decoded.warnings,
        "quality": quality.measure(decoded),
    }
    tensors = {"target_latents": latents, "text_hidden_states": caption_states, "lyric_hidden_states": lyric_states}
    return tensors, record


def _pass2_item(inter: dict, record: dict, model, silence: torch.Tensor, style: str) -> dict:
    lat = inter["target_latents"]
    states, mask, context = encode_conditions(
        model, inter["text_hidden_states"], inter["lyric_hidden_states"], silence, lat.shape[0], style
    )
    dtype = states.dtype
    if not _finite(states):
        raise ValueError("NaN/Inf in the condition encoder output")
    record["encoder_tokens"] = int(states.shape[0])
    return {
        "target_latents": lat.to(dtype),
        "encoder_hidden_states": states.cpu(),
        "encoder_attention_mask": mask.cpu(),
        "context_latents": context.cpu(),
    }


def _load_silence(work: Path, vae_identity: str) -> Optional[torch.Tensor]:
    from safetensors import safe_open

    path = work / SILENCE_CACHE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("vae") != vae_identity:
                return None
            return f.get_tensor("silence_latent")
    except Exception:
        return None


def _save_silence(work: Path, vae_identity: str, silence: torch.Tensor) -> None:
    write_safetensors(work / SILENCE_CACHE, {"silence_latent": silence}, {"vae": vae_identity})


def _tensor_identity(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def preprocess(
    checkpoint: str | Path,
    audio_dir: str | Path,
    out_dir: str | Path,
    *,
    dataset_json: Optional[str | Path] = None,
    config: Optional[PreprocessConfig] = None,
    progress: Optional[Progress] = None,
) -> PreprocessResult:
    """Preprocess ``audio_dir`` for training on ``checkpoint`` into ``out_dir`` (see the module docstring).

    Unchanged samples are reused, new and edited ones encoded, stale ones dropped. Files that cannot be used
    are listed in the manifest's ``failed`` list with a one-line reason; the rest are still processed.
    """
    from ..model.loading import load_acestep

    cfg = config or PreprocessConfig()
    cfg.validate()
    report = _Reporter(progress)
    out = Path(out_dir).expanduser()
    audio_dir = Path(audio_dir).expanduser()
    device = resolve_device(cfg.device)

    # Cheap checks first, so a wrong model or an empty folder is reported before anything loads or is written.
    if audio_dir.is_dir() and _inside_or_same(audio_dir, out):
        raise ValueError(f"{out}: the output folder must not be the audio folder or hold it")
    info_model = load_acestep(checkpoint, parts=set(), variant=cfg.variant)  # metadata only, no weights
    items, failures, settings = collect_items(
        audio_dir, dataset_json=dataset_json, allow_outside=cfg.allow_outside_paths, exclude=[out]
    )
    if not items:
        raise NoUsableSamples(_nothing_usable(audio_dir, failures))
    comps = find_components(checkpoint, cfg)
    info = info_model.info
    ids = comps.identities()
    silence = info_model.silence_latent
    silence_id = f"checkpoint:{_tensor_identity(silence)}" if silence is not None else f"vae:{ids['vae']}"
    model_key = {"dit": info.identity, **ids, "silence": silence_id}
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    if cfg.custom_tag.strip() and not settings.custom_tag:
        settings = replace(settings, custom_tag=cfg.custom_tag.strip(), tag_position=cfg.tag_position)
    previous = read_manifest(out) or {}
    index = AudioHashIndex(previous.get("audio_index") if previous.get("format") == FORMAT else None)

    plans: list[_Plan] = []
    for n, item in enumerate(items):
        report("hash", n, len(items), item.rel)
        try:
            sha = index.sha256(item.path, item.rel)
        except OSError as exc:
            failures.append(Failure(item.rel, f"cannot be read ({exc.strerror or exc})"))
            continue
        resolved = resolve(item.meta, settings, audio_sha256=sha, default_caption=cfg.default_caption,
                           default_language=cfg.language())
        key = content_key(audio=sha, meta=resolved.to_dict(), settings=cfg.key_settings(), model=model_key)
        declared = settings.all_instrumental or item.meta.declares_instrumental
        plans.append(_Plan(item, sha, resolved, key, _sample_seed(cfg, sha), declared))
    report("hash", len(items), len(items))

    def final_path(key: str) -> Path:
        return out / sample_filename(key)

    done_records = {p.key: read_record(final_path(p.key)) for p in plans}
    same_key: dict[str, list[_Plan]] = {}  # files of identical audio and metadata are encoded once
    for p in plans:
        same_key.setdefault(p.key, []).append(p)
    todo = [group[0] for k, group in same_key.items() if done_records.get(k) is None]
    passes: list[PassReport] = []
    failed_keys: set[str] = set()

    def fail(key: str, reason: str) -> None:
        """A sample that failed while encoding: every file holding it is listed (not only the one encoded)."""
        failures.extend(Failure(p.item.rel, reason, key) for p in same_key[key])
        failed_keys.add(key)
    # Files that failed while encoding fail the same way while nothing about them changed: report, don't retry.
    known_bad = {}
    if previous.get("format") == FORMAT:
        known_bad = {f["key"]: f["reason"] for f in _list(previous.get("failed"))
                     if isinstance(f, dict) and isinstance(f.get("key"), str) and isinstance(f.get("reason"), str)}
    for p in plans:
        if p.key in known_bad:
            failures.append(Failure(p.item.rel, known_bad[p.key], p.key))
            failed_keys.add(p.key)
    todo = [p for p in todo if p.key not in known_bad]
    todo1 = [p for p in todo if read_record(work / sample_filename(p.key)) is None]

    # ---------------- pass 1: VAE + text encoder ----------------
    need_silence = silence is None and bool(todo)
    if need_silence:
        silence = _load_silence(work, ids["vae"])
        need_silence = silence is None
    if todo1 or need_silence:
        rep = PassReport("pass1_vae_text")
        with MemoryMonitor(rep, device):
            vae = vae_mod.load_vae(comps.vae, dtype=_dtype(cfg.vae_dtype, device), device=device)
            if need_silence:
                report.note("pass1", "", "deriving the silence latent from the VAE (no silence_latent.pt)")
                silence = vae_mod.silence_latent_from_vae(vae)
                _save_silence(work, ids["vae"], silence)
            text = te_model = None
            if todo1:
                tokenizer = te_mod.load_tokenizer(comps.tokenizer)
                te_model = te_mod.load_text_encoder(
                    comps.text_encoder, dtype=_dtype(cfg.text_encoder_dtype, device), device=device
                )
                text = te_mod.TextEncoder(te_model, tokenizer)
                if text.hidden_size != info_model.config.text_hidden_dim:
                    raise te_mod.TextEncoderError(
                        f"{comps.text_encoder}: text encoder width {text.hidden_size} does not match the model's "
                        f"text input ({info_model.config.text_hidden_dim}); it belongs to another model"
                    )
            with DecodeWorker() as worker:
                for n, plan in enumerate(todo1):
                    report("pass1", n, len(todo1), plan.item.rel)
                    try:
                        tensors, record = _pass1_item(plan, cfg, vae, text, worker)
                    except te_mod.TextEncoderError:
                        raise  # a tokenizer that does not fit the encoder fails every file: stop with its message
                    except (AudioError, ValueError, OSError) as exc:
                        reason = str(exc)
                        prefix = f"{plan.item.path}: "
                        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
                        fail(plan.key, reason)
                        continue
                    for note in record["notes"] + record["audio_warnings"]:
                        report.note("pass1", plan.item.rel, note)
                    write_tensors(work / sample_filename(plan.key), tensors, record)
                    rep.items += 1
                    rep.audio_seconds += record["duration"]
            report("pass1", len(todo1), len(todo1))
            vae = text = te_model = None  # noqa: F841 (drop the last references before measuring)
            _release(device)
        passes.append(rep)

    # ---------------- pass 2: condition encoder ----------------
    todo2 = [p for p in todo if p.key not in failed_keys]
    if todo2:
        rep = PassReport("pass2_condition_encoder")
        with MemoryMonitor(rep, device):
            loaded = load_acestep(checkpoint, parts={"encoder"}, variant=cfg.variant, device=device)
            model = loaded.model
            dtype = next(model.encoder.parameters()).dtype
            sil = silence.float()
            for n, plan in enumerate(todo2):
                report("pass2", n, len(todo2), plan.item.rel)
                inter_path = work / sample_filename(plan.key)
                record = read_record(inter_path)
                try:
                    if record is None:
                        raise ValueError("pass-1 intermediate is missing or unreadable; run again")
                    inter = load_file(str(inter_path))
                    record.pop("_tensors", None)
                    tensors = _pass2_item(inter, record, model, sil, cfg.prompt_style)
                except ValueError as exc:
                    fail(plan.key, str(exc))
                    continue
                record["dtype"] = str(dtype).removeprefix("torch.")
                write_tensors(final_path(plan.key), tensors, record)
                done_records[plan.key] = record
                inter_path.unlink(missing_ok=True)
                rep.items += 1
                rep.audio_seconds += record["duration"]
            report("pass2", len(todo2), len(todo2))
            model = loaded = None  # noqa: F841
            _release(device)
        passes.append(rep)

    # ---------------- manifest ----------------
    samples = []
    warnings = [(str(dataset_json), w) for w in settings.warnings]
    for p in plans:
        record = done_records.get(p.key)
        if record is None or p.key in failed_keys:
            continue
        entry = {k: v for k, v in record.items() if not k.startswith("_")}
        # metadata warnings come from the current metadata (a re-used file keeps its key when only a
        # rejected value changed); the audio's come from its decode
        entry.update({"id": p.item.id, "file": sample_filename(p.key), "audio": p.item.rel,
                      "warnings": p.item.meta.warnings + record.get("audio_warnings", []),
                      "declared_instrumental": p.declared_instrumental})
        samples.append(entry)
        warnings += [(p.item.id, w) for w in entry["warnings"]]
    dataset_report = quality.report(samples)
    keep = {s["file"] for s in samples}
    for f in out.iterdir():  # stale samples of earlier runs
        if is_sample_filename(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)
    pending = {sample_filename(p.key) for p in plans}
    for f in work.iterdir():
        if is_sample_filename(f.name) and f.name not in pending:
            f.unlink(missing_ok=True)

    encoded_keys = {p.key for p in todo if p.key not in failed_keys}
    encoded = len(encoded_keys)
    reused = sum(1 for s in samples if s["key"] not in encoded_keys)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"sidestep {__version__}",
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "variant": info.variant,
            "is_turbo": info.is_turbo,
            "layout": info.layout,
            "source": str(comps.checkpoint),
            "identity": info.identity,
            "vae": str(comps.vae),
            "text_encoder": str(comps.text_encoder),
            "tokenizer": str(comps.tokenizer),
            "identities": model_key,
            "dtype": samples[0].get("dtype") if samples else None,
            "encoder_hidden_size": info_model.config.enc_hidden,
        },
        "prompt_style": cfg.prompt_style,
        "settings": {
            **cfg.key_settings(),
            "default_caption": cfg.default_caption,
            "default_language": cfg.language(),
            "timbre_reference": "silence[:750]" if cfg.prompt_style == "acestep" else "silence[:T]",
        },
        "dataset": {
            "audio_dir": str(audio_dir),
            "dataset_json": str(dataset_json) if dataset_json else None,
            **settings.to_dict(),
        },
        "num_samples": len(samples),
        "samples": samples,
        "failed": [f.to_dict() for f in failures],
        "warnings": [{"path": path, "warning": text} for path, text in warnings],
        "quality": dataset_report,
        "stats": {"encoded": encoded, "reused": reused, "passes": [r.to_dict() for r in passes]},
        "audio_index": index.entries,
    }
    path = write_manifest(out, manifest)
    report("done", len(samples), len(plans))
    return PreprocessResult(out, path, len(samples), encoded, reused, failures, passes, warnings, dataset_report)


def _list(value) -> list:
    """A list from an earlier manifest, or none when it holds something else (another version, an edit)."""
    return value if isinstance(value, list) else []


def _inside_or_same(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _nothing_usable(audio_dir: Path, failures: list[Failure]) -> str:
    if not failures:
        kinds = ", ".join(sorted(AUDIO_EXTENSIONS))
        return f"{audio_dir}: no audio files found (looked for {kinds}, in sub-folders too)"
    lines = "\n".join(one_line(f"  {f.path}: {f.reason}") for f in failures[:50])
    more = f"\n  … and {len(failures) - 50} more" if len(failures) > 50 else ""
    return f"{audio_dir}: no usable audio files; every one was skipped:\n{lines}{more}"
