"""Training step against the reference stack: upstream's decoder + PEFT LoRA + upstream's per-layer checkpointing.

    PYTHONPATH=. python bench/train_step_vs_reference.py --upstream-root /path/to/ACE-Step-1.5   # CPU, 1 thread
    PYTHONPATH=. python bench/train_step_vs_reference.py --device cuda --upstream-root ...      # same on a GPU

Both stacks get the same random bf16 weights (scaled decoder: hidden 512, 8 layers), LoRA r64 α128 with dropout 0.1
on the self- and cross-attention projections (fp32 adapters), bf16 autocast, AdamW, the same inputs and loss. Steps
of the two stacks alternate in paired rounds over every (length, checkpointing) case, so load on a shared machine
hits both alike; the report gives per-round ratios ours / reference (median and range), peak memory of one step (CPU:
the profiler's allocation events; CUDA: the allocator's peak) and the growth exponent of our step time over length.
The reference needs upstream's code (run with transformers < 4.58); without ``--upstream-root`` only ours is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidestep_core.config import TrainConfig  # noqa: E402
from sidestep_core.device.measure import cpu_peak_bytes  # noqa: E402
from sidestep_core.model import AceStepConfig  # noqa: E402
from sidestep_core.model.dit import AceStepDiT  # noqa: E402
from sidestep_core.training.adapters import inject_adapter  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128)
COND = 600
RANK, ALPHA, DROPOUT = 64, 128.0, 0.1


def build_ours(cfg: AceStepConfig, device: str, compile_: bool):
    torch.manual_seed(0)
    with torch.device(device):
        dec = AceStepDiT(cfg).to(torch.bfloat16).requires_grad_(False)
    state = {k: v.clone() for k, v in dec.state_dict().items()}
    tc = TrainConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, attention="both").validate()
    adapter = inject_adapter(dec, tc)
    if compile_:
        dec.compile_layers()

    def call(x, t, cond, ctx):
        return dec(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=cond, context_latents=ctx)

    def set_ckpt(on: bool):
        dec.checkpoint_ratio = 1.0 if on else 0.0

    return dec, adapter.parameters(), call, set_ckpt, state


def build_reference(root: str, cfg: AceStepConfig, state: dict, device: str):
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, root)
    from acestep.models.common.configuration_acestep_v15 import AceStepConfig as UpstreamConfig
    from acestep.models.turbo.modeling_acestep_v15_turbo import AceStepDiTModel

    data = {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "model_type", "architectures")}
    ucfg = UpstreamConfig(**data)
    ucfg._attn_implementation = "sdpa"
    with torch.device(device):
        dit = AceStepDiTModel(ucfg).to(torch.bfloat16)
    dit.load_state_dict(state)
    dit.requires_grad_(False)
    conf = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none",
                      target_modules=r".*layers\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)_proj")
    peft_model = get_peft_model(dit, conf)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()

    def call(x, t, cond, ctx):
        return dit(hidden_states=x, timestep=t, timestep_r=t, attention_mask=None, encoder_hidden_states=cond,
                   encoder_attention_mask=None, context_latents=ctx, use_cache=False)[0]

    def set_ckpt(on: bool):
        if on:
            dit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            dit.gradient_checkpointing_disable()

    return dit, params, call, set_ckpt


class Stack:
    def __init__(self, name, module, params, call, set_ckpt, device):
        self.name, self.module, self.call, self.set_ckpt, self.device = name, module, call, set_ckpt, device
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        module.train()

    def step(self, batch) -> None:
        x, t, cond, ctx, target = batch
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            out = self.call(x, t, cond, ctx)
        (out.float() - target).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, batch) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step. On a shared CPU the process time is the steadier
        measure: wall time there mostly measures how much of a core the scheduler gave the step."""
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.step(batch)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def peak_bytes(self, batch) -> int:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step(batch)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return cpu_peak_bytes(lambda: self.step(batch))


def make_batch(cfg, seconds: float, device: str):
    g = torch.Generator().manual_seed(int(seconds))
    frames = int(seconds * 25)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)  # noqa: E731
    return (rnd(1, frames, 64), torch.rand(1, generator=g).to(device, torch.bfloat16), rnd(1, COND, cfg.hidden_size),
            rnd(1, frames, 128), torch.randn(1, frames, 64, generator=g).to(device))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--upstream-root", help="checkout of ACE-Step-1.5 (upstream's model code) for the reference")
    ap.add_argument("--seconds", default="60,240", help="clip lengths compared with the reference")
    ap.add_argument("--growth", default="30,240", help="two lengths for our growth exponent (checkpointing on)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile our decoder's layers (TrainConfig.torch_compile)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler tables of our 60 s step, checkpointing on and off")
    args = ap.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    cfg = AceStepConfig(**SHAPE)
    dec, params, call, set_ckpt, state = build_ours(cfg, args.device, args.compile)
    stacks = [Stack("ours", dec, params, call, set_ckpt, args.device)]
    if args.upstream_root:
        try:
            stacks.append(Stack("reference", *build_reference(args.upstream_root, cfg, state, args.device),
                                args.device))
        except Exception as exc:  # noqa: BLE001 - report and time ours alone
            print(f"reference stack unavailable ({type(exc).__name__}: {exc}); timing ours only")
    else:
        print("no --upstream-root: reference stack skipped, timing ours only")
    lengths = sorted({float(s) for s in args.seconds.split(",")} | {float(s) for s in args.growth.split(",")})
    cases = [(s, c) for s in lengths for c in (True, False)]
    batches = {s: make_batch(cfg, s, args.device) for s in lengths}
    times: dict = {}  # the timing the ratios use: process CPU time on CPU, wall time on CUDA
    walls: dict = {}
    use_cpu_time = not args.device.startswith("cuda")
    t0 = time.perf_counter()
    for stack in stacks:  # warm-up (and compilation) once per case
        for s, c in cases:
            stack.set_ckpt(c)
            stack.step(batches[s])
    print(f"warm-up {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for s, c in cases:
            order = stacks if r % 2 == 0 else stacks[::-1]
            for stack in order:
                stack.set_ckpt(c)
                wall, cpu = stack.timed(batches[s])
                times.setdefault((stack.name, s, c), []).append(cpu if use_cpu_time else wall)
                walls.setdefault((stack.name, s, c), []).append(wall)
        load.append(os.getloadavg()[0])
        print(json.dumps({"round": r + 1, "load_average_1min": round(load[-1], 1),
                          "s": {f"{n} {s:g}s {'ckpt' if c else 'no-ckpt'}": round(v[-1], 3)
                                for (n, s, c), v in times.items()},
                          "wall_s": {f"{n} {s:g}s {'ckpt' if c else 'no-ckpt'}": round(v[-1], 3)
                                     for (n, s, c), v in walls.items()}}), flush=True)
    report = {"device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "compile": args.compile,
              "load_average_1min": f"{min(load):.1f}–{max(load):.1f}", "cases": []}
    for s, c in cases:
        row = {"seconds": s, "checkpointing": c, "timing": "process CPU" if use_cpu_time else "wall",
               "ours_s": summary(times[("ours", s, c)])}
        if len(stacks) > 1:
            ratios = [a / b for a, b in zip(times[("ours", s, c)], times[("reference", s, c)])]
            row.update(reference_s=summary(times[("reference", s, c)]), ratio=summary(ratios))
            if use_cpu_time:
                wall_ratios = [a / b for a, b in zip(walls[("ours", s, c)], walls[("reference", s, c)])]
                row.update(ours_wall_s=summary(walls[("ours", s, c)]),
                           reference_wall_s=summary(walls[("reference", s, c)]), wall_ratio=summary(wall_ratios))
            if str(s) in [str(float(x)) for x in args.seconds.split(",")]:
                peaks = {}
                for stack in stacks:
                    stack.set_ckpt(c)
                    peaks[stack.name] = stack.peak_bytes(batches[s])
                row.update(ours_peak_mib=round(peaks["ours"] / 2**20), ref_peak_mib=round(peaks["reference"] / 2**20),
                           peak_ratio=round(peaks["ours"] / peaks["reference"], 3))
        report["cases"].append(row)
        print(json.dumps(row), flush=True)
    lo, hi = (float(x) for x in args.growth.split(","))
    for stack in stacks:  # per round: log(t_hi / t_lo) / log(hi / lo), the two lengths timed in the same round
        for c in (True, False):
            exps = [math.log(b / a) / math.log(hi / lo)
                    for a, b in zip(times[(stack.name, lo, c)], times[(stack.name, hi, c)])]
            report[f"growth_exponent_{stack.name}_{'ckpt' if c else 'no_ckpt'}"] = summary(exps)
    print(json.dumps(report, indent=1))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for c in (True, False):
            stacks[0].set_ckpt(c)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                stacks[0].step(batches[60.0] if 60.0 in batches else batches[lengths[0]])
            print(f"our step, checkpointing {'on' if c else 'off'}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
