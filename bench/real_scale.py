"""Training-step time and peak memory at a real shape with random weights, every base precision, with and without
offload (CUDA), beside the memory plan's estimate (the estimator's error).

    python bench/real_scale.py --shape scaled --crop-seconds 10        # CPU, minutes
    python bench/real_scale.py --shape 2b --crop-seconds 2             # CPU, real 2B shape (slow, ~8 GB RAM)
    python bench/real_scale.py --shape xl --device cuda --crop-seconds 60   # GPU: torch.cuda.max_memory_allocated

Peak memory: on CPU resident tensors + the peak of what a step allocates (torch profiler allocation events), on
CUDA ``max_memory_allocated``; offload rows only on CUDA (on CPU host and device memory are the same). Time: median
of ``--repeats`` steps after a warm-up. The step is ``device.measure.RandomStep``, as in tests/test_device_plan.py.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform

import torch

from _timing import timed
from sidestep_core.config import BASE_PRECISIONS, TrainConfig
from sidestep_core.device.measure import RandomStep
from sidestep_core.device.plan import estimate, size
from sidestep_core.device.shapes import real_shape
from sidestep_core.model.config import AceStepConfig

SCALED = AceStepConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64)


def run_case(config, cfg, bp, offload, device, frames, cond, repeats):
    step = RandomStep.build(config, cfg, bp, frames, cond, device, offload)
    step.update()
    seconds = timed(step.update, str(device), repeats)
    return seconds, step.peak_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("scaled", "2b", "xl"), default="scaled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crop-seconds", type=float, default=10.0)
    ap.add_argument("--cond-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=list(BASE_PRECISIONS), choices=BASE_PRECISIONS)
    ap.add_argument("--fused-backward", action="store_true", help="the optimizer step inside backward")
    ap.add_argument("--optimizer", default="adamw")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = SCALED if args.shape == "scaled" else real_shape(args.shape)
    cfg = TrainConfig(rank=64, alpha=64, precision="bf16", crop_seconds=args.crop_seconds, optimizer=args.optimizer,
                      fused_backward=args.fused_backward)
    frames = int(round(args.crop_seconds * 25))
    n = config.num_hidden_layers
    print(f"{args.shape}: {platform.processor() or platform.machine()}, torch {torch.__version__}, {device}, "
          f"LoRA r64, {args.optimizer}, crop {args.crop_seconds:g} s, {args.cond_tokens} condition tokens, fused "
          f"backward {'on' if args.fused_backward else 'off'}\n")
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
