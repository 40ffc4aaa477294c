"""Frozen linear layers stored at 8 or 4 bits and computed in the training dtype.

``BASE_PRECISIONS``: ``bf16`` keeps plain ``nn.Linear`` layers; ``fp8`` stores float8 e4m3 with one fp32 scale per
output channel (our own code: a cast and a multiply, so it runs on every device, CPU included); ``int8`` (row-wise
absmax) and ``nf4`` (64-value blocks whose absmax is itself stored at 8 bits in blocks of 256 — QLoRA's "double
quantization", bitsandbytes' ``compress_statistics``: 0.52 instead of 0.56 bytes per weight, the same error) use
bitsandbytes' quantize / dequantize ops, which have CPU and CUDA backends and are already a dependency (the 8-bit
optimizer).

``QuantLinear`` subclasses ``nn.Linear`` so PEFT and LyCORIS find and wrap it like any linear: PEFT's LoRA/DoRA call
the base layer and read ``.weight`` (a dequantized tensor here) for DoRA's norm; LyCORIS sees a linear whose class is
not ``Linear`` and switches itself to its "bypass" forward (base output + adapter output), which never rebuilds the
weight. The matmul goes through ``_FrozenMatmul``, which keeps only the *quantized* tensors for backward and
dequantizes again there, so a layer outside activation checkpointing does not hold a full-precision weight copy.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BASE_PRECISIONS

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
NF4_BLOCK = 64
NF4_SCALE_BLOCK = 256  # the 8-bit absmax values are quantized in blocks of this many (bitsandbytes' choice)
# Stored bytes per weight element (scales included) — used by the memory plan.
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0,
                    "nf4": 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALE_BLOCK)}
NF4_TABLE_BYTES = (16 + 256 + 1) * 4  # per quantized linear: NF4 code, absmax code, offset
ROW_SCALE_BYTES = {"fp8": 4, "int8": 4}  # one fp32 scale per output row
# fp8 and int8 dequantize through fp32 (two temporaries of 4 bytes per weight): a matrix larger than this many weights
# is done whole rows at a time into the compute-dtype matrix, so the transient stays within 32 MiB instead of 8 bytes
# per weight (0.19 GiB for an XL MLP projection, more than a layer's activations at short crops).
DEQUANT_CHUNK = 1 << 22


def _bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns at import about optional CPU kernels
    try:
        import bitsandbytes.functional as bf
    except Exception as exc:  # not installed, or its native library does not load on this platform
        raise ValueError(f"base_precision: int8 and nf4 need bitsandbytes (pip install bitsandbytes): {exc}") from exc
    return bf


class QuantLinear(nn.Linear):
    """A frozen ``y = x Wᵀ + b`` whose ``W`` is stored quantized (buffers ``qweight``, ``qscale``, for nf4 also
    ``qcode`` and the 8-bit absmax's ``qscale2``, ``qcode2``, ``qoffset``); ``weight`` is the dequantized matrix in
    ``compute_dtype`` (made on each read)."""

    STORED = ("qweight", "qscale", "qcode", "qscale2", "qcode2", "qoffset")

    def __init__(self, kind: str, in_features: int, out_features: int, qweight: torch.Tensor, qscale: torch.Tensor,
                 bias: Optional[torch.Tensor], compute_dtype: torch.dtype, qcode: Optional[torch.Tensor] = None,
                 nested: tuple[Optional[torch.Tensor], ...] = (None, None, None)):
        nn.Module.__init__(self)  # not nn.Linear's: there is no full-precision weight parameter
        if kind not in BASE_PRECISIONS[1:]:
            raise ValueError(f"base_precision: unknown quantized kind {kind!r}")
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("qscale", qscale)
        self.register_buffer("qcode", qcode)
        for name, t in zip(self.STORED[3:], nested):  # nf4: absmax of the absmax blocks, their code, the offset
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))

    # ----- construction -----
    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str,
                 compute_dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        """Quantize a full-precision ``weight`` [out, in] (any float dtype, on any device)."""
        out_f, in_f = weight.shape
        code, nested = None, (None, None, None)
        if kind == "fp8":
            w = weight.float()
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            q = (w / scale[:, None]).to(FP8)
        elif kind == "int8":
            q, scale, _ = _bnb().int8_vectorwise_quant(weight.to(torch.float16))
        elif kind == "nf4":
            q, state = _bnb().quantize_4bit(weight.to(compute_dtype).contiguous(), blocksize=NF4_BLOCK,
                                            quant_type="nf4", compress_statistics=True)
            scale, code = state.absmax, state.code
            if state.state2.blocksize != NF4_SCALE_BLOCK:  # dequantize and the memory plan assume it
                raise ValueError(f"bitsandbytes quantized the nf4 absmax in blocks of {state.state2.blocksize}")
            nested = (state.state2.absmax, state.state2.code, state.offset)
        else:
            raise ValueError(f"base_precision: cannot quantize to {kind!r}")
        return cls(kind, in_f, out_f, q, scale, bias, compute_dtype, code, nested)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 compute_dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        """Keep a float8_e4m3fn weight from a file as it is; ``scale`` is per-tensor ([] or [1]), per-row or None."""
        out_f, in_f = weight.shape
        s = torch.ones(1) if scale is None else scale.detach().to(torch.float32).reshape(-1)
        if s.numel() not in (1, out_f):
            raise ValueError(f"fp8 weight scale has {s.numel()} values for {out_f} rows")
        return cls("fp8", in_f, out_f, weight.view(FP8) if weight.dtype == torch.uint8 else weight, s, bias,
                   compute_dtype)

    # ----- maths -----
    def stored(self) -> tuple[Optional[torch.Tensor], ...]:
        return tuple(getattr(self, name) for name in self.STORED)

    def dequantize(self, *stored: Optional[torch.Tensor]) -> torch.Tensor:
        """W from ``stored`` (``self.stored()``'s tensors, as autograd saved them) or from the buffers."""
        q, s, c, s2, c2, offset = stored or self.stored()
        if self.kind in ("fp8", "int8") and self.out_features * self.in_features <= DEQUANT_CHUNK:
            return self._dequantize_rows(q, s).to(self.compute_dtype)
        if self.kind in ("fp8", "int8"):
            w = torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype, device=q.device)
            step = max(1, DEQUANT_CHUNK // self.in_features)
            for i in range(0, self.out_features, step):
                rows = slice(i, i + step)
                w[rows] = self._dequantize_rows(q[rows], s if s.numel() == 1 else s[rows])
            return w
        bf = _bnb()
        scales = bf.QuantState(absmax=s2, code=c2, blocksize=NF4_SCALE_BLOCK, dtype=torch.float32)
        state = bf.QuantState(absmax=s, shape=torch.Size((self.out_features, self.in_features)), code=c,
                              blocksize=NF4_BLOCK, quant_type="nf4", dtype=self.compute_dtype, offset=offset,
                              state2=scales)
        return bf.dequantize_4bit(q, state)

    def _dequantize_rows(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            return q.float() * s[:, None]  # a per-tensor scale (one value) broadcasts too
        return _bnb().int8_vectorwise_dequant(q, s)

    @property
    def weight(self) -> torch.Tensor:  # what PEFT's DoRA and Adapter.base_weight read
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenMatmul.apply(x, self, *self.stored())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}, bias={self.bias is not None}"


class _FrozenMatmul(torch.autograd.Function):
    """``x Wᵀ + b`` with W frozen: saves the quantized tensors (not W) and rebuilds W for grad_x."""

    @staticmethod
    def forward(ctx, x, layer: QuantLinear, *stored):
        w = layer.dequantize(*stored)
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.save_for_backward(*stored)
        bias = None if layer.bias is None else layer.bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias)

    @staticmethod
    def backward(ctx, grad):
        rest = (None,) * (1 + len(QuantLinear.STORED))
        if not ctx.needs_input_grad[0]:
            return (None, *rest)
        w = ctx.layer.dequantize(*ctx.saved_tensors)
        return ((grad.to(w.dtype) @ w).to(ctx.x_dtype), *rest)


def quantize_module_linears(root: nn.Module, kind: str, names: list[str], compute_dtype: torch.dtype) -> None:
    """Replace the ``nn.Linear`` children named in ``names`` (relative to ``root``) by ``QuantLinear`` in place."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        lin = getattr(owner, attr)
        setattr(owner, attr, QuantLinear.quantize(lin.weight.detach(), None if lin.bias is None else
                                                  lin.bias.detach(), kind, compute_dtype))


def keep_oft_rebuild(adapter) -> None:
    """LyCORIS switches to its "bypass" forward on any linear whose class is not ``Linear``. For diag-OFT that
    forward applies adapter dropout to the rotation and fails on shapes (LyCORIS 4.1), while the rebuild forward a
    plain ``nn.Linear`` gets ignores dropout; rebuild is kept over quantized layers too (it dequantizes ``weight``),
    so OFT trains the same way whatever the base precision."""
    if adapter.kind != "oft" or adapter.network is None:
        return
    for module in adapter.network.loras:
        if isinstance(module.org_module[0], QuantLinear):
            module.bypass_mode = False
