"""Decoder forward and forward+backward time and peak memory at a scaled configuration.

    python bench/model_forward.py                       # CPU: hidden 512, 8 layers, 60 s of latents
    python bench/model_forward.py --device cuda --real  # GPU: the real 2B decoder shape, random weights
    python bench/model_forward.py --upstream-root ACE-Step-1.5   # also time upstream's decoder: ratios

Reports medians over ``--repeats`` runs after a warm-up. Peak memory is the CUDA allocator's peak on GPU and the
process's peak resident set on CPU. With ``--upstream-root`` (a checkout of ace-step/ACE-Step-1.5, run in an
environment with transformers < 4.58) the upstream ``AceStepDiTModel`` gets the same weights and inputs, runs with
SDPA, and the time ratios ours / upstream are printed (measured in the same run, so comparable).
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




def upstream_decoder(root: str, cfg: AceStepConfig, state: dict, device: str, dtype: torch.dtype):
    """Upstream's decoder with our weights (its module tree has the same parameter names)."""
    import sys

    sys.path.insert(0, root)
    from acestep.models.common.configuration_acestep_v15 import AceStepConfig as UpstreamConfig
    from acestep.models.turbo.modeling_acestep_v15_turbo import AceStepDiTModel

    data = {k: v for k, v in cfg.to_dict().items() if k != "extra"}
    ucfg = UpstreamConfig(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
    ucfg._attn_implementation = "sdpa"
    with torch.device(device):
        dit = AceStepDiTModel(ucfg).to(dtype)
    dit.load_state_dict(state)
    return dit


def measure(dit, call, dev: str, repeats: int) -> tuple[float, float]:
    """(forward s, forward+backward s): frozen base weights, gradient flows to the q projections only."""

    def forward():
        with torch.no_grad():
            call(dit)

    def forward_backward():
        call(dit).float().square().mean().backward()

    dit.requires_grad_(False)
    for layer in dit.layers:
        layer.self_attn.q_proj.weight.requires_grad_(True)
    dit.train()
    forward()
    fwd = timed(forward, dev, repeats)
    forward_backward()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return fwd, timed(forward_backward, dev, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real", action="store_true", help="the real 2B decoder shape")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every layer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--upstream-root", help="checkout of ace-step/ACE-Step-1.5: also time its decoder")
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

    dit.checkpoint_ratio = 1.0 if args.checkpointing else 0.0
    fwd, fb = measure(dit, lambda m: m(x, t, t, cond, ctx), dev, args.repeats)
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
    if args.upstream_root:
        ref = upstream_decoder(args.upstream_root, cfg, dit.state_dict(), dev, dtype)
        if args.checkpointing:
            ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def call(m):
            return m(hidden_states=x, timestep=t, timestep_r=t, attention_mask=None, encoder_hidden_states=cond,
                     encoder_attention_mask=None, context_latents=ctx, use_cache=False)[0]

        ufwd, ufb = measure(ref, call, dev, args.repeats)
        result["upstream"] = {"forward_s": round(ufwd, 4), "forward_backward_s": round(ufb, 4)}
        result["ratio_ours_over_upstream"] = {"forward": round(fwd / ufwd, 3), "forward_backward": round(fb / ufb, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
