"""5 Hz FSQ audio tokenizer and its detokenizer (used for cover / LM-hint context, and for strict loading)."""

from __future__ import annotations

import torch
from torch import nn

from .config import AceStepConfig
from .layers import EncoderStack


class FSQ(nn.Module):
    """Finite scalar quantisation, one residual stage, projected to and from ``len(levels)`` dims.

    Matches the quantiser upstream runs (vector-quantize-pytorch ≥ 1.27, which upstream requires): the projected
    input is soft-clamped to ±(1 + 1/(L−1)) with tanh, hard-clamped to [−1, 1] and mapped onto the L symmetric
    levels ``2·k/(L−1) − 1``. Parameter names follow the released checkpoints (``project_in``/``project_out``).
    """

    def __init__(self, dim: int, levels: list[int], num_quantizers: int = 1):
        super().__init__()
        if num_quantizers != 1:
            raise ValueError("only single-stage FSQ (fsq_input_num_quantizers = 1) is released")
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        lv = torch.tensor(levels, dtype=torch.int64, device="cpu")  # derived buffers live even on a meta-built model
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)

    def _level_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous z → level index k in [0, L−1], with straight-through gradients."""
        steps = (self.levels.to(z.device) - 1).float()
        clamp = 1 + 1 / steps
        z = torch.tanh(z / clamp) * clamp
        bracket = steps * (z.clamp(-1.0, 1.0) + 1) / 2 + 0.5
        return bracket + (bracket.floor() - bracket).detach()

    def _codes(self, k: torch.Tensor) -> torch.Tensor:
        return k * (2.0 / (self.levels.to(k.device) - 1).float()) - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.project_in(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            k = self._level_indices(z.float())
        indices = (k * self.basis.to(x.device)).sum(-1, keepdim=True).round().to(torch.int32)
        return self.project_out(self._codes(k).to(x.dtype)), indices

    def from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices [..., 1] → projected codes [..., dim]."""
        k = (indices.long() // self.basis.to(indices.device)) % self.levels.to(indices.device)
        return self.project_out(self._codes(k.float()).to(self.project_out.weight.dtype))


class AttentionPooler(EncoderStack):
    """Pools each window of ``pool_window_size`` frames into one vector via a leading special token."""

    def __init__(self, config: AceStepConfig):
        super().__init__(config, config.hidden_size, config.num_attention_pooler_hidden_layers)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, d = x.shape
        h = self.embed_tokens(x)
        h = torch.cat([self.special_token.expand(b, t, 1, -1), h], dim=2).reshape(b * t, p + 1, -1)
        return self.run_layers(h)[:, 0].reshape(b, t, -1)


class AudioTokenizer(nn.Module):
    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.pool = config.pool_window_size
        self.audio_acoustic_proj = nn.Linear(config.audio_acoustic_hidden_dim, config.hidden_size)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = FSQ(config.fsq_dim, config.fsq_input_levels, config.fsq_input_num_quantizers)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, T, 64] with T a multiple of the pool window → (quantized [B, T/5, H], indices)."""
        b, t, c = latents.shape
        x = self.audio_acoustic_proj(latents.reshape(b, t // self.pool, self.pool, c))
        return self.quantizer(self.attention_pooler(x))


class AudioDetokenizer(EncoderStack):
    """Expands each 5 Hz token to ``pool_window_size`` 25 Hz frames of acoustic latents."""

    def __init__(self, config: AceStepConfig):
        super().__init__(config, config.hidden_size, config.num_attention_pooler_hidden_layers)
        self.pool = config.pool_window_size
        self.special_tokens = nn.Parameter(torch.zeros(1, config.pool_window_size, config.hidden_size))
        self.proj_out = nn.Linear(config.hidden_size, config.audio_acoustic_hidden_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t, _ = tokens.shape
        h = self.embed_tokens(tokens)[:, :, None, :] + self.special_tokens[:, None]
        h = self.run_layers(h.reshape(b * t, self.pool, -1))
        return self.proj_out(h).reshape(b, t * self.pool, -1)
