"""Rendering through the user's own generation graph: their MODEL cloned and patched (ComfyUI's model patcher) with
an adapter's tensors at a strength, sampled as KSampler samples and decoded as VAEDecodeAudio decodes. Train
Adapter's previews and Compare Adapters both render this way; with a CLIP whose LM an LM adapter patches, the
graph's own ``TextEncodeAceStepAudio1.5`` is run again first (``encode_again``) so the LM writes the codes anew."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Sampling:
    """KSampler's settings."""

    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str


def render_audio(model, patches: Optional[dict], strength: float, s: Sampling, positive, negative, latent: dict,
                 vae) -> dict:
    """ComfyUI AUDIO (``waveform`` [B, C, S] on the CPU) of ``latent`` sampled with ``model`` patched by
    ``patches`` (a ComfyUI-format adapter state dict) at ``strength``; ``patches`` None: the model as it is."""
    import comfy.sample
    import comfy.sd

    patched = model if patches is None else comfy.sd.load_lora_for_models(model, None, patches, strength, 0)[0]
    image = comfy.sample.fix_empty_latent_channels(patched, latent["samples"], latent.get("downscale_ratio_spacial"),
                                                   latent.get("downscale_ratio_temporal"))
    noise = comfy.sample.prepare_noise(image, s.seed, latent.get("batch_index"))
    samples = comfy.sample.sample(patched, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative, image,
                                  denoise=1.0, noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=s.seed)
    wave = vae.decode(samples).movedim(-1, 1)  # [B, C, S], as VAEDecodeAudio
    std = torch.std(wave, dim=[1, 2], keepdim=True) * 5.0
    std[std < 1.0] = 1.0
    rate = getattr(vae, "audio_sample_rate_output", getattr(vae, "audio_sample_rate", 44100))
    return {"waveform": (wave / std).float().cpu(), "sample_rate": int(rate)}


def encode_again(clip, sources) -> tuple:
    """(positive, negative) CONDITIONING from ComfyUI's own TextEncodeAceStepAudio1.5 run with ``clip`` (its LM
    patched) on the values the graph gave it (``calls.EncoderSource`` each; one encoder feeding both runs once), then
    ConditioningZeroOut where the graph had it."""
    import nodes
    from comfy_extras.nodes_ace import TextEncodeAceStepAudio15

    made: dict = {}
    out = []
    for src in sources:
        if src.node_id not in made:
            made[src.node_id] = TextEncodeAceStepAudio15.execute(clip=clip, **src.values).result[0]
        cond = made[src.node_id]
        out.append(nodes.ConditioningZeroOut().zero_out(cond)[0] if src.zero_out else cond)
    return tuple(out)
