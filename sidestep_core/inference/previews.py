"""Audio previews while training: every N steps, a few fixed prompts rendered with the adapter as it is now.

Usage from a training loop (rank 0 only, with the *unwrapped* module the adapter lives in)::

    renderer = PreviewRenderer.build(checkpoint, out_dir, prompts, every=N, device=device,
                                     null_condition_emb=null, prompt_style=dataset_prompt_style, writer=tb)
    ...
    renderer.maybe_render(step, adapter.module)          # after each optimizer step
    renderer.maybe_render(step, adapter.module, force=True)  # at the end, if wanted

``build`` encodes the prompts once (Qwen3 text encoder + condition encoder, loaded only for that and released),
and keeps the VAE on the CPU between renders. A render:

* switches the module to ``eval()`` and restores every submodule's own train/eval flag afterwards;
* draws its noise from a private generator seeded by each prompt's seed, inside ``torch.random.fork_rng`` (CPU and
  the module's CUDA device), and restores the python and numpy RNGs too — so the training run's random stream,
  and hence every later step, is exactly what it would have been without previews;
* runs under ``no_grad`` with the frozen weights' dtype (autocast when that is not fp32, as the objective does);
* writes ``OUT/previews/step_N/NN_<caption>.flac`` (48 kHz stereo) and ``previews.json`` (prompts, settings,
  timings), and logs each clip to TensorBoard as ``preview/NN_<caption>`` (stereo WAV) when a writer is attached.

The same prompt and seed give the same noise at every step, so successive previews differ only by training.

With a planner LM (``build(lm=…)``, the ``preview_codes`` setting) the LM writes each prompt's audio codes and the
DiT renders on them, as ComfyUI's ``generate_audio_codes`` does. The plain LM's codes are written once at build; in a
run that also trains the LM (``live_lm``), each render has the LM as it is at that step write them instead (its own
generator, in eval mode inside the same isolation), so the previews hear both adapters. The codes are recorded in
``previews.json``.
"""

from __future__ import annotations

import io
import json
import random
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .generate import (
    SAMPLE_RATE,
    Conditions,
    Prompt,
    SamplerSettings,
    base_param_dtype,
    decode_latents,
    default_dtype,
    encode_conditions,
    resolve_device,
    sample_latents,
    text_states,
    write_flac,
)

Progress = Callable[[dict], None]
PREVIEW_DIR = "previews"
MAX_PREVIEW_PROMPTS = 16


def load_preview_prompts(spec: Union[None, str, Path, Sequence[Any]]) -> list[Prompt]:
    """Prompts from a JSON file path, a JSON string, or a list of dicts / caption strings.

    JSON: a list (or ``{"prompts": [...]}``) of objects with ``caption`` and optionally ``lyrics``, ``seconds``,
    ``seed``, ``bpm``, ``key``, ``timesignature``, ``language``, ``name``; a bare string is a caption.
    """
    if spec is None or spec == "" or spec == []:
        return []
    items: Any = spec
    source = "preview prompts"
    if isinstance(spec, (str, Path)):
        text = str(spec).strip()
        if text.startswith("[") or text.startswith("{"):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"preview prompts: invalid JSON ({exc})") from exc
        else:
            path = Path(text).expanduser()
            source = str(path)
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ValueError(f"{path}: cannot read preview prompts ({exc.strerror or exc})") from exc
            except ValueError as exc:
                raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if isinstance(items, dict):
        items = items.get("prompts", items)
        if isinstance(items, dict):
            items = [items]
    if not isinstance(items, list):
        raise ValueError(f"{source}: expected a list of prompts")
    if len(items) > MAX_PREVIEW_PROMPTS:
        raise ValueError(f"{source}: {len(items)} prompts; at most {MAX_PREVIEW_PROMPTS} (each costs a full render)")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Prompt.from_dict(item))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: prompt {i}: {exc}") from exc
    return out


# ----------------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------------


def _wav_bytes(waveform: torch.Tensor, sample_rate: int) -> bytes:
    pcm = (waveform.float().clamp(-1, 1) * 32767.0).round().to(torch.int16).numpy()  # [C, S]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    return buf.getvalue()


def log_audio(writer, tag: str, waveform: torch.Tensor, step: int, sample_rate: int = SAMPLE_RATE) -> bool:
    """Add a stereo clip to TensorBoard. ``writer``: a ``SummaryWriter`` or the training loop's ``TensorBoard``
    wrapper (its ``.w``). Falls back to a mono mix through ``add_audio``. Never raises; returns success."""
    w = getattr(writer, "w", writer)
    if w is None:
        return False
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        audio = Summary.Audio(sample_rate=sample_rate, num_channels=int(waveform.shape[0]),
                              length_frames=int(waveform.shape[-1]),
                              encoded_audio_string=_wav_bytes(waveform, sample_rate), content_type="audio/wav")
        w._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, audio=audio)]), step)
        return True
    except Exception:
        try:
            w.add_audio(tag, waveform.float().mean(0, keepdim=True).clamp(-1, 1), step, sample_rate=sample_rate)
            return True
        except Exception:
            return False


# ----------------------------------------------------------------------------------------------------------
# isolation
# ----------------------------------------------------------------------------------------------------------


class Isolated:
    """eval() for the duration, every submodule's flag restored; global RNGs (torch CPU + CUDA device, python,
    numpy) restored on exit; no grad. Whatever runs inside cannot change what training does next (the training
    loop runs its ``step_hook`` inside one). ``device`` defaults to that of the module's first parameter; ``also``:
    more modules switched to eval the same way (the planner LM being trained)."""

    def __init__(self, module: torch.nn.Module, device: Optional[torch.device] = None,
                 also: Sequence[torch.nn.Module] = ()):
        if device is None:
            param = next(module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.module, self.device, self.also = module, torch.device(device), list(also)

    def __enter__(self):
        self.flags = [(m, m.training) for root in (self.module, *self.also) for m in root.modules()]
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        self.py_state, self.np_state = random.getstate(), np.random.get_state()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        for root in (self.module, *self.also):
            root.eval()
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        self.no_grad.__exit__(*exc)
        random.setstate(self.py_state)
        np.random.set_state(self.np_state)
        self.fork.__exit__(*exc)
        return False


_Isolated = Isolated  # the earlier private name


# ----------------------------------------------------------------------------------------------------------
# the renderer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PreviewRender:
    step: int
    paths: list[Path]
    seconds: float  # wall time of the whole render (sampling + decoding + writing)
    audio_seconds: float


class PreviewRenderer:
    def __init__(
        self,
        out_dir: Union[str, Path],
        prompts: Sequence[Prompt],
        conditions: Sequence[Conditions],
        vae,
        *,
        every: int,
        turbo: bool,
        settings: SamplerSettings,
        null_condition_emb: Optional[torch.Tensor] = None,
        vae_device: Optional[torch.device] = None,
        writer=None,
        progress: Optional[Progress] = None,
        codes: Optional[Sequence[list[int]]] = None,
        encoding: Optional["CodesEncoding"] = None,
    ):
        if len(prompts) != len(conditions):
            raise ValueError("one set of conditions per prompt")
        if not turbo and settings.guidance and settings.guidance > 1 and null_condition_emb is None:
            raise ValueError("previews with guidance need the model's null_condition_emb")
        self.out_dir = Path(out_dir).expanduser()
        self.prompts, self.conditions, self.vae = list(prompts), list(conditions), vae
        self.every, self.turbo, self.settings = int(every), bool(turbo), settings
        self.null = null_condition_emb.detach().cpu() if null_condition_emb is not None else None
        self.vae_device = vae_device
        self.writer = writer
        self.progress = progress
        self.codes = list(codes) if codes is not None else None  # the base LM's codes the conditions were made on
        self.encoding = encoding  # to encode the codes a live LM writes at each render
        self.rendered: dict[int, PreviewRender] = {}

    # ----- building -----
    @classmethod
    def build(
        cls,
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        prompts: Sequence[Union[Prompt, dict, str]],
        every: int,
        *,
        device: Union[str, torch.device, None] = "auto",
        variant: Optional[str] = None,
        null_condition_emb: Optional[torch.Tensor] = None,
        settings: Optional[SamplerSettings] = None,
        prompt_style: str = "acestep",
        vae: Optional[Union[str, Path]] = None,
        text_encoder: Optional[Union[str, Path]] = None,
        tokenizer: Optional[Union[str, Path]] = None,
        writer=None,
        progress: Optional[Progress] = None,
        lm: Optional[Union[str, Path]] = None,
        live_lm: bool = False,
        code_sampling=None,
    ) -> "PreviewRenderer":
        """Encode ``prompts`` for ``checkpoint`` (as preprocessing would) and load the VAE (kept on the CPU).

        The text encoder and condition encoder are loaded on ``device`` only for this and released before returning.
        ``settings`` None → the model's recommended sampler settings. ``lm``: the planner LM writes the prompts'
        audio codes (``code_sampling``, default ComfyUI's); ``live_lm``: renders get the LM being trained, so the
        condition encoder, tokenizer and detokenizer stay (on the CPU) to encode its codes. Leaves every global RNG
        as it found it, so it can be called anywhere in a training loop's setup.
        """
        dev = resolve_device(device)
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                return cls._build(checkpoint, out_dir, prompts, every, device=dev, variant=variant,
                                  null_condition_emb=null_condition_emb, settings=settings, prompt_style=prompt_style,
                                  vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, writer=writer,
                                  progress=progress, lm=lm, live_lm=live_lm, code_sampling=code_sampling)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    @classmethod
    def _build(cls, checkpoint, out_dir, prompts, every, *, device, variant, null_condition_emb, settings,
               prompt_style, vae, text_encoder, tokenizer, writer, progress, lm, live_lm,
               code_sampling) -> "PreviewRenderer":
        import gc

        from .. import vae as vae_mod
        from ..data.preprocess import PreprocessConfig, find_components
        from ..model import load_acestep
        from ..text import encoder as te_mod

        prompts = [p if isinstance(p, Prompt) else Prompt.from_dict(p) for p in prompts]
        for p in prompts:
            p.validate()
        dev = device
        comps = find_components(checkpoint, PreprocessConfig(
            vae=str(vae) if vae else None, text_encoder=str(text_encoder) if text_encoder else None,
            tokenizer=str(tokenizer) if tokenizer else None))
        parts = {"encoder"} if null_condition_emb is not None else {"encoder", "null_condition_emb"}
        if lm:
            parts |= {"tokenizer", "detokenizer"}
        loaded = load_acestep(checkpoint, variant=variant, device=dev, parts=parts)
        info = loaded.info
        if null_condition_emb is None:
            null_condition_emb = loaded.model.null_condition_emb.detach().float().cpu()
        te_dtype = default_dtype(dev)  # preprocessing's text-encoder default: bf16 on CUDA, fp32 on CPU
        vae_model = vae_mod.load_vae(comps.vae, dtype=te_dtype, device="cpu")
        silence = loaded.silence_latent
        if silence is None:
            silence = vae_mod.silence_latent_from_vae(vae_model.float()).float()
            vae_model.to(te_dtype)
        conditions, states = [], []
        if prompts:
            text = te_mod.TextEncoder(te_mod.load_text_encoder(comps.text_encoder, dtype=te_dtype, device=dev),
                                      te_mod.load_tokenizer(comps.tokenizer))
            states = [text_states(text, p, prompt_style) for p in prompts]
            text = None  # noqa: F841
        codes = encoding = None
        if lm and prompts:
            encoding = CodesEncoding(loaded.model, states, silence, prompt_style, code_sampling)
            if not live_lm:  # a live LM writes every render's codes itself
                codes = encoding.base_codes(lm, prompts, dev)
        for p, (caption, lyric), c in zip(prompts, states, codes or [None] * len(prompts)):
            conditions.append(encode_conditions(loaded.model, caption, lyric, silence, p.frames, prompt_style,
                                                None if c is None else torch.tensor(c)))
        if encoding is not None and live_lm:
            encoding.move("cpu")  # kept for the live LM's codes, off the device between renders
        else:
            encoding = None
        loaded = None  # noqa: F841  (release the encoder before training goes on)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return cls(out_dir, prompts, conditions, vae_model, every=every, turbo=info.is_turbo,
                   settings=(settings or SamplerSettings()).resolved(info), null_condition_emb=null_condition_emb,
                   vae_device=dev, writer=writer, progress=progress, codes=codes, encoding=encoding)

    # ----- rendering -----
    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def maybe_render(self, step: int, decoder: torch.nn.Module, *, force: bool = False, lm=None) -> list[Path]:
        """Render if ``step`` is a multiple of ``every`` (or ``force``) and was not rendered yet; the paths written.
        ``lm``: the planner LM being trained (a ``Planner``), when the renderer was built to hear it."""
        if not self.prompts or step in self.rendered or not (force or self.due(step)):
            return []
        return self.render(step, decoder, lm).paths

    def render(self, step: int, decoder: torch.nn.Module, lm=None) -> PreviewRender:
        t0 = time.perf_counter()
        param = next(decoder.parameters())
        device = param.device
        dtype = base_param_dtype(decoder)
        live = lm if self.encoding is not None else None
        latents, codes, conditions = [], self.codes, self.conditions
        with Isolated(decoder, device, also=[live.model] if live is not None else []):
            if live is not None:
                codes = self.encoding.live_codes(live, self.prompts)
                conditions = self.encoding.conditions(self.prompts, codes, device)
            for p, cond in zip(self.prompts, conditions):
                latents.append(sample_latents(decoder, cond, p.seed, self.settings, turbo=self.turbo,
                                              null_condition_emb=self.null, device=device, dtype=dtype))
            waves = self._decode(latents, device)
        folder = self.out_dir / PREVIEW_DIR / f"step_{step}"
        paths, entries = [], []
        for i, (p, w) in enumerate(zip(self.prompts, waves)):
            path = write_flac(folder / f"{p.slug(i)}.flac", w, SAMPLE_RATE)
            paths.append(path)
            entries.append({"file": path.name, **p.to_dict(), **({"codes": codes[i]} if codes else {})})
            if self.writer is not None:
                log_audio(self.writer, f"preview/{p.slug(i)}", w, step)
        seconds = time.perf_counter() - t0
        audio_seconds = float(sum(w.shape[-1] for w in waves) / SAMPLE_RATE)
        from ..fsutil import atomic_write_json

        atomic_write_json(folder / "previews.json", {
            "step": step, "settings": self.settings.to_dict(), "turbo": self.turbo, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "render_seconds": round(seconds, 3),
            "audio_seconds": audio_seconds, "previews": entries,
        })
        result = PreviewRender(step, paths, seconds, audio_seconds)
        self.rendered[step] = result
        if self.progress is not None:
            self.progress({"event": "preview", "step": step, "paths": [str(p) for p in paths],
                           "seconds": seconds, "audio_seconds": audio_seconds})
        return result

    def _decode(self, latents: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        vae_device = self.vae_device or device
        moved = vae_device.type != "cpu"
        if moved:
            self.vae.to(vae_device)
        try:
            return [decode_latents(self.vae, lat.float(), device=vae_device)[0] for lat in latents]
        finally:
            if moved:
                self.vae.to("cpu")


class CodesEncoding:
    """What previews keep to have the planner LM write the prompts' audio codes and condition the DiT on them: the
    prompts' text states and the condition encoder with the audio tokenizer and detokenizer (on the CPU between
    renders)."""

    def __init__(self, model, states: Sequence[tuple[torch.Tensor, torch.Tensor]], silence: torch.Tensor,
                 style: str, sampling=None):
        from ..planner.write import CodeSampling

        self.model, self.states, self.silence, self.style = model, list(states), silence, style
        self.sampling = sampling or CodeSampling()

    def live_codes(self, planner, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Codes ``planner`` writes now (under autocast in its weights' dtype, as it trains)."""
        from ..planner.write import code_count, write_codes

        dtype = base_param_dtype(planner.model)
        device = planner.device
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return [write_codes(planner, p.lm_inputs(), self.style, seed=p.seed, count=code_count(p.seconds),
                                sampling=self.sampling) for p in prompts]

    def base_codes(self, lm: Union[str, Path], prompts: Sequence[Prompt], device: torch.device) -> list[list[int]]:
        """Codes the plain LM at ``lm`` writes (loaded for this and released)."""
        from ..planner.codes import check_codebook
        from ..planner.loading import load_planner

        planner = load_planner(lm, dtype=default_dtype(device), device=device)
        check_codebook(self.model, planner)
        planner.model.eval()
        return self.live_codes(planner, prompts)

    def conditions(self, prompts: Sequence[Prompt], codes: Sequence[list[int]],
                   device: torch.device) -> list[Conditions]:
        self.move(device)
        try:
            return [encode_conditions(self.model, caption, lyric, self.silence, p.frames, self.style,
                                      torch.tensor(c)) for p, (caption, lyric), c in zip(prompts, self.states, codes)]
        finally:
            self.move("cpu")

    def move(self, device) -> None:
        for part in (self.model.encoder, self.model.tokenizer, self.model.detokenizer):  # the rest is not loaded
            part.to(device)
