"""``torch_compile`` on or off: our training step with the decoder compiled (``AceStepDiT.compile_layers``) against
the same step eager, in paired rounds in one process (same weights, inputs and settings as
bench/train_step_vs_reference.py; process CPU time on CPU, wall time on CUDA).

    PYTHONPATH=. python bench/compile_vs_eager.py --seconds 30 --rounds 3          # CPU, 1 thread
    PYTHONPATH=. python bench/compile_vs_eager.py --device cuda --seconds 60,240
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step_vs_reference as ref  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", default="30")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    cfg = ref.AceStepConfig(**ref.SHAPE)
    stacks = {}
    for name, comp in (("eager", False), ("compiled", True)):
        dec, params, call, set_ckpt, _ = ref.build_ours(cfg, args.device, comp)
        stacks[name] = ref.Stack(name, dec, params, call, set_ckpt, args.device)
    lengths = [float(s) for s in args.seconds.split(",")]
    batches = {s: ref.make_batch(cfg, s, args.device) for s in lengths}
    cases = [(s, c) for s in lengths for c in (True, False)]
    for s, c in cases:  # the first compiled steps compile (one graph per case)
        for st in stacks.values():
            st.set_ckpt(c)
            t0 = time.perf_counter()
            st.step(batches[s])
            print(f"first step {st.name} {s:g}s ckpt={c}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict = {}
    load = []
    for r in range(args.rounds):
        for s, c in cases:
            for st in (list(stacks.values()) if r % 2 == 0 else list(stacks.values())[::-1]):
                st.set_ckpt(c)
                wall, cpu = st.timed(batches[s])
                times.setdefault((st.name, s, c), []).append(wall if args.device.startswith("cuda") else cpu)
        load.append(os.getloadavg()[0])
    for s, c in cases:
        ratios = [a / b for a, b in zip(times[("compiled", s, c)], times[("eager", s, c)])]
        print(json.dumps({"seconds": s, "checkpointing": c, "timing": "wall" if args.device.startswith("cuda")
                          else "process CPU",
                          "eager_s": ref.summary(times[("eager", s, c)]),
                          "compiled_s": ref.summary(times[("compiled", s, c)]),
                          "compiled/eager": ref.summary(ratios)}), flush=True)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds,
                      "load_average_1min": f"{min(load):.1f}–{max(load):.1f}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
