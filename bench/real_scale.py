"""Training-step time and peak memory at a real shape with random weights, every base precision, with and without
offload (CUDA), beside the memory plan's estimate (the estimator's error).

    python bench/real_scale.py --shape scaled --crop-seconds 10        # CPU, minutes
    python bench/real_scale.py --shape 2b --crop-seconds 4             # CPU, real 2B shape (slow, ~10 GB RAM)
    python bench/real_scale.py --shape xl --device cuda --crop-seconds 60   # GPU: torch.cuda.max_memory_allocated

Peak memory: on CPU resident tensors + the peak of what a step allocates (torch profiler allocation events), on
CUDA ``max_memory_allocated``; offload rows only on CUDA (on CPU host and device memory are the same). Time: median of ``--repeats`` steps after a warm-up. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform

import torch

from _timing import timed
from sidestep_core.config import BASE_PRECISIONS, TrainConfig
from sidestep_core.device.load import projection_names
from sidestep_core.device.measure import cpu_peak_bytes, cuda_peak_bytes, tensor_bytes
from sidestep_core.device.offload import LayerStreamer
from sidestep_core.device.plan import estimate, size
from sidestep_core.device.quant import keep_oft_rebuild, quantize_module_linears
from sidestep_core.device.shapes import real_shape
from sidestep_core.model.config import AceStepConfig
from sidestep_core.model.dit import AceStepDiT
from sidestep_core.training.adapters import inject_adapter
from sidestep_core.training.optim import build_optimizer

SCALED = AceStepConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64)


def run_case(config, cfg, bp, offload, device, frames, cond, repeats):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        decoder = AceStepDiT(config).to(device)
    finally:
        torch.set_default_dtype(default)
    decoder.requires_grad_(False)
    if bp != "bf16":
        quantize_module_linears(decoder, bp, projection_names(decoder), torch.bfloat16)
    adapter = inject_adapter(decoder, cfg)
    keep_oft_rebuild(adapter)
    decoder.checkpoint_ratio = 1.0
    if offload:
        LayerStreamer(list(decoder.layers[:offload]), device)
    adapter.module.train()
    opt = build_optimizer(adapter.parameters(), cfg)
    x = torch.randn(1, frames, 64, device=device)
    ctx = torch.randn(1, frames, config.in_channels - 64, device=device)
    c = torch.randn(1, cond, config.enc_hidden, device=device)
    t = torch.full((1,), 0.5, dtype=torch.bfloat16, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = adapter.module(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=c,
                                  context_latents=ctx)
        (pred.float() - x).square().mean().backward()

    def full():
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    full()
    seconds = timed(full, str(device), repeats)
    if device.type == "cuda":
        peak = cuda_peak_bytes(step, device)
    else:
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        resident = [p for p in adapter.module.parameters() if p.device == device] + list(adapter.module.buffers())
        peak = tensor_bytes([*resident, *state]) + cpu_peak_bytes(step)
    opt.zero_grad(set_to_none=True)
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("scaled", "2b", "xl"), default="scaled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crop-seconds", type=float, default=10.0)
    ap.add_argument("--cond-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=list(BASE_PRECISIONS), choices=BASE_PRECISIONS)
    args = ap.parse_args()
    device = torch.device(args.device)
    config = SCALED if args.shape == "scaled" else real_shape(args.shape)
    cfg = TrainConfig(rank=64, alpha=64, precision="bf16", crop_seconds=args.crop_seconds)
    frames = int(round(args.crop_seconds * 25))
    n = config.num_hidden_layers
    print(f"{args.shape}: {platform.processor() or platform.machine()}, torch {torch.__version__}, {device}, "
          f"LoRA r64, crop {args.crop_seconds:g} s, {args.cond_tokens} condition tokens\n")
    print("| settings | s/step | measured peak | estimated peak | error |\n|---|---|---|---|---|")
    for bp in args.precisions:
        for off in (0, n) if device.type == "cuda" else (0,):  # on CPU host and device memory are one
            plan = estimate(config, cfg, base_precision=bp, offload_layers=off, device=device.type,
                            cond_tokens=args.cond_tokens, frames=frames)
            seconds, peak = run_case(config, cfg, bp, off, device, frames, args.cond_tokens, args.repeats)
            label = dataclasses.replace(plan).label
            print(f"| {label} | {seconds:.3g} | {size(peak)} | {size(plan.peak)} | "
                  f"{(plan.peak - peak) / peak * 100:+.1f} % |", flush=True)


if __name__ == "__main__":
    main()
