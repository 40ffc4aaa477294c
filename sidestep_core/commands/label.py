"""``sidestep label``: fill missing captions / bpm / key / time signature / language from the 5 Hz LM."""

from __future__ import annotations

import argparse
import sys

from ._progress import Renderer, add_plain

EPILOG = """\
what it writes:
  song.labels.txt beside each song that lacks a caption, bpm, key, time signature or language, holding only the
  missing fields, marked as generated. Edit it freely: preprocessing reads it after your own song.txt /
  song.caption.txt / dataset JSON, so a value you wrote always wins. An existing song.labels.txt is never
  overwritten; delete it to label the song again. Your own files are never written.

how:
  each song is VAE-encoded and turned into 5 Hz codes with the checkpoint's audio tokenizer (cached by content
  in --cache-dir), and the LM describes the codes as upstream's dataset tools ask it to ("understand"), decoding
  only valid values (bpm 30-300, keys like "F# minor", time signatures 2/3/4/6, language codes).

exit codes: 0 done (also when some songs failed: they are listed), 2 bad options, no LM or an unusable model,
130 interrupted.
"""


def register(sub, name):
    p = sub.add_parser(
        name,
        help="label songs without a caption / bpm / key / signature / language using the 5 Hz LM",
        description="Fill the metadata a song folder lacks from the ACE-Step 1.5 planner LM's reading of each "
        "song's audio codes, into editable song.labels.txt sidecars (never over what you wrote).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="ACE-Step 1.5 model: original folder, ComfyUI diffusion model file or all-in-one checkpoint")
    p.add_argument("--audio-dir", required=True, help="folder of audio files (scanned recursively)")
    p.add_argument("--dataset-json", help="ACE-Step / Side-Step dataset JSON describing the samples")
    p.add_argument("--lm", help="the 5 Hz LM: an acestep-5Hz-lm-* folder or qwen_1.7b/4b_ace15.safetensors "
                                "(default: the one beside the checkpoint)")
    p.add_argument("--lm-tokenizer", help="tokenizer for a ComfyUI LM file outside a ComfyUI installation "
                                          "(an acestep-5Hz-lm-* folder or ComfyUI's qwen25_tokenizer)")
    p.add_argument("--vae", help="VAE to use instead of the one found beside the checkpoint")
    p.add_argument("--cache-dir", help="where the audio codes are cached (default: AUDIO_DIR/.sidestep-codes)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature, 0 = greedy (default: 0.7, as upstream labels)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_plain(p)
    return p


def run(args) -> int:
    from ..data.preprocess import resolve_device
    from ..planner.label import label_folder

    render = Renderer(getattr(args, "plain", False), unit="song")
    try:
        results = label_folder(
            args.checkpoint, args.audio_dir, lm=args.lm, lm_tokenizer=args.lm_tokenizer,
            dataset_json=args.dataset_json, vae=args.vae, device=str(resolve_device(args.device)),
            temperature=args.temperature, seed=args.seed, cache_dir=args.cache_dir,
            progress=lambda done, total, rel: render({"stage": "label", "done": done, "total": total,
                                                      "current": rel}),
        )
    finally:
        render.close()
    counts: dict[str, int] = {}
    for r in sorted(results, key=lambda r: r.rel):
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.status == "labelled":
            print(f"labelled {r.rel}: " + ", ".join(f"{k}: {v}" for k, v in r.fields.items()))
        elif r.status == "failed":
            print(f"failed {r.rel}: {r.reason}", file=sys.stderr)
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no songs")
    return 0
