"""Text-to-music with the core model: prompt → conditions → sampler → VAE → 48 kHz stereo.

Conditions are built the way preprocessing builds the training cache (``data/preprocess.py``): the same prompt
templates and tokenisation (``text.prompts.tokenize``), the Qwen3 caption states and lyric embeddings
(``text.encoder.TextEncoder``), the condition encoder run in the checkpoint's stored dtype with all-ones masks and
the silence latent as timbre reference (first 750 frames for the ``acestep`` prompt style, T frames for
``comfyui``), and ``context_latents`` = silence ‖ ones. A model trained on that cache therefore sees at generation
time exactly what it saw in training (tests/test_generate.py compares the two paths tensor for tensor).

Sampling is :mod:`sidestep_core.inference.sampling` (upstream ``generate_audio``); decoding is the Oobleck VAE,
tiled over long latents. Adapters are applied through :func:`sidestep_core.adapters.apply_unmerged` (hooks; the
base weights stay untouched, the strength can change between renders).

Lengths: ``frames = round(seconds · 48000 / 1920)`` (ComfyUI's empty ACE-Step 1.5 latent), audio =
``frames · 1920`` samples.

With a planner LM (``Generator.load(lm=…)``) the LM first writes the prompt's audio codes (as ComfyUI's
``generate_audio_codes``; :mod:`sidestep_core.planner.write`), with the LM adapter that came with the DiT adapter when
there is one, and the DiT renders on them (``conditioning.codes_hints``).
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .. import conditioning
from ..adapters.choice import is_training_run, resolve_checkpoint, run_checkpoints
from ..model.model import AceStepModel
from . import sampling

Progress = Callable[[dict], None]

SAMPLE_RATE = 48000
HOP = 1920
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 25
MAX_SECONDS = 600.0
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------


def frames_for(seconds: float) -> int:
    """Latent frames for a duration, at least 1: ``round(seconds · 48000 / 1920)``, the expression ComfyUI's
    EmptyAceStep1.5LatentAudio uses (so the same seconds give the same length, float rounding included)."""
    if not (0 < float(seconds) <= MAX_SECONDS):
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], not {seconds}")
    return max(1, int(round(float(seconds) * SAMPLE_RATE / HOP)))


@dataclass
class Prompt:
    """One text-to-music request. Empty lyrics mean an instrumental (``[Instrumental]``, as preprocessing)."""

    caption: str
    lyrics: str = ""
    seconds: float = 10.0
    seed: int = 0
    bpm: Optional[str] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str] = None
    language: Optional[str] = None  # None: the prompt style's default ("unknown" / "en")
    name: Optional[str] = None  # used in file names

    _ALIASES = {"key": "keyscale", "key_scale": "keyscale", "duration": "seconds", "time_signature": "timesignature",
                "tags": "caption", "prompt": "caption", "lyric": "lyrics"}

    @classmethod
    def from_dict(cls, d: Union[str, dict[str, Any]]) -> "Prompt":
        """From a JSON-like dict (``key``/``duration``/``time_signature`` accepted as aliases) or a bare caption."""
        if isinstance(d, str):
            return cls(caption=d)
        if not isinstance(d, dict):
            raise ValueError(f"a prompt must be a caption string or an object, not {type(d).__name__}")
        fields = {}
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        for k, v in d.items():
            k2 = cls._ALIASES.get(k, k)
            if k2 not in known:
                raise ValueError(f"unknown prompt field {k!r} (known: {', '.join(sorted(known))})")
            fields[k2] = v
        if "caption" not in fields:
            raise ValueError("a prompt needs a caption")
        p = cls(**fields)
        p.validate()
        return p

    def validate(self) -> "Prompt":
        self.seconds = float(self.seconds)
        frames_for(self.seconds)
        self.seed = int(self.seed)
        for name in ("bpm", "keyscale", "timesignature"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, str(v).strip() or None)
        return self

    @property
    def frames(self) -> int:
        return frames_for(self.seconds)

    @property
    def samples(self) -> int:
        return self.frames * HOP

    def slug(self, index: Optional[int] = None) -> str:
        base = self.name or self.caption or "prompt"
        s = re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_").lower()[:40] or "prompt"
        return f"{index:02d}_{s}" if index is not None else s

    def prompt_inputs(self, style: str):
        from ..text.prompts import DEFAULT_LANGUAGE, INSTRUMENTAL, PromptInputs

        if style not in DEFAULT_LANGUAGE:
            raise ValueError(f"unknown prompt style {style!r}")
        lyrics = self.lyrics if self.lyrics and self.lyrics.strip() else INSTRUMENTAL
        return PromptInputs(caption=self.caption, lyrics=lyrics, language=self.language or DEFAULT_LANGUAGE[style],
                            duration=self.seconds, bpm=self.bpm, keyscale=self.keyscale,
                            timesignature=self.timesignature)

    def lm_inputs(self):
        """What the planner LM is given to write this prompt's codes."""
        from ..planner.prompts import LMInputs

        return LMInputs(caption=self.caption, lyrics=self.lyrics, bpm=self.bpm, keyscale=self.keyscale,
                        timesignature=self.timesignature, duration=self.seconds, language=self.language)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class SamplerSettings:
    """Sampler options; ``None`` takes the model's recommendation (``ModelInfo``: turbo 8 steps shift 3, no CFG;
    base/SFT 50 steps, guidance 7, shift 1). Turbo ignores ``steps`` and ``guidance`` (fixed table, no CFG)."""

    steps: Optional[int] = None
    shift: Optional[float] = None
    guidance: Optional[float] = None
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    guidance_mode: str = "apg"  # apg | cfg
    noise: str = "comfyui"  # comfyui | acestep (see sampling.make_noise)

    def resolved(self, info) -> "SamplerSettings":
        return replace(
            self,
            steps=int(self.steps if self.steps is not None else info.steps),
            shift=float(self.shift if self.shift is not None else info.shift),
            guidance=float(self.guidance if self.guidance is not None else info.guidance),
            cfg_interval=(float(self.cfg_interval[0]), float(self.cfg_interval[1])),
        )

    def describe(self, turbo: bool) -> str:
        if turbo:
            return f"turbo, 8 steps, shift {sampling.snap_turbo_shift(self.shift):g}"
        g = f"{self.guidance_mode.upper()} {self.guidance:g}" if self.guidance and self.guidance > 1 else "no CFG"
        return f"base, {self.steps} steps, shift {self.shift:g}, {g}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d


@dataclass
class Conditions:
    """What the decoder is conditioned on for one prompt (batch 1)."""

    encoder_hidden_states: torch.Tensor  # [1, L, H]
    encoder_attention_mask: torch.Tensor  # [1, L] bool (the DiT ignores it)
    context_latents: torch.Tensor  # [1, T, 128]

    @property
    def frames(self) -> int:
        return self.context_latents.shape[1]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Conditions":
        return Conditions(self.encoder_hidden_states.to(device=device, dtype=dtype),
                          self.encoder_attention_mask.to(device=device),
                          self.context_latents.to(device=device, dtype=dtype))


@dataclass
class GeneratedAudio:
    waveform: torch.Tensor  # [2, S] float32 on the CPU
    sample_rate: int
    latents: torch.Tensor  # [T, 64] float32
    prompt: Prompt
    settings: SamplerSettings
    seconds_taken: float = 0.0
    label: str = ""
    strength: Optional[float] = None
    adapter: Optional[str] = None
    codes: Optional[list[int]] = None  # the audio codes the planner LM wrote for this render, if it did


# ----------------------------------------------------------------------------------------------------------
# pieces usable on their own (previews use them with models the training loop already holds)
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: Union[str, torch.device, None]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device, name: Optional[str] = None) -> torch.dtype:
    """``name`` if given, else bf16 on CUDA and fp32 elsewhere (upstream's choice)."""
    if name:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def text_states(text, prompt: Prompt, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption states [Lt, H], lyric embeddings [Ll, H]) float32 on the CPU for ``prompt``."""
    from ..text.prompts import tokenize

    toks = tokenize(text.tokenizer, prompt.prompt_inputs(style), style)
    text.check_ids(toks.text_ids, "caption")
    text.check_ids(toks.lyric_ids, "lyric")
    return text.encode_caption(toks.text_ids), text.embed_lyrics(toks.lyric_ids)


def encode_conditions(model: AceStepModel, caption_states: torch.Tensor, lyric_states: torch.Tensor,
                      silence: torch.Tensor, frames: int, style: str, codes: Optional[torch.Tensor] = None
                      ) -> Conditions:
    """The condition-encoder pass exactly as preprocessing runs it (with the LM's ``codes`` as hints when given);
    CPU tensors in the encoder's dtype."""
    states, mask, context = conditioning.encode_conditions(model, caption_states, lyric_states, silence, frames, style,
                                                           codes)
    return Conditions(states[None].cpu(), mask[None].cpu(), context[None].cpu())


def base_param_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's frozen (base) weights, else of its first parameter."""
    first = None
    for p in module.parameters():
        if first is None:
            first = p.dtype
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return first or torch.float32


class DecoderCall:
    """Calls a decoder (``AceStepDiT``, the training loop's ``TrainModule``, or any module taking the DiT's keyword
    arguments) in ``dtype`` with autocast when that dtype is not fp32 (as the training objective does, so fp32
    adapter weights on a bf16 base work), returning the velocity in ``dtype``."""

    def __init__(self, decoder: Callable, dtype: torch.dtype, device: torch.device):
        self.decoder, self.dtype, self.device = decoder, dtype, device

    def __call__(self, **kw) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.decoder(**kw)
        return out.to(self.dtype)


def sample_latents(
    decoder: Callable,
    cond: Conditions,
    seed: Optional[int],
    settings: SamplerSettings,
    *,
    turbo: bool,
    null_condition_emb: Optional[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """Latents [1, T, 64] (in ``dtype``, on ``device``) for one prompt's conditions; never touches the global RNG
    when ``seed`` is given (or a ``generator``)."""
    c = cond.to(device=device, dtype=dtype)
    noise = sampling.make_noise(1, c.frames, seed, mode=settings.noise, device=device, dtype=dtype,
                                generator=generator)
    null = null_condition_emb.to(device=device, dtype=dtype) if null_condition_emb is not None else None
    call = DecoderCall(decoder, dtype, device)
    return sampling.sample(
        call, c.encoder_hidden_states, c.context_latents, noise, turbo=turbo, null_condition_emb=null,
        steps=settings.steps, shift=settings.shift, guidance_scale=settings.guidance,
        cfg_interval=settings.cfg_interval, guidance=settings.guidance_mode, progress=progress,
    )


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, chunk_frames: int = 1500, overlap_frames: int = 32,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Audio [B, 2, T·hop] float32 on the CPU from latents [B, T, 64], in overlapping tiles of ``chunk_frames``
    (60 s) with ``overlap_frames`` of context either side (more than the decoder's receptive field)."""
    param = next(vae.parameters())
    device = device or param.device
    hop = 1
    for r in vae.config.downsampling_ratios:
        hop *= int(r)
    z = latents.transpose(1, 2)  # [B, 64, T]
    total = z.shape[-1]
    pieces = []
    for start in range(0, total, chunk_frames):
        end = min(total, start + chunk_frames)
        lo, hi = max(0, start - overlap_frames), min(total, end + overlap_frames)
        part = z[..., lo:hi].to(device=device, dtype=param.dtype)
        audio = vae.decode(part).sample.float()
        pieces.append(audio[..., (start - lo) * hop:(end - lo) * hop].cpu())
    return torch.cat(pieces, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# FLAC
# ----------------------------------------------------------------------------------------------------------


def flac_bytes(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit FLAC of [C, S] float audio (clipped to [-1, 1]), encoded with PyAV."""
    import av

    wave = waveform.detach().float().cpu()
    if wave.ndim != 2 or wave.shape[0] not in (1, 2):
        raise ValueError(f"expected audio [channels (1 or 2), samples], got {tuple(wave.shape)}")
    channels = wave.shape[0]
    pcm = (wave.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy()  # [C, S]
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=sample_rate)
        stream.layout = "stereo" if channels == 2 else "mono"
        stream.format = "s16"
        block = 4608
        for start in range(0, pcm.shape[1], block):
            chunk = np.ascontiguousarray(pcm[:, start:start + block].T).reshape(1, -1)  # packed, interleaved
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=stream.layout.name)
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def write_flac(path: Union[str, Path], waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write ``waveform`` [C, S] as FLAC (atomically: a temporary file renamed into place)."""
    from ..fsutil import atomic_write_bytes

    path = Path(path).expanduser()
    atomic_write_bytes(path, flac_bytes(waveform, sample_rate))
    return path


# ----------------------------------------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------------------------------------


class Generator:
    """Everything text-to-music needs, loaded once: DiT (decoder, condition encoder, null condition), Qwen3 text
    encoder + tokenizer, VAE and the silence latent. ``generate(prompt)`` renders one prompt."""

    def __init__(self, model: AceStepModel, info, silence: torch.Tensor, text, vae, *, device: torch.device,
                 dtype: torch.dtype, prompt_style: str = "acestep", progress: Optional[Progress] = None,
                 planner=None, code_sampling=None):
        self.model, self.info, self.silence, self.text, self.vae = model, info, silence, text, vae
        self.device, self.dtype, self.prompt_style = device, dtype, prompt_style
        self.progress = progress
        self.adapter = None  # the AppliedAdapter currently hooked in, if any
        self.adapter_path: Optional[str] = None
        self.planner = planner  # the planner LM: it writes each prompt's audio codes first
        self.code_sampling = code_sampling
        self.lm_adapter = None  # the AppliedLMAdapter on the planner, if any

    # ----- loading -----
    @classmethod
    def load(
        cls,
        checkpoint: Union[str, Path],
        *,
        vae: Optional[Union[str, Path]] = None,
        text_encoder: Optional[Union[str, Path]] = None,
        tokenizer: Optional[Union[str, Path]] = None,
        variant: Optional[str] = None,
        device: Union[str, torch.device, None] = "auto",
        dtype: Optional[str] = None,
        prompt_style: str = "acestep",
        progress: Optional[Progress] = None,
        lm: Optional[Union[str, Path]] = None,
        lm_tokenizer: Optional[Union[str, Path]] = None,
        code_sampling=None,
    ) -> "Generator":
        """Find and load every part of ``checkpoint`` (any layout). The condition encoder keeps the checkpoint's
        stored dtype, as preprocessing runs it; the decoder runs in ``dtype`` (default bf16 on CUDA, fp32 on CPU).
        ``lm``: the planner LM, which then writes every prompt's audio codes (``code_sampling``: a
        :class:`~sidestep_core.planner.write.CodeSampling`, default ComfyUI's)."""
        from .. import vae as vae_mod
        from ..data.preprocess import PreprocessConfig, find_components
        from ..model import load_acestep
        from ..model.loading import open_source
        from ..text import encoder as te_mod
        from ..text.prompts import PROMPT_STYLES

        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}, not {prompt_style!r}")
        dev = resolve_device(device)
        dt = default_dtype(dev, dtype)
        open_source(Path(checkpoint).expanduser())  # "not an ACE-Step model" before any search for its parts
        comps = find_components(checkpoint, PreprocessConfig(
            vae=str(vae) if vae else None, text_encoder=str(text_encoder) if text_encoder else None,
            tokenizer=str(tokenizer) if tokenizer else None))
        parts = {"decoder", "encoder", "null_condition_emb"} | ({"tokenizer", "detokenizer"} if lm else set())
        loaded = load_acestep(checkpoint, variant=variant, device=dev, parts=parts)
        model = loaded.model
        model.decoder.to(dt)
        model.null_condition_emb.data = model.null_condition_emb.data.to(dt)
        te_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # preprocessing's default
        text = te_mod.TextEncoder(te_mod.load_text_encoder(comps.text_encoder, dtype=te_dtype, device=dev),
                                  te_mod.load_tokenizer(comps.tokenizer))
        if text.hidden_size != loaded.config.text_hidden_dim:
            raise te_mod.TextEncoderError(
                f"{comps.text_encoder}: text encoder width {text.hidden_size} does not match the model's text input "
                f"({loaded.config.text_hidden_dim}); it belongs to another model")
        vae_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        vae_model = vae_mod.load_vae(comps.vae, dtype=vae_dtype, device=dev)
        silence = loaded.silence_latent
        if silence is None:
            silence = vae_mod.silence_latent_from_vae(vae_model)
        planner = None
        if lm:
            from ..planner.codes import check_codebook
            from ..planner.loading import load_planner
            from ..planner.write import CodeSampling

            planner = load_planner(lm, tokenizer=lm_tokenizer, dtype=te_dtype, device=dev)
            check_codebook(model, planner)
            code_sampling = code_sampling or CodeSampling()
        return cls(model, loaded.info, silence.float().cpu(), text, vae_model, device=dev, dtype=dt,
                   prompt_style=prompt_style, progress=progress, planner=planner, code_sampling=code_sampling)

    @property
    def turbo(self) -> bool:
        return bool(self.info.is_turbo)

    # ----- adapters -----
    def set_adapter(self, path: Optional[Union[str, Path]], strength: float = 1.0) -> None:
        """Hook the adapter at ``path`` into the decoder (replacing any other); ``None`` removes it. With a planner
        LM, the LM adapter that came with it (a run's ``<folder>/lm``) goes onto the LM at the same strength; a run
        that trained the LM alone leaves the decoder as it is."""
        from ..adapters import apply_unmerged, read_adapter_weights
        from ..planner.lm_adapter import has_dit_adapter
        from ..planner.write import AppliedLMAdapter, lm_adapter_folder

        self.remove_adapter()
        if path is None:
            return
        lm_folder = lm_adapter_folder(path) if self.planner is not None and Path(path).is_dir() else None
        if lm_folder is None or has_dit_adapter(Path(path)):
            self.adapter = apply_unmerged(self.model, read_adapter_weights(path), strength)
        if lm_folder is not None:
            self.lm_adapter = AppliedLMAdapter(self.planner, lm_folder, strength)
        self.adapter_path = str(path)

    def set_strength(self, strength: float) -> None:
        if self.adapter is None and self.lm_adapter is None:
            raise ValueError("no adapter is applied")
        for a in (self.adapter, self.lm_adapter):
            if a is not None:
                a.set_strength(strength)

    def remove_adapter(self) -> None:
        for a in (self.adapter, self.lm_adapter):
            if a is not None:
                a.remove()
        self.adapter, self.lm_adapter, self.adapter_path = None, None, None

    @property
    def strength(self) -> Optional[float]:
        applied = self.adapter or self.lm_adapter
        return applied.strength if applied is not None else None

    # ----- the steps -----
    def codes(self, prompt: Prompt) -> Optional[torch.Tensor]:
        """The audio codes the planner LM (with the LM adapter applied now) writes for ``prompt``; None without
        an LM."""
        if self.planner is None:
            return None
        from ..planner.write import code_count, write_codes

        return torch.tensor(write_codes(self.planner, prompt.lm_inputs(), self.prompt_style, seed=prompt.seed,
                                        count=code_count(prompt.seconds), sampling=self.code_sampling))

    def conditions(self, prompt: Prompt, codes: Optional[torch.Tensor] = None) -> Conditions:
        """The prompt's conditions; with a planner LM, on ``codes`` or else the codes it writes now (adapters as
        applied)."""
        caption, lyric = text_states(self.text, prompt, self.prompt_style)
        return encode_conditions(self.model, caption, lyric, self.silence, prompt.frames, self.prompt_style,
                                 codes if codes is not None else self.codes(prompt))

    def settings(self, settings: Optional[SamplerSettings] = None) -> SamplerSettings:
        return (settings or SamplerSettings()).resolved(self.info)

    def latents(self, cond: Conditions, seed: int, settings: SamplerSettings) -> torch.Tensor:
        return sample_latents(self.model.decoder, cond, seed, settings, turbo=self.turbo,
                              null_condition_emb=self.model.null_condition_emb, device=self.device,
                              dtype=self.dtype, progress=self.progress)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def generate(self, prompt: Prompt, settings: Optional[SamplerSettings] = None,
                 cond: Optional[Conditions] = None) -> GeneratedAudio:
        t0 = time.perf_counter()
        s = self.settings(settings)
        codes = None
        if cond is None:
            codes = self.codes(prompt)
            cond = self.conditions(prompt, codes)
        lat = self.latents(cond, prompt.seed, s)
        wave = self.decode(lat)[0]
        strength = self.strength
        return GeneratedAudio(wave, SAMPLE_RATE, lat[0].float().cpu(), prompt, s, time.perf_counter() - t0,
                              adapter=self.adapter_path, strength=strength,
                              codes=codes.tolist() if codes is not None else None)


# ----------------------------------------------------------------------------------------------------------
# comparison: base vs adapter strengths vs checkpoints
# ----------------------------------------------------------------------------------------------------------


def compare(
    gen: Generator,
    prompt: Prompt,
    adapter: Optional[Union[str, Path]] = None,
    *,
    strengths: Sequence[float] = (0.0, 0.5, 1.0),
    checkpoints: Iterable[tuple[str, Union[str, Path]]] = (),
    checkpoint_strength: float = 1.0,
    settings: Optional[SamplerSettings] = None,
) -> list[GeneratedAudio]:
    """The same prompt and seed rendered at each strength of ``adapter`` (0 = the base model, no adapter) and with
    each ``(label, adapter)`` in ``checkpoints`` at ``checkpoint_strength``. Conditions are encoded once (with a
    planner LM, for each render: its codes follow the LM adapter); the noise is the same for every render, so the
    differences are the adapters' alone. Leaves no adapter applied.

    ``adapter`` may be a training run folder: its ``final`` adapter (else its latest checkpoint) is the one the
    strengths apply to, and its checkpoints (with their EMA twins) are added to ``checkpoints``.
    """
    checkpoints = list(checkpoints)
    if adapter is not None and is_training_run(adapter):
        found = run_checkpoints(adapter)
        if not found:
            raise ValueError(f"{adapter}: training run without checkpoints or final adapter")
        checkpoints = [c for c in found if c[0] != "final"] + checkpoints
        adapter = resolve_checkpoint(adapter, "final" if (Path(adapter).expanduser() / "final").is_dir() else "last")
    s = gen.settings(settings)
    cond = gen.conditions(prompt) if gen.planner is None else None  # with an LM: its codes follow each adapter
    results: list[GeneratedAudio] = []
    try:
        for strength in strengths:
            if strength == 0:
                gen.remove_adapter()
                r = gen.generate(prompt, s, cond)
                r.label, r.strength = "base", 0.0
            elif adapter is None:
                continue  # no adapter to apply at this strength
            else:
                if gen.adapter_path != str(adapter):
                    gen.set_adapter(adapter, strength)
                else:
                    gen.set_strength(strength)
                r = gen.generate(prompt, s, cond)
                r.label = f"strength_{strength:g}"
            results.append(r)
        for label, path in checkpoints:
            gen.set_adapter(path, checkpoint_strength)
            r = gen.generate(prompt, s, cond)
            r.label = label
            results.append(r)
    finally:
        gen.remove_adapter()
    return results
