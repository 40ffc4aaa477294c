"""The condition-encoder pass, shared by preprocessing (cached for training) and generation so the two match.

Inputs are the Qwen3 caption states and lyric token embeddings of one prompt; the timbre reference is what
inference feeds when the user gives no reference audio, and ``context_latents`` are silence ‖ ones.
"""

from __future__ import annotations

import torch

from .model.model import AceStepModel

ACESTEP_TIMBRE_FRAMES = 750  # upstream inference: silence_latent[:, :750] when no reference audio is given


def timbre_reference(silence: torch.Tensor, frames: int, style: str) -> torch.Tensor:
    """[1, T_ref, 64] timbre-encoder input. ComfyUI's text-to-music path (no LM audio codes) passes silence as
    long as the generation itself; the official pipeline passes its first 750 frames (30 s)."""
    if style == "acestep":
        return silence[:, :ACESTEP_TIMBRE_FRAMES]
    if silence.shape[1] < frames:
        silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
    return silence[:, :frames]


@torch.no_grad()
def encode_conditions(
    model: AceStepModel, caption_states: torch.Tensor, lyric_states: torch.Tensor, silence: torch.Tensor,
    frames: int, style: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition states [L, H], their bool mask [L] and context latents [frames, 128], in the encoder's dtype
    and on its device. ``silence`` is [1, T_max, 64]."""
    param = next(model.encoder.parameters())
    device, dtype = param.device, param.dtype
    text = caption_states[None].to(device=device, dtype=dtype)
    lyric = lyric_states[None].to(device=device, dtype=dtype)
    text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device)
    lyric_mask = torch.ones(lyric.shape[:2], dtype=torch.bool, device=device)
    ref = timbre_reference(silence.float(), frames, style).to(device=device, dtype=dtype)
    order = torch.zeros(1, dtype=torch.long, device=device)
    states, mask = model.encoder(text, text_mask, lyric, lyric_mask, ref, order)
    context = AceStepModel.text2music_context(silence.float(), frames)[0].to(device=device, dtype=dtype)
    return states[0], mask[0].bool(), context
