"""Condition encoder: text projection, lyric encoder, timbre encoder and sequence packing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import AceStepConfig
from .layers import EncoderStack


def pack_sequences(
    a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two padded sequences and move every valid token to the front, keeping their order.

    Returns the packed states [B, La+Lb, D] and a bool mask that is true for the first ``n_valid`` positions.
    """
    states = torch.cat([a, b], dim=1)
    valid = torch.cat([mask_a, mask_b], dim=1).to(torch.int64)
    order = valid.argsort(dim=1, descending=True, stable=True)
    packed = torch.gather(states, 1, order[..., None].expand_as(states))
    positions = torch.arange(states.shape[1], device=states.device)
    return packed, positions[None] < valid.sum(dim=1, keepdim=True)


class LyricEncoder(EncoderStack):
    """Encodes Qwen3 token embeddings of the lyric prompt; padding keys are masked."""

    def __init__(self, config: AceStepConfig):
        super().__init__(config, config.text_hidden_dim, config.num_lyric_encoder_hidden_layers)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(embeds), key_padding=mask)


class TimbreEncoder(EncoderStack):
    """Encodes packed reference latents; the first position's output is the timbre embedding of each reference.

    2B models read it off the first frame and leave ``special_token`` unused. XL models (``cls_token``) prepend
    ``special_token`` to every reference and read the embedding off it, as upstream's ``xl_*`` modeling files do.
    """

    def __init__(self, config: AceStepConfig, cls_token: bool = False):
        super().__init__(config, config.timbre_hidden_dim, config.num_timbre_encoder_hidden_layers)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.cls_token = cls_token

    def forward(
        self, packed: torch.Tensor, order: torch.Tensor, batch_size: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """packed [N, T, 64], order [N] (batch index of each reference) → [B, max_refs, H], mask [B, max_refs]."""
        h = self.embed_tokens(packed)
        if self.cls_token:
            h = torch.cat([self.special_token.to(h).expand(h.shape[0], 1, -1), h], dim=1)
        emb = self.run_layers(h)[:, 0]
        order = order.to(torch.int64)
        b = batch_size if batch_size is not None else int(order.max().item()) + 1
        counts = torch.bincount(order, minlength=b)
        slots = int(counts.max().item())
        # Position of each reference among those of its own sample, in input order.
        same = order[:, None] == order[None, :]
        earlier = torch.ones_like(same).tril(-1)
        slot = (same & earlier).sum(dim=1)
        out = emb.new_zeros(b, slots, emb.shape[-1])
        out[order, slot] = emb
        mask = torch.zeros(b, slots, dtype=torch.int64, device=emb.device)
        mask[order, slot] = 1
        return out, mask


class ConditionEncoder(nn.Module):
    """``config`` is the encoder's view of the model config; ``xl`` selects the XL timbre encoder."""

    def __init__(self, config: AceStepConfig, xl: bool = False):
        super().__init__()
        self.text_projector = nn.Linear(config.text_hidden_dim, config.hidden_size, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config, cls_token=xl)

    def forward(
        self,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        lyric_hidden_states: torch.Tensor,
        lyric_attention_mask: torch.Tensor,
        refer_audio_acoustic_hidden_states_packed: torch.Tensor,
        refer_audio_order_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns packed condition states [B, Ll+R+Lt, H] (lyrics, timbre, text; padding last) and their mask."""
        text = self.text_projector(text_hidden_states)
        lyrics = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        timbre, timbre_mask = self.timbre_encoder(
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, batch_size=text.shape[0]
        )
        states, mask = pack_sequences(lyrics, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(states, text, mask, text_attention_mask)
