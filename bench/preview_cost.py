"""What one audio preview costs: decoder calls of the sampler + the VAE decode, at the real model shapes.

    python bench/preview_cost.py                          # CPU, fp32, 10 s, turbo (8 calls) + VAE decode
    python bench/preview_cost.py --device cuda --dtype bf16
    python bench/preview_cost.py --scaled                 # a 4x narrower DiT, for slow machines

Random weights (no download): the real 2B DiT shape (hidden 2048, 24 layers) and the real Oobleck VAE config
(decoder 128 channels × [1, 2, 4, 8, 16], hop 1920). Reports the median seconds of one decoder call at batch 1
(turbo) and batch 2 (base CFG), the VAE decode, the implied per-preview times for turbo (8 calls) and base
(``--base-steps`` calls at batch 2), and the FLOPs of each part (torch's FlopCounterMode), so the time on other
hardware can be estimated as FLOPs / sustained throughput.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from _timing import timed
from sidestep_core.model import AceStepConfig
from sidestep_core.model.dit import AceStepDiT
from sidestep_core.vae import build_vae

REAL_VAE = dict(audio_channels=2, sampling_rate=48000, encoder_hidden_size=128, decoder_channels=128,
                decoder_input_channels=64, channel_multiples=[1, 2, 4, 8, 16], downsampling_ratios=[2, 4, 4, 6, 10])
COND_TOKENS = 200  # lyric prompt + timbre token + caption prompt of a short preview prompt




def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--base-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scaled", action="store_true", help="hidden 512 / 24 layers DiT instead of the real 2048")
    ap.add_argument("--skip-vae", action="store_true")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = args.device
    cfg = AceStepConfig(hidden_size=512, intermediate_size=1536, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=128) if args.scaled else AceStepConfig()
    torch.manual_seed(0)
    with torch.device(dev):
        dit = AceStepDiT(cfg).to(dtype).eval().requires_grad_(False)
    frames = int(round(args.seconds * 25))
    result = {"device": dev, "dtype": args.dtype, "seconds": args.seconds, "frames": frames,
              "dit_params": sum(p.numel() for p in dit.parameters()), "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}

    def call(batch: int):
        x = torch.randn(batch, frames, 64, device=dev, dtype=dtype)
        ctx = torch.randn(batch, frames, 128, device=dev, dtype=dtype)
        cond = torch.randn(batch, COND_TOKENS, cfg.enc_hidden, device=dev, dtype=dtype)
        t = torch.full((batch,), 0.5, device=dev, dtype=dtype)

        def f():
            with torch.no_grad():
                dit(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=cond, context_latents=ctx)
        return f

    for b in (1, 2):
        f = call(b)
        f()  # warm-up
        result[f"decoder_call_b{b}_s"] = timed(f, dev, args.repeats)
        result[f"decoder_call_b{b}_flops"] = flops(f)
    dit = None  # noqa: F841  (free it before building the VAE)
    if not args.skip_vae:
        with torch.device(dev):
            vae = build_vae(REAL_VAE, device=dev).to(dtype).eval().requires_grad_(False)
        z = torch.randn(1, 64, frames, device=dev, dtype=dtype)

        def dec():
            with torch.no_grad():
                vae.decode(z)
        dec()
        result["vae_decode_s"] = timed(dec, dev, args.repeats)
        result["vae_decode_flops"] = flops(dec)
    vae_s = result.get("vae_decode_s", 0.0)
    result["turbo_preview_s"] = 8 * result["decoder_call_b1_s"] + vae_s
    result["base_preview_s"] = args.base_steps * result["decoder_call_b2_s"] + vae_s
    result["turbo_preview_flops"] = 8 * result["decoder_call_b1_flops"] + result.get("vae_decode_flops", 0)
    result["base_preview_flops"] = args.base_steps * result["decoder_call_b2_flops"] + result.get("vae_decode_flops", 0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
