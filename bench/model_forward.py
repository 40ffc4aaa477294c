"""Decoder forward and forward+backward time and peak memory at a scaled configuration.

    python bench/model_forward.py                       # CPU: hidden 512, 8 layers, 60 s of latents
    python bench/model_forward.py --device cuda --real  # GPU: the real 2B decoder shape, random weights

Reports medians over ``--repeats`` runs after a warm-up. Peak memory is the CUDA allocator's peak on GPU and the
process's resident-set growth on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource

import torch

from _timing import timed
from sidestep_core.model import AceStepConfig
from sidestep_core.model.dit import AceStepDiT


def scaled_config(real: bool) -> AceStepConfig:
    if real:
        return AceStepConfig()
    return AceStepConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=128)


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real", action="store_true", help="the real 2B decoder shape")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every layer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = scaled_config(args.real)
    torch.manual_seed(0)
    with torch.device(args.device):
        dit = AceStepDiT(cfg).to(dtype)
    frames = int(args.seconds * 25)
    b, dev = args.batch, args.device
    x = torch.randn(b, frames, 64, device=dev, dtype=dtype)
    ctx = torch.randn(b, frames, 128, device=dev, dtype=dtype)
    cond = torch.randn(b, 600, cfg.enc_hidden, device=dev, dtype=dtype)
    t = torch.rand(b, device=dev, dtype=dtype)

    def forward():
        with torch.no_grad():
            dit(x, t, t, cond, ctx)

    # Training-like: frozen base weights, gradient flows to the input projections only.
    dit.requires_grad_(False)
    for layer in dit.layers:
        layer.self_attn.q_proj.weight.requires_grad_(True)
    dit.train()
    dit.checkpoint_ratio = 1.0 if args.checkpointing else 0.0

    def forward_backward():
        dit(x, t, t, cond, ctx).float().square().mean().backward()

    forward()
    fwd = timed(forward, dev, args.repeats)
    forward_backward()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fb = timed(forward_backward, dev, args.repeats)
    result = {
        "device": dev if not dev.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "frames": frames, "batch": b,
                   "dtype": args.dtype, "checkpointing": args.checkpointing},
        "forward_s": round(fwd, 4),
        "forward_backward_s": round(fb, 4),
        "peak_mb": round(peak_mb(dev), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
