"""The flow-matching DiT (``decoder`` in the checkpoint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import attention  # noqa: F401 - registers sidestep::matmul_attention
from .config import AceStepConfig
from .layers import Attention, RMSNorm, Rotary, SwiGLU, TimestepEmbedding


# Attention kernels whose outputs selective checkpointing keeps (everything else in a layer is recomputed).
_ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
} | {torch.ops.sidestep.matmul_attention.default}


def _keep_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_attention)


class PatchIn(nn.Sequential):
    """[B, T, C] → [B, T/p, H]. The Conv1d sits at index 1, where upstream's Sequential(Lambda, Conv, Lambda)
    keeps it."""

    def __init__(self, cin: int, cout: int, patch: int):
        super().__init__(nn.Identity(), nn.Conv1d(cin, cout, kernel_size=patch, stride=patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous: the residual stream would otherwise keep the conv's channels-first layout through every
        # layer (elementwise ops preserve strides), and each linear would copy it and run as a batched matmul.
        return self[1](x.transpose(1, 2)).transpose(1, 2).contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class PatchOut(nn.Sequential):
    """[B, T/p, H] → [B, T, C] through a ConvTranspose1d at index 1."""

    def __init__(self, cin: int, cout: int, patch: int):
        super().__init__(nn.Identity(), nn.ConvTranspose1d(cin, cout, kernel_size=patch, stride=patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The convolution's backward hands back a channels-first gradient; left so, the whole residual stream's
        # backward would run strided (each add and mul on it ~3x slower). One copy makes it contiguous.
        if torch.is_grad_enabled() and x.requires_grad:
            x = _ContiguousGrad.apply(x)
        return self[1](x.transpose(1, 2)).transpose(1, 2)


class DiTLayer(nn.Module):
    """adaLN-single layer: modulated self-attn, plain cross-attn (no modulation or gate), modulated SwiGLU."""

    def __init__(self, config: AceStepConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.self_attn_norm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.cross_attn_norm = RMSNorm(h, config.rms_norm_eps)
        self.cross_attn = Attention(config, layer_idx, cross=True)
        self.mlp_norm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = SwiGLU(h, config.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, h))

    def forward(self, x, rope, modulation, context):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation).chunk(6, dim=1)
        h = (self.self_attn_norm(x) * (1 + scale) + shift).type_as(x)
        x = (x + self.self_attn(h, rope=rope) * gate).type_as(x)
        x = x + self.cross_attn(self.cross_attn_norm(x).type_as(x), context=context)
        h = (self.mlp_norm(x) * (1 + c_scale) + c_shift).type_as(x)
        return (x + self.mlp(h) * c_gate).type_as(x)


class AceStepDiT(nn.Module):
    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_size = config.patch_size
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_factor())
        self.layers = nn.ModuleList(DiTLayer(config, i) for i in range(config.num_hidden_layers))
        self.proj_in = PatchIn(config.in_channels, h, config.patch_size)
        self.time_embed = TimestepEmbedding(h)
        self.time_embed_r = TimestepEmbedding(h)
        self.condition_embedder = nn.Linear(config.enc_hidden, h)
        self.norm_out = RMSNorm(h, config.rms_norm_eps)
        self.proj_out = PatchOut(h, config.audio_acoustic_hidden_dim, config.patch_size)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, h))
        # Fraction of layers run under activation checkpointing while training (0 = off); selective keeps the
        # attention kernels' outputs of checkpointed layers instead of recomputing them.
        self.checkpoint_ratio = 0.0
        self.checkpoint_selective = False
        # With every layer checkpointed, the last still runs plainly unless this is set (device.recompute_last_layer:
        # fused backward, or every layer offloaded): backward needs its activations first, so recomputing them would
        # cost a forward and save no peak memory.
        self.recompute_last = False

    def compile_layers(self) -> None:
        """``torch.compile`` the decoder in place (state-dict keys unchanged). The whole forward is one compiled
        region, so activation checkpointing is traced inside it (compiling layers one by one under eager
        checkpointing makes the recomputation run other code than the forward)."""
        self.compile()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        context_latents: torch.Tensor,
    ) -> torch.Tensor:
        """x_t [B,T,64], t [B], r [B], condition states [B,L,Henc], context [B,T,128] → velocity [B,T,64]."""
        param_dtype = self.time_embed.linear_1.weight.dtype
        if not torch.is_autocast_enabled(timestep.device.type) and timestep.dtype != param_dtype:
            timestep, timestep_r = timestep.to(param_dtype), timestep_r.to(param_dtype)
        temb_t, mod_t = self.time_embed(timestep)
        temb_r, mod_r = self.time_embed_r(timestep - timestep_r)
        temb, modulation = temb_t + temb_r, mod_t + mod_r

        x = torch.cat([context_latents, hidden_states], dim=-1)
        length = x.shape[1]
        pad = (-length) % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = self.proj_in(x)
        context = self.condition_embedder(encoder_hidden_states)
        rope = self.rotary(x.shape[1], x)

        n_ckpt = round(self.checkpoint_ratio * len(self.layers)) if self.training and torch.is_grad_enabled() else 0
        if n_ckpt == len(self.layers) and not self.recompute_last:
            n_ckpt -= 1
        for i, layer in enumerate(self.layers):
            if i < n_ckpt:
                kw = {"context_fn": _selective_context} if self.checkpoint_selective else {}
                x = checkpoint(layer, x, rope, modulation, context, use_reentrant=False, **kw)
            else:
                x = layer(x, rope, modulation, context)

        shift, scale = (self.scale_shift_table + temb[:, None, :]).chunk(2, dim=1)
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :length]
