"""``sidestep preprocess``: encode an audio folder into cached training tensors (two low-memory passes)."""

from __future__ import annotations

import argparse
import sys

from ._progress import Renderer, add_plain

# Plain values here so that building the parser imports no torch (a test checks they match the core's).
PROMPT_STYLES = ("acestep", "comfyui")
LOUDNESS_MODES = ("none", "peak", "lufs")
MODEL_MAX_SECONDS = 600.0


SIDECAR_HELP = """\
metadata per song (next to song.wav; without any, the song gets --default-caption):
  song.txt               key: value lines, then a final "lyrics:" block, e.g.
                           caption: dreamy synthwave, female vocals
                           bpm: 120
                           key: A minor
                           signature: 4/4
                           language: en
                           lyrics:
                           [verse]
                           ...
                         keys (any case; aliases in brackets): caption (description, prompt), genre (style),
                         bpm (tempo), keyscale (key, scale), timesignature (signature, meter),
                         language (lang), instrumental (is_instrumental), custom_tag (trigger, tag),
                         repeat, duration. A song.txt without such lines is all lyrics.
  song.caption.txt +     the caption and the lyrics as two plain files (ACE-Step's convention);
  song.lyrics.txt        they override the same fields of song.txt
  --dataset-json FILE    an ACE-Step / Side-Step dataset JSON: a list of samples, or {"metadata": {...},
                         "samples": [...]}, each sample with audio_path or filename and the keys above
  song.labels.txt        labels written by `sidestep label` (marked as generated): they fill only what the
                         files above and the dataset JSON leave empty (caption, bpm, key, signature, language)
  Sidecars are UTF-8; UTF-16 with a BOM and Windows-1252/Latin-1 are read with a note. Lyrics that are only
  [Instrumental] (any case), or none at all, mark an instrumental.

what is skipped, what is kept with a warning:
  Files that cannot be used (unreadable, silent, corrupt, NaN samples, not a regular file, a link out of the
  folder without --allow-outside-paths, its sidecar's too) are listed as "skipped" with the reason; the rest go
  on. Files kept with something to know (truncated, clipped float samples, a metadata value of the wrong type
  ignored, text cut, a legacy encoding, a followed link) are listed as "warning" and recorded in manifest.json.
  The run ends with a dataset report (clipping, lossy files under 192 kbit/s, loudness spread, mixed sample
  rates, duplicates, clip lengths, songs without caption or lyrics, too few songs): advice, never a refusal.

exit codes: 0 done, 2 bad options, an unusable model, no usable audio, or an operating-system error on an
input or output (the message names the path), 130 interrupted.
"""


def register(sub, name):
    p = sub.add_parser(
        name,
        help="encode an audio folder into cached training tensors",
        description="Decode every audio file of a folder, encode it with the VAE, the Qwen3 text encoder and the "
        "model's condition encoder, and cache the tensors (one safetensors file per sample + manifest.json). "
        "Re-running re-encodes only new or changed files.",
        epilog=SIDECAR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="ACE-Step 1.5 model: original folder, ComfyUI diffusion model file or all-in-one checkpoint")
    p.add_argument("--audio-dir", required=True, help="folder of audio files (scanned recursively)")
    p.add_argument("--out", required=True, help="output folder for the tensor cache")
    p.add_argument("--dataset-json", help="ACE-Step / Side-Step dataset JSON describing the samples")
    p.add_argument("--vae", help="VAE to use instead of the one found beside the checkpoint")
    p.add_argument("--text-encoder", help="Qwen3-Embedding-0.6B folder or qwen_0.6b_ace15.safetensors")
    p.add_argument("--tokenizer", help="tokenizer folder (needed for ComfyUI files outside a ComfyUI installation)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="acestep",
                   help="acestep: the official pipeline's prompts; comfyui: TextEncodeAceStepAudio1.5's "
                        "(default: acestep)")
    p.add_argument("--max-duration", type=float, default=MODEL_MAX_SECONDS,
                   help=f"trim longer files to this many seconds (default: {MODEL_MAX_SECONDS:g}, the model maximum)")
    p.add_argument("--normalize", choices=LOUDNESS_MODES, default="none",
                   help="loudness normalisation: none, peak (-1 dBFS) or lufs (-14 LUFS) (default: none)")
    p.add_argument("--peak-db", type=float, default=-1.0, help="peak target / ceiling in dBFS (default: -1)")
    p.add_argument("--target-lufs", type=float, default=-14.0, help="LUFS target (default: -14)")
    p.add_argument("--chunk-seconds", type=float, default=30.0, help="VAE tile length (default: 30)")
    p.add_argument("--overlap-seconds", type=float, default=2.0, help="VAE tile overlap each side (default: 2)")
    p.add_argument("--default-caption", default="", help="caption for files without metadata (default: empty)")
    p.add_argument("--trigger-tag", default="",
                   help="trigger tag added to every caption unless the dataset JSON sets its own custom_tag")
    p.add_argument("--tag-position", choices=("prepend", "append", "replace"), default="prepend",
                   help="where the trigger tag goes in the caption (default: prepend)")
    p.add_argument("--default-language", help="lyric language for files without one (default: unknown / en)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let dataset-JSON paths and symbolic links point outside the audio folder")
    p.add_argument("--posterior-mean", action="store_true",
                   help="encode with the VAE posterior mean instead of a seeded sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"),
                   help="VAE precision (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--text-encoder-dtype", choices=("float32", "bfloat16", "float16"),
                   help="text encoder precision (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--variant", help="base variant when names do not tell (turbo, base, sft, xl-...)")
    add_plain(p)
    return p


def _config(args):
    from ..data.preprocess import PreprocessConfig

    return PreprocessConfig(
        prompt_style=args.prompt_style,
        max_duration=args.max_duration,
        normalize=args.normalize,
        peak_db=args.peak_db,
        target_lufs=args.target_lufs,
        chunk_seconds=args.chunk_seconds,
        overlap_seconds=args.overlap_seconds,
        default_caption=args.default_caption,
        default_language=args.default_language,
        custom_tag=args.trigger_tag,
        tag_position=args.tag_position,
        allow_outside_paths=args.allow_outside_paths,
        sample_posterior=not args.posterior_mean,
        seed=args.seed,
        device=args.device,
        vae_dtype=args.vae_dtype,
        text_encoder_dtype=args.text_encoder_dtype,
        variant=args.variant,
        vae=args.vae,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
    )


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def run(args) -> int:
    from ..data.preprocess import preprocess

    render = Renderer(getattr(args, "plain", False), unit="file")
    try:  # an OSError (read-only or full output folder, a vanished input) is one line and exit 2 in cli.main
        result = preprocess(
            args.checkpoint, args.audio_dir, args.out, dataset_json=args.dataset_json, config=_config(args),
            progress=render,
        )
    finally:
        render.close()
    for line in result.report_lines():
        print(line)
    for rep in result.passes:
        speed = rep.audio_seconds / rep.seconds if rep.seconds else 0.0
        print(
            f"{rep.name}: {rep.items} files, {rep.audio_seconds:.1f} s of audio in {rep.seconds:.1f} s "
            f"({speed:.2f}x), peak RSS {_mib(rep.peak_rss_bytes)}, peak device {_mib(rep.peak_device_bytes)}"
        )
    print(
        f"{result.samples} samples in {result.manifest_path} ({result.encoded} encoded, {result.reused} reused, "
        f"{len(result.failures)} skipped)"
    )
    if not result.ok:
        print("error: no usable samples (every file was skipped; reasons above)", file=sys.stderr)
        return 2
    return 0
