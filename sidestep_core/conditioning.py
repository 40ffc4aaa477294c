"""The condition-encoder pass, shared by preprocessing (cached for training) and generation so the two match.

Inputs are the Qwen3 caption states and lyric token embeddings of one prompt; the timbre reference is what
inference feeds when the user gives no reference audio, and ``context_latents`` are silence ‖ ones — or, when the
planner LM wrote audio codes, the codes' 25 Hz hints ‖ ones (upstream's and ComfyUI's text-to-music with codes:
the FSQ codebook vectors of the codes through the detokenizer, cut to the generation's length; the timbre reference
is the same silence either way).
"""

from __future__ import annotations

import torch

from .model.model import AceStepModel

ACESTEP_TIMBRE_FRAMES = 750  # upstream inference: silence_latent[:, :750] when no reference audio is given
PAD_CODE = 35847  # ComfyUI pads codes shorter than the generation (ceil(T / 5)) with this code


def timbre_reference(silence: torch.Tensor, frames: int, style: str) -> torch.Tensor:
    """[1, T_ref, 64] timbre-encoder input. ComfyUI's text-to-music path (no LM audio codes) passes silence as
    long as the generation itself; the official pipeline passes its first 750 frames (30 s)."""
    if style == "acestep":
        return silence[:, :ACESTEP_TIMBRE_FRAMES]
    if silence.shape[1] < frames:
        silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
    return silence[:, :frames]


@torch.no_grad()
def codes_hints(model: AceStepModel, codes: torch.Tensor, frames: int) -> torch.Tensor:
    """[frames, 64] source latents from LM audio codes [N]: codebook vectors → detokenizer, in its dtype."""
    need = -(-frames // model.config.pool_window_size)
    codes = codes.long().flatten()
    if codes.numel() < need:
        codes = torch.cat([codes, codes.new_full((need - codes.numel(),), PAD_CODE)])
    param = next(model.detokenizer.parameters())
    vectors = model.tokenizer.quantizer.from_indices(codes.to(param.device)[None, :, None]).to(param.dtype)
    return model.detokenize(vectors)[0, :frames]


@torch.no_grad()
def encode_conditions(
    model: AceStepModel, caption_states: torch.Tensor, lyric_states: torch.Tensor, silence: torch.Tensor,
    frames: int, style: str, codes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Condition states [L, H], their bool mask [L] and context latents [frames, 128], in the encoder's dtype
    and on its device. ``silence`` is [1, T_max, 64]; ``codes``: the planner LM's audio codes, if it wrote them
    (the model's tokenizer and detokenizer must be loaded)."""
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
    if codes is not None:
        hints = codes_hints(model, codes, frames).to(device=device, dtype=dtype)
        context = torch.cat([hints, context[:, hints.shape[-1]:]], dim=-1)
    return states[0], mask[0].bool(), context
