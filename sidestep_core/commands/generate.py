"""``sidestep generate``: text-to-music with the core model (optionally with an adapter), and ``--compare``: the
same prompt and seed for every chosen checkpoint × every strength (``sidestep_core.inference.compare``), as a
table of audio files and the loss chart with the compared checkpoints marked.

Registered under a second name ``compare``, the same module starts in comparison mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..text.prompts import PROMPT_STYLES
from ._progress import EXIT_CODES_HELP, add_plain


def register(subparsers, name: str = "generate") -> argparse.ArgumentParser:
    comparing = name == "compare"
    p = subparsers.add_parser(
        name,
        help="compare an adapter's strengths and checkpoints on one prompt" if comparing else
        "generate music from a caption and lyrics (optionally with an adapter)",
        description=(
            "Render one prompt and seed for every chosen checkpoint of a training run (or several adapters) at "
            "every strength; states the cost first, then writes OUT/NN_label.flac, OUT/compare.md (the grid as a "
            "table), OUT/compare.png (the loss curve with the compared checkpoints marked) and OUT/compare.json."
            if comparing else
            "Text-to-music with an ACE-Step 1.5 model: the prompt is built and encoded exactly as preprocessing "
            "does, sampled with the variant's sampler (turbo: 8 fixed steps; base/sft: CFG with APG) and decoded "
            "to 48 kHz stereo FLAC. --compare renders the same prompt for each chosen checkpoint at each "
            "strength."),
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--checkpoint", required=True,
                   help="ACE-Step 1.5 model: original folder, ComfyUI diffusion model file or all-in-one checkpoint")
    if comparing:
        p.add_argument("--adapter", action="append", default=[],
                       help="a training run folder (OUT of sidestep train: the --checkpoints chosen in it are "
                       "compared) or an adapter folder/file (PEFT, LyCORIS or ComfyUI format); repeat it to compare "
                       "several runs or adapters")
    else:
        p.add_argument("--adapter", help="adapter folder/file (PEFT, LyCORIS or ComfyUI format); with --compare "
                       "also a training run folder (OUT of sidestep train)")
        p.add_argument("--strength", type=float, default=1.0, help="adapter strength (default: 1.0)")
        p.add_argument("--pick", default="final", metavar="CHOICE",
                       help="which adapter of a training run --adapter names: final, last, step_N, ema, step_N/ema "
                       "or last/ema (default: final)")
    g = p.add_argument_group("prompt")
    g.add_argument("--caption", required=True, help="caption / tags describing the music")
    g.add_argument("--lyrics", default="", help="lyrics (empty: instrumental)")
    g.add_argument("--lyrics-file", help="read the lyrics from this text file (UTF-8; UTF-16 with a BOM and "
                   "Windows-1252 / Latin-1 are read with a note, as sidecars are)")
    g.add_argument("--seconds", type=float, default=30.0, help="duration in seconds (default: 30)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    g.add_argument("--bpm", help="tempo, e.g. 120")
    g.add_argument("--key", dest="keyscale", help='key and scale, e.g. "F# minor"')
    g.add_argument("--timesignature", help="time signature numerator, e.g. 4")
    g.add_argument("--language", help="lyrics language code (default: unknown / en by prompt style)")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default="acestep",
                   help="prompt template; use the one the adapter's dataset was preprocessed with (default: acestep)")
    s = p.add_argument_group("sampler (defaults: the model's recommendation)")
    s.add_argument("--steps", type=int, help="base/sft: sampling steps (turbo always uses its 8-step table)")
    s.add_argument("--shift", type=float, help="timestep shift (turbo: snapped to 1, 2 or 3)")
    s.add_argument("--guidance", type=float, help="base/sft: guidance scale (<= 1 turns CFG off)")
    s.add_argument("--guidance-mode", choices=("apg", "cfg"), default="apg", help="base/sft: APG (upstream) or CFG")
    s.add_argument("--cfg-interval", type=float, nargs=2, metavar=("START", "END"), default=(0.0, 1.0),
                   help="apply guidance only for t in [START, END] (default: 0 1)")
    s.add_argument("--noise", choices=("comfyui", "acestep"), default="comfyui",
                   help="noise from the seed as ComfyUI draws it (CPU, any device gives the same) or as upstream "
                   "ACE-Step does (generator on the device) (default: comfyui)")
    c = p.add_argument_group("comparison (every chosen checkpoint × every strength, one seed)")
    c.add_argument("--compare", action="store_true", default=comparing,
                   help=argparse.SUPPRESS if comparing else
                   "render each --checkpoints choice of the --adapter run at each --strengths value; --out is "
                   "then a folder")
    c.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.8, 1.0],
                   help="strengths to compare; 0 = the base model, rendered once (default: 0.5 0.8 1)")
    c.add_argument("--checkpoints", nargs="+", default=["all"], metavar="CHOICE",
                   help="which adapters of a training run: all (every checkpoint, then final, with EMA twins), "
                   "last N (the N newest), or a list of final, last, step_N, ema, step_N/ema (default: all)")
    p.add_argument("--out", required=True, help="output folder for the clips and the table" if comparing else
                   "output .flac file (a folder with --compare)")
    lm = p.add_argument_group("planner LM: audio codes first (ComfyUI's generate_audio_codes)")
    lm.add_argument("--lm", help="the 5 Hz planner LM (acestep-5Hz-lm-* folder or qwen_*_ace15.safetensors): it "
                    "writes the prompt's audio codes and the DiT renders on them; an adapter's planner-LM adapter "
                    "(a run's <folder>/lm) is applied to it at the adapter's strength")
    lm.add_argument("--lm-tokenizer", help="tokenizer folder for an LM file that carries none")
    lm.add_argument("--lm-cfg-scale", type=float, default=2.0, help="LM guidance (default: %(default)s)")
    lm.add_argument("--lm-temperature", type=float, default=0.85, help="LM temperature (default: %(default)s)")
    lm.add_argument("--lm-top-p", type=float, default=0.9, help="LM top-p (default: %(default)s)")
    lm.add_argument("--lm-top-k", type=int, default=0, help="LM top-k, 0 = off (default: %(default)s)")
    lm.add_argument("--lm-min-p", type=float, default=0.0, help="LM min-p (default: %(default)s)")
    p.add_argument("--vae", help="VAE to use instead of the one found beside the checkpoint")
    p.add_argument("--text-encoder", help="Qwen3-Embedding-0.6B folder or qwen_0.6b_ace15.safetensors")
    p.add_argument("--tokenizer", help="tokenizer folder (needed for ComfyUI files outside a ComfyUI installation)")
    p.add_argument("--variant", help="base variant when names do not tell (turbo, base, sft, xl-...)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="decoder precision (default: bf16 on CUDA, "
                   "fp32 on CPU)")
    add_plain(p)
    return p


def _prompt(args):
    from ..data.metadata import read_text_file
    from ..inference.generate import Prompt

    lyrics = args.lyrics
    if args.lyrics_file:
        notes: list[str] = []
        lyrics = read_text_file(Path(args.lyrics_file).expanduser(), notes)  # a MetadataError names the file
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return Prompt(caption=args.caption, lyrics=lyrics, seconds=args.seconds, seed=args.seed, bpm=args.bpm,
                  keyscale=args.keyscale, timesignature=args.timesignature, language=args.language).validate()


def _settings(args):
    from ..inference.generate import SamplerSettings

    return SamplerSettings(steps=args.steps, shift=args.shift, guidance=args.guidance,
                           cfg_interval=tuple(args.cfg_interval), guidance_mode=args.guidance_mode,
                           noise=args.noise)


def _code_sampling(args):
    from ..planner.write import CodeSampling

    return CodeSampling(cfg_scale=args.lm_cfg_scale, temperature=args.lm_temperature, top_p=args.lm_top_p,
                        top_k=args.lm_top_k, min_p=args.lm_min_p)


def _progress(plain: bool):
    state = {"bar": None}

    def cb(ev: dict) -> None:
        if ev.get("stage") != "sample" or plain:
            return
        from tqdm import tqdm

        if state["bar"] is None or ev["done"] == 1:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=ev["total"], unit="step", desc="sampling", leave=False, file=sys.stderr)
        state["bar"].update(ev["done"] - state["bar"].n)
        if ev["done"] == ev["total"]:
            state["bar"].close()
            state["bar"] = None

    return cb


def _plan(args):
    """Compare mode: the grid of the --adapter runs' chosen checkpoints × --strengths (no adapter: the base
    model alone)."""
    from ..inference.compare import Plan, make_plan, select_checkpoints

    adapters = args.adapter if isinstance(args.adapter, list) else [args.adapter] if args.adapter else []
    strengths = list(dict.fromkeys(float(s) for s in args.strengths))
    if not adapters:
        return Plan((), (0.0,))
    selection = " ".join(args.checkpoints)
    rows = [r for a in adapters for r in select_checkpoints(a, selection)]
    return make_plan(rows, strengths)


def _read_adapters(paths, lm: bool) -> list:
    """(path, AdapterWeights) of every DiT adapter the command will apply; with ``lm``, a run's folder holding only
    a planner-LM adapter is checked by the LM when it is applied."""
    from ..adapters import read_adapter_weights
    from ..planner.lm_adapter import has_dit_adapter
    from ..planner.write import lm_adapter_folder

    out = []
    for p in paths:
        if Path(p).is_dir() and lm_adapter_folder(p) is not None and not has_dit_adapter(Path(p)):
            if not lm:
                raise ValueError(f"{p}: holds a planner-LM adapter only; pass --lm (the planner LM) to hear it")
            continue
        out.append((p, read_adapter_weights(p)))
    return out


def run(args: argparse.Namespace) -> int:
    from ..adapters.choice import resolve_checkpoint
    from ..inference.generate import Generator, write_flac

    prompt = _prompt(args)
    settings = _settings(args)
    out = Path(args.out).expanduser()
    if args.compare and out.suffix.lower() == ".flac":
        raise ValueError(f"{out}: with --compare, --out is a folder")
    if not args.compare and out.suffix.lower() != ".flac":
        raise ValueError(f"{out}: the output must be a .flac file")
    plan = _plan(args) if args.compare else None
    paths = ([r.path for r in plan.rows] if plan is not None else
             [resolve_checkpoint(args.adapter, args.pick)] if args.adapter else [])
    adapters = _read_adapters(paths, bool(args.lm))  # a file that is no adapter is refused before the model loads
    t0 = time.perf_counter()
    gen = Generator.load(args.checkpoint, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                         variant=args.variant, device=args.device, dtype=args.dtype,
                         prompt_style=args.prompt_style, progress=_progress(bool(getattr(args, "plain", False))),
                         lm=args.lm, lm_tokenizer=args.lm_tokenizer, code_sampling=_code_sampling(args))
    resolved = gen.settings(settings)
    print(f"model: {gen.info.variant} ({resolved.describe(gen.turbo)}) on {gen.device}, loaded in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; audio codes from the {gen.planner.describe()}"
                                                 if gen.planner else ""), file=sys.stderr)
    for path, aw in adapters:
        trained_on = aw.metadata.get("sidestep_base_identity")  # the raw string: a hex id may look like a number
        if trained_on and trained_on != gen.info.identity:
            print(f"warning: {path} was trained on another model (identity {trained_on}; {args.checkpoint} is "
                  f"{gen.info.identity}); it fits this model's shapes but may not sound as trained",
                  file=sys.stderr)

    if not args.compare:
        if paths:
            gen.set_adapter(paths[0], args.strength)
            print(f"adapter: {paths[0]} at strength {args.strength:g}", file=sys.stderr)
        result = gen.generate(prompt, settings)
        write_flac(out, result.waveform, result.sample_rate)
        print(f"wrote {out} ({result.waveform.shape[-1] / result.sample_rate:.2f} s, 48 kHz stereo) in "
              f"{result.seconds_taken:.1f} s", file=sys.stderr)
        return 0
    return _compare(args, gen, prompt, settings, plan, out)


def _compare(args, gen, prompt, settings, plan, folder: Path) -> int:
    import io

    from ..fsutil import atomic_write_bytes, atomic_write_json
    from ..inference import compare as C
    from ..inference.generate import write_flac

    folder.mkdir(parents=True, exist_ok=True)
    resolved = gen.settings(settings)
    renders = plan.renders()
    runs = [r for r in dict.fromkeys(C.run_of(row.path) for row in plan.rows) if r is not None]
    frames = prompt.frames
    recorded = C.recorded_render_seconds(runs[0]) if runs else None
    steps = resolved.steps or 8
    each = C.estimate_seconds(recorded, steps, frames)
    print("cost: " + C.cost_line(len(renders), each, f"from the run's preview of step {recorded['step']}"
                                 if recorded else ""), file=sys.stderr)

    def before(i: int, row, strength: float) -> None:
        print(f"render {i + 1}/{len(renders)}: {C.cell_name(row, strength)}", file=sys.stderr)

    results = C.render(gen, prompt, plan, settings, before=before)
    files, rows = {}, []
    for i, (r, strength) in enumerate(renders):
        res = results[(r, strength)]
        path = folder / f"{i:02d}_{res.label}.flac"
        write_flac(path, res.waveform, res.sample_rate)
        files[(r, strength)] = path.name
        rows.append({"label": res.label, "row": None if r is None else plan.rows[r].label, "strength": strength,
                     "adapter": res.adapter, "file": path.name, "seconds_taken": round(res.seconds_taken, 3)})
    val = C.val_loss_at(runs[0]) if runs else {}
    table = C.table(plan, lambda r, c: f"[{files[plan.key(r, c)]}]({files[plan.key(r, c)]})", val=val)
    if (None, 0.0) in files:
        table += f"\n\nBase model (strength 0, no adapter): [{files[(None, 0.0)]}]({files[(None, 0.0)]})"
    header = (f"# Comparison\n\nPrompt: {prompt.caption!r}, seed {prompt.seed}, {prompt.seconds:g} s; "
              f"{resolved.describe(gen.turbo)}; model {gen.info.variant} ({args.checkpoint})"
              + (f"; audio codes written by the {gen.planner.describe()} with each row's LM adapter"
                 if gen.planner else "") + "\n\n")
    img = C.chart(runs[0] if runs else None, plan.rows,
                  title=f"{runs[0].name if runs else 'no training run'}: loss and the compared checkpoints")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(folder / "compare.png", buf.getvalue())
    atomic_write_bytes(folder / "compare.md", (header + table + "\n\n![loss](compare.png)\n").encode("utf-8"))
    atomic_write_json(folder / "compare.json", {
        "prompt": prompt.to_dict(), "settings": resolved.to_dict(), "checkpoint": str(args.checkpoint),
        "lm": str(gen.planner.path) if gen.planner else None,
        "strengths": list(plan.strengths),
        "rows": [{"label": r.label, "path": str(r.path), "step": r.step} for r in plan.rows],
        "grid": [[files[plan.key(r, c)] for c in range(len(plan.strengths))] for r in range(len(plan.rows))],
        "renders": rows})
    print(table)
    print(f"wrote {len(rows)} files, compare.md and compare.png to {folder}", file=sys.stderr)
    return 0
