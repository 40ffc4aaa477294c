"""Preprocessing benchmark: seconds of audio encoded per second, and peak memory, for each pass.

Runs the real two-pass preprocessing (``sidestep_core.data.preprocess``) on synthetic audio files:

    python bench/preprocess.py                                  # tiny checkpoint written to a temp folder, CPU
    python bench/preprocess.py --profile comfyui-min --device cuda --seconds 60 --files 4
    python bench/preprocess.py --checkpoint /models/ACE-Step --device cuda --seconds 120

Pass 1 (VAE + text encoder) dominates: its speed is the VAE's. Pass 2 holds only the condition encoder. Peak
memory is the process's resident set (sampled every 20 ms) and, on CUDA, ``torch.cuda.max_memory_allocated``.
Each pass's figures include loading its models, so use files long enough to amortise that (the default 10 s x 2
is quick on CPU with the tiny VAE; use minutes of audio on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_wav(path: Path, seconds: float, seed: int) -> None:
    import av

    rate = 44100  # a rate that needs resampling, as most user files do
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    music = 0.3 * np.sin(2 * np.pi * (220 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    data = np.stack([music + 0.02 * rng.standard_normal(t.size), music + 0.02 * rng.standard_normal(t.size)])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(data.astype(np.float32), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model to use (default: a tiny checkpoint written to a temp folder)")
    ap.add_argument("--profile", default="tiny",
                    help="tiny-checkpoint profile when no --checkpoint (tiny, comfyui-min)")
    ap.add_argument("--layout", default="original", help="tiny-checkpoint layout when no --checkpoint")
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each synthetic file")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--chunk-seconds", type=float, default=30.0)
    ap.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from sidestep_core.data.preprocess import PreprocessConfig, preprocess

    work = Path(tempfile.mkdtemp(prefix="sidestep-bench-preprocess-"))
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        from sidestep_core.tiny import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(work / "model", args.layout, args.profile, 0).dit
    audio = work / "audio"
    audio.mkdir()
    for i in range(args.files):
        _write_wav(audio / f"track{i}.wav", args.seconds, i)

    cfg = PreprocessConfig(device=args.device, chunk_seconds=args.chunk_seconds, vae_dtype=args.vae_dtype)
    t0 = time.perf_counter()
    result = preprocess(checkpoint, audio, work / "cache", config=cfg)
    total = time.perf_counter() - t0

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    rows = []
    for rep in result.passes:
        rows.append({
            "pass": rep.name,
            "files": rep.items,
            "audio_s": round(rep.audio_seconds, 2),
            "wall_s": round(rep.seconds, 2),
            "audio_s_per_s": round(rep.audio_seconds / rep.seconds, 3) if rep.seconds else None,
            "peak_rss_gib": _gib(rep.peak_rss_bytes),
            "peak_device_gib": _gib(rep.peak_device_bytes),
        })
    report = {
        "checkpoint": str(checkpoint) if args.checkpoint else f"tiny ({args.profile}, {args.layout})",
        "device": gpu or f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "files": args.files,
        "seconds_per_file": args.seconds,
        "total_wall_s": round(total, 2),
        "passes": rows,
        "samples": result.samples,
        "failures": [f.to_dict() for f in result.failures],
    }
    print(f"# preprocessing benchmark — {report['checkpoint']}, {report['device']}, torch {report['torch']}")
    print(f"{args.files} files x {args.seconds:g} s, total {total:.1f} s (model loading included per pass)\n")
    print("| pass | files | audio s | wall s | audio s / s | peak RSS GiB | peak device GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass']} | {r['files']} | {r['audio_s']} | {r['wall_s']} | {r['audio_s_per_s']} | "
              f"{r['peak_rss_gib']} | {r['peak_device_gib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
