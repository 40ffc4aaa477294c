"""Auto-labelling: the planner LM describes a song from its audio codes, as upstream's dataset tools do.

Upstream labels a song by encoding it to codes, giving them to the LM with the "understand" instruction and parsing
the chain of thought it writes (``bpm``, ``caption``, ``duration``, ``genres``, ``keyscale``, ``language``,
``timesignature``, in that order). Here the CoT is decoded under constraints: the field names and every value the
user already gave are fed to the LM as they are (so its guesses are conditioned on them), the duration is the
song's, bpm / key / time signature / language are chosen among their valid values only, and the caption is free
text up to the end of its line. Any LM, even a random one, therefore yields well-formed labels.

Results go to ``song.labels.txt`` (see :mod:`sidestep_core.data.metadata`): only the fields the user left empty,
never into the user's own files, and an existing labels file is kept (delete it to label the song again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.metadata import LABELS_SUFFIX, SampleMeta, missing_label_fields, sidecar_paths
from ..fsutil import atomic_write_bytes
from . import vocab as V
from .prompts import understand_prompt_ids

VALID_BPM = [str(b) for b in range(30, 301)]
VALID_TIME_SIGNATURES = ["2", "3", "4", "6"]
VALID_KEYSCALES = [f"{n}{a} {m}" for n in "ABCDEFG" for a in ("", "#", "b", "♯", "♭") for m in ("major", "minor")]
VALID_LANGUAGES = (
    "ar az bg bn ca cs da de el en es fa fi fr he hi hr ht hu id is it ja ko la lt ms ne nl no pa pl pt ro ru sa sk "
    "sr sv sw ta te th tl tr uk ur vi yue zh unknown").split()
MAX_CAPTION_TOKENS = 120
_CHOICES = {"bpm": VALID_BPM, "keyscale": VALID_KEYSCALES, "language": VALID_LANGUAGES,
            "timesignature": VALID_TIME_SIGNATURES}
_COT_ORDER = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")


@dataclass
class Labels:
    """What the LM said about one song (only the fields it was asked for)."""

    fields: dict[str, str]
    cot: str  # the whole chain of thought, as decoded


@dataclass
class LabelResult:
    rel: str
    status: str  # "labelled" | "complete" (nothing missing) | "kept" (labels file exists) | "failed"
    fields: dict[str, str] = field(default_factory=dict)
    reason: str = ""


class Stream:
    """Incremental decoding with the KV cache: feed ids, read the next-token logits."""

    def __init__(self, model, ids: list[int]):
        import inspect

        self.model = model
        self.device = model.get_input_embeddings().weight.device
        # transformers 5 renamed the cache argument; older releases only know ``past_key_values``
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.past = None
        self.logits = self.feed(ids)

    @torch.no_grad()
    def feed(self, ids: list[int]) -> torch.Tensor:
        if ids:
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=x, use_cache=True, **{self.cache_arg: self.past})
            self.past = out.cache if self.cache_arg == "cache" else out.past_key_values
            self.logits = out.logits[0, -1].float().cpu()
        return self.logits


def _pick(logits: torch.Tensor, allowed: list[int] | torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    allowed = torch.as_tensor(allowed, dtype=torch.long)
    sub = logits[allowed]
    if temperature <= 0:
        return int(allowed[torch.argmax(sub)])
    probs = torch.softmax(sub / temperature, dim=-1)
    return int(allowed[torch.multinomial(probs, 1, generator=gen)])


def _choose(stream: Stream, tokenizer, options: list[str], temperature: float, gen: torch.Generator) -> str:
    """One of ``options`` (each followed by a newline), decoded over the token trie of the options."""
    seqs = {opt: tokenizer.encode(opt + "\n") for opt in options}
    prefix: list[int] = []
    while True:
        live = {o: s for o, s in seqs.items() if s[:len(prefix)] == prefix}
        done = [o for o, s in live.items() if len(s) == len(prefix)]
        if done:
            return done[0]
        allowed = sorted({s[len(prefix)] for s in live.values()})
        tok = _pick(stream.logits, allowed, temperature, gen)
        prefix.append(tok)
        stream.feed([tok])


def _free_line(stream: Stream, tokenizer, temperature: float, gen: torch.Generator, text_ids: torch.Tensor) -> str:
    """Free text up to the first newline (or the token limit); special tokens and codes are not allowed."""
    out: list[int] = []
    for _ in range(MAX_CAPTION_TOKENS):
        tok = _pick(stream.logits, text_ids, temperature, gen)
        out.append(tok)
        stream.feed([tok])
        if "\n" in tokenizer.decode([tok]):
            return tokenizer.decode(out).split("\n", 1)[0]
    stream.feed(tokenizer.encode("\n"))
    return tokenizer.decode(out)


def _clean_caption(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[\x00-\x1f\x7f]", " ", text)).strip()


def understand(
    planner,
    codes: list[int],
    *,
    known: Optional[dict[str, str]] = None,
    want: Optional[list[str]] = None,
    duration: Optional[float] = None,
    temperature: float = 0.7,
    seed: int = 0,
) -> Labels:
    """Labels for the fields in ``want`` (default: all of caption, bpm, keyscale, timesignature, language) from a
    song's codes. ``known`` values are fed as given; ``duration`` (seconds) is fed when known."""
    tok = planner.tokenizer
    want = list(want if want is not None else ("caption", "bpm", "keyscale", "timesignature", "language"))
    known = {k: str(v) for k, v in (known or {}).items() if v not in (None, "")}
    gen = torch.Generator().manual_seed(int(seed))
    stream = Stream(planner.model, understand_prompt_ids(tok, codes))
    # Plain text tokens only: below the first added token (Qwen3's specials) and not a code.
    text_ids = torch.arange(min(V.FIRST_ADDED_ID, tok.code_offset, planner.vocab_rows))
    cot = [f"{V.THINK}\n"]
    stream.feed(tok.encode(f"{V.THINK}\n"))
    fields: dict[str, str] = {}
    for name in _COT_ORDER:
        given = (str(int(duration)) if duration else None) if name == "duration" else known.get(name)
        if given is None and name not in want:
            continue
        head = f"{name}: "
        stream.feed(tok.encode(head))
        if given is not None:
            value = given
            stream.feed(tok.encode(value + "\n"))
        elif name == "caption":
            value = _clean_caption(_free_line(stream, tok, temperature, gen, text_ids))
        else:
            value = _choose(stream, tok, _CHOICES[name], temperature, gen)
        cot.append(f"{head}{value}\n")
        if given is None and value:
            fields[name] = value
    cot.append(V.THINK_END)
    return Labels(fields, "".join(cot))


def write_labels(audio: Path, fields: dict[str, str], model_note: str) -> Path:
    """``song.labels.txt`` holding ``fields``; never replaces an existing file (raises FileExistsError)."""
    path = sidecar_paths(audio)["labels"]
    if path.exists():
        raise FileExistsError(path)
    lines = [
        f"# Generated by `sidestep label` ({model_note}). Edit or delete freely: values in {audio.stem}.txt,",
        "# the caption/lyrics sidecars or the dataset JSON always take precedence over these.",
    ]
    lines += [f"{k}: {fields[k]}" for k in ("caption", "bpm", "keyscale", "timesignature", "language") if k in fields]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _known_fields(meta: SampleMeta) -> dict[str, str]:
    out = {"caption": _clean_caption(meta.caption)} if meta.caption.strip() else {}
    for k in ("bpm", "keyscale", "timesignature", "language"):
        if getattr(meta, k) is not None:
            out[k] = str(getattr(meta, k))
    return out


def label_folder(
    checkpoint: str | Path,
    audio_dir: str | Path,
    *,
    lm: Optional[str | Path] = None,
    lm_tokenizer: Optional[str | Path] = None,
    dataset_json: Optional[str | Path] = None,
    vae: Optional[str | Path] = None,
    device: str = "cpu",
    temperature: float = 0.7,
    seed: int = 0,
    cache_dir: Optional[str | Path] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> list[LabelResult]:
    """Label every song of ``audio_dir`` that lacks a caption, bpm, key, time signature or language.

    ``lm`` / ``vae`` None: the ones beside the checkpoint. Audio is decoded and VAE-encoded (posterior mean),
    turned into codes with the checkpoint's audio tokenizer
    (cached in ``cache_dir``, default ``<audio_dir>/.sidestep-codes``) and described by the LM."""
    from ..audio.decode import AudioError, DecodeWorker, decode_audio
    from ..data.discovery import collect_items
    from ..model.loading import load_acestep, resolve_dit_folder
    from .. import vae as vae_mod
    from .codes import CodeCache, check_codebook
    from .loading import find_planner, load_planner

    audio_dir = Path(audio_dir).expanduser()
    items, failures, _ = collect_items(audio_dir, dataset_json=dataset_json)
    results = [LabelResult(f.rel, "failed", reason=f.reason) for f in failures]
    todo = []
    for item in items:
        if sidecar_paths(item.path)["labels"].exists():
            results.append(LabelResult(item.rel, "kept", reason=f"{item.path.stem}{LABELS_SUFFIX} exists"))
        elif not missing_label_fields(item.meta):
            results.append(LabelResult(item.rel, "complete"))
        else:
            todo.append(item)
    if not todo:
        return results
    loaded = load_acestep(checkpoint, parts={"tokenizer"}, device=device)
    # bf16 on CUDA as upstream's LM inference (fp32 would need 7 GB of VRAM for the 1.7B LM, 16 GB for the 4B)
    planner = load_planner(lm if lm is not None else find_planner(checkpoint), tokenizer=lm_tokenizer,
                           dtype=torch.bfloat16 if torch.device(device).type == "cuda" else None, device=device)
    check_codebook(loaded.model, planner)
    ckpt = Path(checkpoint).expanduser()
    dit = (resolve_dit_folder(ckpt) or ckpt) if ckpt.is_dir() else ckpt
    vae = vae_mod.load_vae(Path(vae).expanduser() if vae else vae_mod.find_vae(dit), device=device)
    # ComfyUI layouts carry no silence_latent.pt: derive it from the VAE, as preprocessing does
    silence = loaded.silence_latent if loaded.silence_latent is not None else vae_mod.silence_latent_from_vae(vae)
    cache = CodeCache(Path(cache_dir) if cache_dir else audio_dir / ".sidestep-codes", loaded.model, silence)
    note = f"{planner.describe()}, temperature {temperature:g}, seed {seed}"
    with DecodeWorker() as worker:
        for n, item in enumerate(todo):
            if progress:
                progress(n, len(todo), item.rel)
            try:
                decoded = decode_audio(item.path, worker=worker)
                latents = vae_mod.encode_audio(vae, decoded.waveform)
                codes = cache.codes(latents).tolist()
                labels = understand(planner, codes, known=_known_fields(item.meta),
                                    want=missing_label_fields(item.meta), duration=decoded.duration,
                                    temperature=temperature, seed=seed)
                write_labels(item.path, labels.fields, note)
            except FileExistsError:
                results.append(LabelResult(item.rel, "kept", reason="labels file appeared meanwhile"))
                continue
            except (AudioError, ValueError, OSError) as exc:
                results.append(LabelResult(item.rel, "failed", reason=str(exc)))
                continue
            results.append(LabelResult(item.rel, "labelled", labels.fields))
    if progress:
        progress(len(todo), len(todo), "")
    return results
