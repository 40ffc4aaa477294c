"""``AceStepConditionGenerationModel``: DiT + condition encoder + audio tokenizer/detokenizer + null condition."""

from __future__ import annotations

import torch
from torch import nn

from .audio_tokenizer import AudioDetokenizer, AudioTokenizer
from .config import AceStepConfig
from .dit import AceStepDiT
from .encoder import ConditionEncoder


class AceStepModel(nn.Module):
    """Module tree and parameter names match the released checkpoints key for key."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.config = config
        enc = config.encoder_view()
        self.decoder = AceStepDiT(config)
        self.encoder = ConditionEncoder(enc, xl=config.is_xl)
        tok = config.tokenizer_view()
        self.tokenizer = AudioTokenizer(tok)
        self.detokenizer = AudioDetokenizer(tok)
        self.null_condition_emb = nn.Parameter(torch.zeros(1, 1, enc.hidden_size))

    def tokenize(self, latents: torch.Tensor, silence_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise latents [B, T, 64] to 5 Hz codes, padding T up to the pool window with silence."""
        pad = (-latents.shape[1]) % self.config.pool_window_size
        if pad:
            fill = silence_latent[:1, :pad].to(latents).expand(latents.shape[0], -1, -1)
            latents = torch.cat([latents, fill], dim=1)
        return self.tokenizer(latents)

    def detokenize(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.detokenizer(quantized)

    @staticmethod
    def text2music_context(silence_latent: torch.Tensor, length: int, batch: int = 1) -> torch.Tensor:
        """``context_latents`` for text-to-music: the first ``length`` frames of silence ‖ an all-ones chunk mask.

        ``silence_latent`` is [1, T_max, C] (already transposed from the stored [1, C, T_max]).
        """
        if silence_latent.shape[1] < length:
            reps = -(-length // silence_latent.shape[1])
            silence_latent = silence_latent.repeat(1, reps, 1)
        src = silence_latent[:, :length].expand(batch, -1, -1)
        return torch.cat([src, torch.ones_like(src)], dim=-1)

    def null_condition_like(self, states: torch.Tensor) -> torch.Tensor:
        return self.null_condition_emb.to(states).expand_as(states)
