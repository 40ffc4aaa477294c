"""Building blocks shared by the DiT, the condition encoder and the audio tokenizer."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import AceStepConfig


class RMSNorm(nn.Module):
    """Qwen3-style RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x·rsqrt(mean(x²) + eps) in fp32 (a fused kernel where PyTorch has one; composite on CPU).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotate-half RoPE over ``head_dim``; cos/sin are built in fp32 and cast to the activations' dtype.

    ``factor`` is linear RoPE scaling (``config.rope_factor()``): the frequencies are divided by it.
    """

    def __init__(self, head_dim: int, theta: float, factor: float = 1.0):
        super().__init__()
        # Explicit CPU device: the buffer is derived, so it must exist even when the model is built on "meta".
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        inv = 1.0 / (theta ** (steps / head_dim))
        if factor != 1.0:
            inv = inv / factor
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=like.device, dtype=torch.float32)
        with torch.autocast(device_type=like.device.type, enabled=False):
            freqs = torch.outer(pos, self.inv_freq.to(like.device).float())
            emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` is [B, H, T, D]; cos/sin are [T, D]."""
    return x * cos + _rotate_half(x) * sin


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm (applied before RoPE).

    Self-attention uses RoPE and optionally a bidirectional band; cross-attention uses neither.
    """

    def __init__(self, config: AceStepConfig, layer_idx: int, cross: bool = False):
        super().__init__()
        self.head_dim = config.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.cross = cross
        self.window = None if cross else config.window_for(layer_idx)
        bias = config.attention_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim)

    def project(self, x: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections (``training.fast_lora`` replaces this to share work between adapters on one input)."""
        return self.q_proj(x), self.k_proj(src), self.v_proj(src)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        context: Optional[torch.Tensor] = None,
        key_padding: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        src = context if self.cross else x
        q, k, v = self.project(x, src)
        q = self.q_norm(self._heads(q, self.heads)).transpose(1, 2)
        k = self.k_norm(self._heads(k, self.kv_heads)).transpose(1, 2)
        v = self._heads(v, self.kv_heads).transpose(1, 2)
        if rope is not None and not self.cross:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, window=self.window, key_padding=key_padding)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer used by the lyric/timbre encoders and the audio tokenizer."""

    def __init__(self, config: AceStepConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, key_padding=None):
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, key_padding=key_padding)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """``embed_tokens`` projection, a stack of encoder layers and a final norm (keys as upstream)."""

    def __init__(self, config: AceStepConfig, in_dim: int, num_layers: int):
        super().__init__()
        self.embed_tokens = nn.Linear(in_dim, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_factor())
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(num_layers))

    def run_layers(self, h: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        rope = self.rotary(h.shape[1], h)
        for layer in self.layers:
            h = layer(h, rope, key_padding)
        return self.norm(h)


class TimestepEmbedding(nn.Module):
    """Sinusoid of ``1000·t`` ([cos, sin], 256-d) → MLP → ``temb`` and 6 modulation vectors."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, dim * 6)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        # The scaling happens in t's own dtype (bf16 in the released pipeline) before going to fp32.
        args = (t * self.scale).float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.linear_2(F.silu(self.linear_1(self.sinusoid(t).to(t.dtype))))
        proj = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        return temb, proj
