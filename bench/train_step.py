"""Training-step benchmark: steps/s and peak memory per configuration (rank, crop length, batch, checkpointing).

It times the real training step (``sidestep_core.training``: adapter injection, objective, optimizer) on a decoder
with random weights, each configuration in its own subprocess so peak memory is that configuration's alone.

    python bench/train_step.py                      # CPU, scaled-down decoder, writes bench/RESULTS.md
    python bench/train_step.py --device cuda --shape 2b --optimizer adamw8bit

On CUDA it also reports MFU: forward FLOPs of the frozen decoder counted analytically, x3 for the usual
"6·N·tokens" training convention (forward + backward of a fully trained model; a LoRA step does less work, so
this flatters nothing: the second column counts only forward + activation gradients, x2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # 2B turbo decoder (config.json of acestep-v15-turbo)
    "2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128),
    # small enough for a 2-core CPU, same structure
    "scaled": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
COND_TOKENS = 640  # typical packed condition length (caption + lyrics + timbre)


def forward_flops(shape: dict, frames: int, batch: int, cond: int) -> float:
    """Matmul FLOPs of one decoder forward (2·m·n·k per matmul), attention included."""
    h, inter, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    t = (frames + 1) // 2  # patch size 2
    q_out, kv_out = heads * hd, kv * hd
    per_layer = 0.0
    per_layer += 2 * t * h * (q_out + 2 * kv_out) + 2 * t * q_out * h  # self q,k,v,o
    window = [min(t, 2 * 128 + 1), t]  # even layers: sliding window 128
    per_layer += 0  # attention scores added below (layer dependent)
    per_layer += 2 * t * h * q_out + 2 * cond * h * 2 * kv_out + 2 * t * q_out * h  # cross q,(k,v on cond),o
    per_layer += 2 * t * heads * hd * cond * 2  # cross attention scores + values
    per_layer += 3 * 2 * t * h * inter  # SwiGLU
    attn = sum(2 * 2 * t * window[i % 2] * heads * hd for i in range(n))
    io = 2 * t * (192 * 2) * h + 2 * t * h * 64 * 2 + 2 * cond * 2048 * h  # proj_in/out, condition_embedder
    return batch * (n * per_layer + attn + io)


def run_one(spec: dict) -> dict:
    import torch

    from sidestep_core.config import TrainConfig
    from sidestep_core.model import AceStepConfig
    from sidestep_core.model.dit import AceStepDiT
    from sidestep_core.training.adapters import inject_adapter
    from sidestep_core.training.data import Item, collate
    from sidestep_core.training.objective import Objective
    from sidestep_core.training.optim import build_optimizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    shape = SHAPES[spec["shape"]]
    dtype = torch.bfloat16
    mcfg = AceStepConfig(**shape)
    with torch.device("meta"):
        dec = AceStepDiT(mcfg)
    dec.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.02)
        for m in dec.modules():  # derived buffers (RoPE) were left uninitialised by to_empty
            if hasattr(m, "inv_freq"):
                steps = torch.arange(0, mcfg.head_dim, 2, device=device).float()
                m.inv_freq = 1.0 / (mcfg.rope_theta ** (steps / mcfg.head_dim))
    dec.to(dtype).requires_grad_(False)
    cfg = TrainConfig(rank=spec["rank"], alpha=float(spec["rank"]), dropout=0.0, optimizer=spec["optimizer"],
                      learning_rate=1e-4).validate()
    adapter = inject_adapter(dec, cfg)
    dec.checkpoint_ratio = 1.0 if spec["checkpointing"] else 0.0
    adapter.module.train()
    opt = build_optimizer(adapter.parameters(), cfg)
    null = torch.zeros(1, 1, mcfg.enc_hidden, device=device, dtype=dtype)
    obj = Objective("continuous", -0.4, 1.0, 0.15, null, dtype)
    frames, batch = int(spec["seconds"] * 25), spec["batch"]
    samples = [{"target_latents": torch.randn(frames, 64), "context_latents": torch.randn(frames, 128),
                "encoder_hidden_states": torch.randn(COND_TOKENS, mcfg.enc_hidden),
                "encoder_attention_mask": torch.ones(COND_TOKENS, dtype=torch.bool)} for _ in range(batch)]
    data = collate(samples, [Item(i, 0, frames) for i in range(batch)]).to(device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss, _ = obj(adapter.module, data, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(spec["warmup"]):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / spec["steps"]
    out = dict(spec, seconds_per_step=dt, steps_per_s=1 / dt, trainable_params=adapter.num_parameters())
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        fwd = forward_flops(shape, frames, batch, COND_TOKENS)
        if peak:
            out["mfu_6n"] = 3 * fwd / dt / peak
            out["mfu_useful"] = 2 * fwd / dt / peak
        out["gpu"] = name
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["step_peak_bytes"] = out["peak_bytes"] - rss_before  # what the training steps added to the peak
    out["threads"] = torch.get_num_threads()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: scaled on CPU, 2b on CUDA")
    ap.add_argument("--optimizer", default=None, help="default: adamw on CPU, adamw8bit on CUDA")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--write", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown file to append to")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("2b" if cuda else "scaled")
    optimizer = args.optimizer or ("adamw8bit" if cuda else "adamw")
    steps = args.steps or (10 if cuda else 3)
    grid = []
    if cuda:
        for rank, secs, batch, ckpt in [(64, 60, 1, True), (64, 60, 1, False), (16, 60, 1, True), (64, 30, 1, True),
                                        (64, 120, 1, True), (64, 60, 2, True), (128, 60, 1, True)]:
            grid.append(dict(rank=rank, seconds=secs, batch=batch, checkpointing=ckpt))
    else:
        for rank, secs, batch, ckpt in [(16, 10, 1, True), (16, 10, 1, False), (64, 10, 1, True), (16, 30, 1, True),
                                        (16, 30, 1, False), (16, 10, 2, True)]:
            grid.append(dict(rank=rank, seconds=secs, batch=batch, checkpointing=ckpt))
    results = []
    for g in grid:
        spec = dict(g, device=args.device, shape=shape, optimizer=optimizer, steps=steps, warmup=2,
                    threads=args.threads)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"failed: {spec}\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append(dict(spec, error=(proc.stderr.strip().splitlines() or ["?"])[-1]))
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(_row(res), flush=True)
    _write(Path(args.write), results, shape, optimizer, args)
    return 0


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['rank']} | {r['seconds']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | error: " \
               f"{r['error'][:80]} |"
    mfu = f" {100 * r['mfu_6n']:.1f}% / {100 * r['mfu_useful']:.1f}% |" if "mfu_6n" in r else ""
    delta = f" {r['step_peak_bytes'] / 2**20:.0f} |" if "step_peak_bytes" in r else ""
    return (f"| {r['rank']} | {r['seconds']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['steps_per_s']:.3f} | {r['seconds_per_step']:.3f} | {r['peak_bytes'] / 2**30:.2f} |" + delta + mfu)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.system()}")


def _write(path: Path, results: list, shape: str, optimizer: str, args) -> None:
    cuda = any("gpu" in r for r in results)
    head = "| rank | crop s | batch | checkpointing | steps/s | s/step | peak GiB |"
    sep = "|---|---|---|---|---|---|---|"
    if cuda:
        head += " MFU 6N / useful |"
        sep += "---|"
    else:
        head += " step peak Δ MiB |"
        sep += "---|"
    device = results[0].get("gpu", args.device) if results else args.device
    lines = [
        f"## {_dt.date.today().isoformat()} — {device}, shape `{shape}`, optimizer {optimizer}",
        "",
        f"Machine: {_machine()}. Precision bf16 base weights + autocast, fp32 adapters; "
        f"{results[0]['steps'] if results else '?'} timed steps after 2 warm-up steps, "
        f"{results[0].get('threads', '?') if results else '?'} torch thread(s); decoder {SHAPES[shape]}; "
        f"condition length {COND_TOKENS} tokens; LoRA with alpha = rank. Peak memory: "
        + ("torch.cuda.max_memory_allocated." if cuda else "process peak RSS (weights, activations, Python)."),
        "",
        head,
        sep,
        *[_row(r) for r in results],
        "",
    ]
    text = path.read_text() if path.exists() else "# Training-step benchmark results\n\n"
    path.write_text(text + "\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
