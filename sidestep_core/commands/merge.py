"""``sidestep merge``: combine adapters — an exact weighted sum written as one new adapter, or every adapter baked
into a copy of the base model as a ComfyUI diffusion-model file (``--bake``)."""

from __future__ import annotations

from pathlib import Path

from ._progress import EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, add_plain, say

VERIFY_TOLERANCE = 1e-5


def register(sub, name):
    p = sub.add_parser(
        name,
        help="combine adapters: a weighted sum as one new adapter, or baked into a copy of the base model",
        description="Weighted sum (default): one adapter whose weight change is the sum of the sources' changes "
        "times their weights, exactly — LoRAs of any ranks and alphas are concatenated (rank = the sum of the "
        "ranks, scales folded into the factors, no SVD), LoHa and LoKr enter through their exact low-rank forms, "
        "and a target whose summed rank would reach the weight's size is written as its full delta. Written "
        "in ComfyUI's format (LoraLoaderModelOnly at strength 1 gives the same weights as the sources chained at "
        "their weights) or as a PEFT folder. DoRA and OFT change the weight in a way that depends on it, so they "
        "cannot be summed: bake them. --bake BASE writes BASE's diffusion model with every adapter applied in "
        "the order given, each at its weight as strength (as a chain of LoRA loaders does), in BASE's dtypes, "
        "as one file ComfyUI's UNETLoader loads (models/diffusion_models).",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="adapter folders or files (any format sidestep reads), or training run folders")
    p.add_argument("--weights", metavar="W,W,...",
                   help="one weight (strength) per adapter, comma-separated; negative values subtract "
                   "(default: 1 each)")
    p.add_argument("--pick", default="final", metavar="CHOICE",
                   help="which adapter of each training run: final, last, step_N, ema, step_N/ema, last/ema "
                   "(default: final)")
    p.add_argument("--out", required=True,
                   help="output .safetensors file (or folder with --format peft)")
    p.add_argument("--bake", metavar="BASE",
                   help="bake into a copy of this model (ComfyUI diffusion-model file, all-in-one checkpoint or "
                   "ACE-Step folder) instead of writing an adapter")
    p.add_argument("--rank", type=int, default=0, metavar="R",
                   help="after the exact sum, cut every target to its best rank-R approximation (truncated SVD) — "
                   "smaller, no longer exact: the relative error of each target is printed (default: 0, exact)")
    p.add_argument("--format", choices=("comfyui", "peft"), default="comfyui",
                   help="format of the merged adapter (default: %(default)s)")
    p.add_argument("--no-overwrite", dest="overwrite", action="store_false", help="refuse to replace a file")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the merged adapter back and comparing its weight changes with the sum")
    add_plain(p)
    return p


def parse_weights(text, n: int) -> list[float]:
    if not text:
        return [1.0] * n
    try:
        weights = [float(w) for w in str(text).split(",") if w.strip()]
    except ValueError as exc:
        raise ValueError(f"--weights: not a list of numbers ({text!r})") from exc
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} weight(s) for {n} adapter(s)")
    return weights


def verify_sum(merged, sources) -> float:
    """Max relative difference between the read-back adapter's ΔW and Σ wᵢ·ΔWᵢ over all targets."""
    import torch

    from ..adapters.delta import additive_delta

    worst = 0.0
    for name, m in merged.all_modules().items():
        if m.kind == "bias":
            continue
        shape = torch.Size(m.weight_shape())
        want = sum(w * additive_delta(aw.all_modules()[name], shape) for aw, w in sources
                   if name in aw.all_modules() and aw.all_modules()[name].kind != "bias")
        got = additive_delta(m, shape)
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-12)))
    return worst


def run(args) -> int:
    from ..adapters import export_comfyui, export_peft, read_adapter_weights
    from ..adapters.choice import resolve_checkpoint

    weights = parse_weights(args.weights, len(args.adapters))
    sources = []
    for path, w in zip(args.adapters, weights):
        aw = read_adapter_weights(resolve_checkpoint(path, args.pick))
        say(f"{w:+g} × {aw.summary()}")
        sources.append((aw, w))
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: exists (leave out --no-overwrite to replace it)")

    if args.bake:
        from ..adapters.bake import bake

        if args.rank:
            raise ValueError("--rank applies to the weighted sum only (a baked model is exact)")
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        result = bake(args.bake, sources, out)
        for note in result.notes:
            say(f"note: {note}")
        say(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB, {result.patched} of "
            f"{result.tensors} tensors changed; load it with UNETLoader from models/diffusion_models)")
        return EXIT_OK

    from ..adapters.merge import weighted_sum

    merged = weighted_sum(sources)
    for note in merged.notes:
        say(f"note: {note}")
    if args.rank:
        from ..adapters.merge import rerank

        merged, errors = rerank(merged, args.rank)
        if errors:
            worst = max(errors, key=errors.get)
            say(f"re-ranked {len(errors)} target(s) to rank {args.rank} by truncated SVD: relative error "
                f"‖ΔW − ΔW_{args.rank}‖/‖ΔW‖ max {errors[worst]:.2e} ({worst}), mean "
                f"{sum(errors.values()) / len(errors):.2e}")
        else:
            say(f"every target already has rank ≤ {args.rank}: nothing re-ranked, the sum stays exact")
    if args.format == "peft":
        path, notes = export_peft(merged, out)
    else:
        out = out if out.suffix == ".safetensors" else out.with_suffix(".safetensors")
        path, notes = export_comfyui(merged, out)
    for note in notes:
        say(f"note: {note}")
    say(f"wrote {path} ({merged.adapter_type} adapter, {len(merged.all_modules())} targets)")
    if args.verify:
        truncated = bool(args.rank)  # then the file is checked against the re-ranked adapter it was written from
        worst = verify_sum(read_adapter_weights(path), [(merged, 1.0)] if truncated else sources)
        say(f"verified: weight changes of the written adapter vs the "
            f"{'re-ranked' if truncated else 'weighted'} sum, max relative difference {worst:.2e}")
        if worst > VERIFY_TOLERANCE:
            say(f"error: the merged adapter differs from the weighted sum by more than {VERIFY_TOLERANCE:g}")
            return EXIT_FAILED
    return EXIT_OK
