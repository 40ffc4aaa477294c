"""``sidestep estimate``: rank the decoder's projections by gradient magnitude and suggest targets and ranks."""

from __future__ import annotations

import signal
from pathlib import Path

from ..estimate import FOCUSES, GROUPS, EstimateSettings
from ._progress import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_OK, Renderer, add_plain, is_plain, say


def register(sub, name):
    d = EstimateSettings()
    p = sub.add_parser(
        name,
        help="rank decoder modules by gradient magnitude; suggest targets and ranks for train",
        description="For every adapter target of the decoder (q/k/v/o of self- and cross-attention, gate/up/down "
        "of the MLP), compute the mean squared gradient of the training objective (no adapter, no CFG dropout) "
        "over N batches, one module group at a time, repeated over several runs for a spread. Writes a ranked "
        "JSON with suggested target modules and a rank pattern that `sidestep train --targets-from FILE` uses.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--checkpoint", required=True, help="ACE-Step 1.5 model (folder, ComfyUI file or all-in-one)")
    p.add_argument("--dataset", required=True, help="preprocessed dataset (tensor cache folder)")
    p.add_argument("--out", default="estimate.json", help="where to write the JSON result (default: %(default)s)")
    p.add_argument("--batches", type=int, default=d.batches,
                   help="batches per run, batch size 1 (default: %(default)s)")
    p.add_argument("--runs", type=int, default=d.runs,
                   help="independent runs; their spread is reported (default: %(default)s)")
    p.add_argument("--focus", default=d.focus,
                   help=f"timesteps: {', '.join(FOCUSES)} (texture = t in [0, 0.4], structure = [0.6, 1]) "
                   "or a range 'lo,hi' (default: %(default)s)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                   help="module groups to score (default: all)")
    p.add_argument("--top-k", type=int, default=None,
                   help="modules to suggest (default: half of them, every group represented)")
    p.add_argument("--base-rank", type=int, default=d.base_rank,
                   help="rank of a module with the median score (default: %(default)s)")
    p.add_argument("--rank-min", type=int, default=d.rank_min, help="smallest suggested rank (default: %(default)s)")
    p.add_argument("--rank-max", type=int, default=d.rank_max, help="largest suggested rank (default: %(default)s)")
    p.add_argument("--alpha-ratio", type=float, default=d.alpha_ratio,
                   help="alpha = ratio × rank (default: %(default)s)")
    p.add_argument("--crop-seconds", type=float, default=d.crop_seconds,
                   help="crop length in seconds, 0 = whole clips (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of clips, crops, timesteps and noise (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
                   help="weights dtype; auto = bf16 on CUDA, fp32 otherwise (default: %(default)s)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (faster, more memory)")
    p.add_argument("--variant", help="base variant when the checkpoint does not tell (turbo, base, sft, xl-*)")
    p.add_argument("--show", type=int, default=20, help="rows of the ranking to print (default: %(default)s)")
    add_plain(p)
    return p


def run(args) -> int:
    from ..estimate import estimate, format_table

    settings = EstimateSettings(
        batches=args.batches, runs=args.runs, focus=args.focus, top_k=args.top_k, seed=args.seed,
        crop_seconds=args.crop_seconds, base_rank=args.base_rank, rank_min=args.rank_min, rank_max=args.rank_max,
        alpha_ratio=args.alpha_ratio, device=args.device, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, groups=tuple(args.groups),
    ).validate()
    out = Path(args.out).expanduser()
    if out.is_dir():
        out = out / "estimate.json"
    renderer = Renderer(is_plain(args), "estimate")
    stop = {"flag": False}

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        renderer.write("stop requested: finishing this batch (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = estimate(args.checkpoint, args.dataset, settings, progress=renderer, base_variant=args.variant,
                          should_stop=lambda: stop["flag"])
    except KeyboardInterrupt:
        renderer.close()
        say("estimation interrupted; nothing written")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
        renderer.close()
    path = result.save(out)
    if args.show > 0:
        say(format_table(result.data, args.show))
    ts = result.train_settings
    say(f"suggested {len(ts['target_modules'])} of {len(result.data['modules'])} modules, ranks "
        f"{min(ts['rank_pattern'].values())}–{max(ts['rank_pattern'].values())}")
    say(f"wrote {path}  (train with: sidestep train --targets-from {path} …)")
    return EXIT_OK
