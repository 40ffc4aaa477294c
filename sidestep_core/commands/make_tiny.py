"""``sidestep make-tiny-checkpoint``: write a deterministic tiny model in a real on-disk layout."""

from __future__ import annotations

from ..tiny import LAYOUTS, PROFILES


def register(sub, name):
    p = sub.add_parser(
        name,
        help="write a tiny random ACE-Step 1.5 checkpoint in a real layout",
        description="Write a deterministic random ACE-Step 1.5 model (DiT, VAE, text encoder, tokenizer) in one of "
        "the real on-disk layouts, for tests and demos. The same seed gives identical tensors in every layout.",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--layout", choices=LAYOUTS, default="original", help="on-disk layout (default: original)")
    p.add_argument("--profile", choices=PROFILES, default="tiny",
                   help="tiny: seconds on CPU; comfyui-min: the smallest model ComfyUI itself loads (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument("--lm", action="store_true",
                   help="also write a tiny 5 Hz planner LM (Qwen3 causal LM with the audio-code vocabulary)")
    return p


def run(args) -> int:
    from ..tiny.writer import describe, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(args.dir, args.layout, args.profile, args.seed, lm=args.lm)
    print(describe(ckpt))
    return 0
