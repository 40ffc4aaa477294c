"""``sidestep export``: write an adapter as one ``.safetensors`` file that stock ComfyUI loads exactly, as a PEFT
folder that upstream ACE-Step's own loader takes (``--format peft``), or as one file for diffusers' ACE-Step pipeline
(``--format diffusers``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ._progress import EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, add_plain, say

# Plain names here so that building the parser imports no torch (tests check they match the core's).
KEY_STYLES = ("comfy", "peft", "lycoris")
DTYPES = ("keep", "fp32", "bf16", "fp16")
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
VERIFY_TOLERANCE = 1e-4


def register(sub, name):
    p = sub.add_parser(
        name,
        help="write an adapter as one ComfyUI LoRA file, or as a PEFT folder for ACE-Step's own loader",
        description="Read an adapter — a PEFT folder (ACE-Step trainer, Side-Step, sidestep train), a LyCORIS "
        "file, or a ComfyUI-format file — and write one .safetensors that ComfyUI's LoraLoaderModelOnly applies "
        "to an ACE-Step 1.5 model at strength 1.0 exactly as trained: per-module alpha, DoRA converted to "
        "ComfyUI's dora_scale (exact for the base model it was trained on, which is therefore needed), OFT as "
        "LyCORIS oft_blocks. --format peft writes instead a PEFT folder that upstream ACE-Step's Gradio UI and "
        "API load (its LoRA path): LoRA/DoRA as they are, LoHA as PEFT LoHa, and OFT (and anything else) as an "
        "exact full-rank LoRA of its weight change — as large as the adapted weights, and for OFT exact only on "
        "the base model given. --format diffusers writes one file for diffusers' AceStepPipeline.load_lora_weights "
        "(diffusers' module names, scales folded into the weights, which is what that loader needs; OFT and "
        "non-PEFT DoRA as exact full-rank deltas on the base model given). With the base model at hand the "
        "written adapter is read back and its merged weights are compared with the adapter's. A run that also "
        "trained the planner LM (train_models both / lm) has its LM adapter in final/lm/ (a PEFT folder upstream "
        "loads as it is): it is exported beside the DiT's as <name>_lm.safetensors, for the LM of ComfyUI's "
        "ACE-Step text encoder (LoraLoader's CLIP side).",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("adapter", help="adapter folder (e.g. OUT/final) or file, or a training run folder (OUT)")
    p.add_argument("--pick", default="final", metavar="CHOICE",
                   help="which adapter of a training run: final, last, step_N, ema, step_N/ema or last/ema "
                   "(default: final)")
    p.add_argument("--format", choices=("comfyui", "peft", "diffusers"), default="comfyui",
                   help="comfyui: one .safetensors for ComfyUI's LoRA loaders; peft: a PEFT folder "
                   "(adapter_config.json + adapter_model.safetensors) for upstream ACE-Step; diffusers: one "
                   ".safetensors for diffusers' AceStepPipeline.load_lora_weights (default: %(default)s)")
    p.add_argument("--out", help="output file, or folder for --format peft (default: <adapter>_comfyui.safetensors, "
                   "<adapter>_peft/ or <adapter>_diffusers.safetensors beside the adapter)")
    p.add_argument("--checkpoint",
                   help="the base model the adapter was trained on; needed for DoRA and rescaled OFT (every OFT "
                   "with --format peft), and used to "
                   "check that the adapter fits and to verify the export (default: the run's "
                   "training_config.json, when it names an existing model)")
    p.add_argument("--key-style", choices=KEY_STYLES, default="comfy",
                   help="comfy: diffusion_model.decoder.<path>; peft: base_model.model.<path>; "
                   "lycoris: lycoris_<path>; all three load in ComfyUI >= 0.16 (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="dtype of the adapter tensors in the file; alpha and DoRA scales stay fp32 "
                        "(default: %(default)s)")
    p.add_argument("--no-overwrite", dest="overwrite", action="store_false", help="refuse to replace a file")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the written file back and comparing merged weights")
    p.add_argument("--variant", help="base variant when the checkpoint does not tell (turbo, base, sft, xl-*)")
    add_plain(p)
    return p


def find_run_checkpoint(adapter: Path) -> Optional[Path]:
    """The model named by the training run the adapter belongs to (``OUT/training_config.json``), if it exists."""
    start = adapter if adapter.is_dir() else adapter.parent
    for folder in [start, *start.parents][:4]:
        conf = folder / "training_config.json"
        if conf.is_file():
            try:
                data = json.loads(conf.read_text(encoding="utf-8"))
                path = Path(str(data.get("config", {}).get("checkpoint", ""))).expanduser()
            except (OSError, ValueError, AttributeError):
                return None
            return path if str(path) not in ("", ".") and path.exists() else None
    return None


def run(args) -> int:
    import torch

    from ..adapters import export_comfyui, read_adapter_weights
    from ..adapters.comfy_export import needs_base
    from ..adapters.diffusers_format import export_diffusers, read_diffusers
    from ..adapters.formats import default_output_path
    from ..adapters.upstream import export_peft
    from ..adapters.formats import read_adapter_weights as read_back
    from ..adapters.apply import merged_state

    from ..adapters.choice import resolve_checkpoint

    from ..planner.lm_adapter import LM_FOLDER, has_dit_adapter

    adapter_path = resolve_checkpoint(args.adapter, args.pick)
    lm_folder = adapter_path / LM_FOLDER if adapter_path.is_dir() and (adapter_path / LM_FOLDER).is_dir() else None
    if lm_folder is not None and not has_dit_adapter(adapter_path):  # a run that trained the planner LM only
        return _export_lm(args, lm_folder, Path(args.out).expanduser() if args.out else None)
    aw = read_adapter_weights(adapter_path)
    say(aw.summary())
    for note in aw.notes:
        say(f"note: {note}")
    peft, for_diffusers = args.format == "peft", args.format == "diffusers"
    suffix = {"comfyui": "_comfyui.safetensors", "peft": "_peft", "diffusers": "_diffusers.safetensors"}
    out = Path(args.out).expanduser() if args.out else default_output_path(adapter_path, suffix[args.format])
    if not peft and out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: exists (leave out --no-overwrite to replace it)")

    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else find_run_checkpoint(adapter_path)
    rescaled_oft = [n for n, m in aw.all_modules().items()
                    if m.kind == "oft" and ("rescale" in m.tensors or peft or for_diffusers)]
    base = identity = variant = None
    if checkpoint is not None:
        from ..model import load_acestep

        loaded = load_acestep(checkpoint, variant=args.variant, dtype=torch.float32,
                              parts={"decoder"} if not aw.outside else None)
        base, identity, variant = loaded.model, loaded.info.identity, loaded.info.variant
        aw.check_decoder(base.decoder)
        trained_on = aw.meta_value("sidestep_base_identity")
        if trained_on and trained_on != identity:
            say(f"warning: the adapter was trained on model {trained_on}, {checkpoint} is {identity}"
                + ("; DoRA magnitudes are converted for the model given" if needs_base(aw) else ""))
        say(f"base model: {checkpoint} ({variant}, identity {identity})")
    elif (needs_base(aw) and not for_diffusers) or rescaled_oft or (for_diffusers and any(
            m.dora_mode not in (None, "row_merged") for m in aw.modules.values())):
        # diffusers takes PEFT's own DoRA magnitudes; ComfyUI's dora_scale is relative to the base weights
        what = "OFT" if rescaled_oft and (peft or for_diffusers) else ("rescaled OFT" if rescaled_oft else "DoRA")
        target = {"comfyui": "ComfyUI", "peft": "PEFT", "diffusers": "diffusers"}[args.format]
        raise ValueError(f"{adapter_path}: exporting {what} for {target} needs the base model it was trained on; "
                         "pass --checkpoint")

    if (peft or for_diffusers) and (args.key_style != "comfy" or args.dtype != "keep"):
        raise ValueError("--key-style and --dtype apply to --format comfyui only")
    if for_diffusers:
        path, notes = export_diffusers(aw, out, base=base, base_identity=identity or "")
        written = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, for diffusers' AceStepPipeline)"
    elif peft:
        path, notes = export_peft(aw, out, base=base, base_identity=identity or "", base_variant=variant or "")
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        written = f"wrote {path}/ ({size / 2**20:.1f} MiB, PEFT folder for ACE-Step's own loader)"
    else:
        path, notes = export_comfyui(aw, out, base=base, base_identity=identity or "", base_variant=variant or "",
                                     key_style=args.key_style, dtype=None if args.dtype == "keep" else
                                     getattr(torch, _TORCH_DTYPE[args.dtype]))
        written = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, key style {args.key_style})"
    for note in notes:
        say(f"note: {note}")
    say(written)

    if args.verify and base is not None:
        back = read_diffusers(path) if for_diffusers else read_back(path)
        ours = merged_state(base, aw)
        theirs = merged_state(base, back)
        worst = max(float((theirs[n] - ours[n]).norm() / ours[n].norm().clamp_min(1e-12)) for n in ours)
        tolerance = VERIFY_TOLERANCE if args.dtype in ("keep", "fp32") else 1e-2
        say(f"verified: merged weights of the export vs the adapter, max relative difference {worst:.2e}")
        if worst > tolerance:
            say(f"error: the export differs from the adapter by more than {tolerance:g}")
            return EXIT_FAILED
    elif args.verify:
        say("not verified: no base model (pass --checkpoint to compare merged weights)")
    if lm_folder is not None:
        return _export_lm(args, lm_folder, path.with_name(f"{path.stem}_lm{path.suffix}"))
    return EXIT_OK


def _export_lm(args, folder: Path, out: Optional[Path]) -> int:
    """The planner LM's adapter: for ComfyUI one file on the text encoder's LM; for upstream the PEFT folder."""
    import shutil

    from ..planner.lm_adapter import export_lm_comfyui, read_lm_adapter

    if args.format == "peft":
        read_lm_adapter(folder)  # refuse anything that is not an LM adapter
        out = out or folder.parent.with_name(folder.parent.name + "_lm_peft")
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out}: exists (leave out --no-overwrite to replace it)")
        shutil.copytree(folder, out, dirs_exist_ok=True)
        say(f"wrote {out}/ (planner LM adapter, PEFT folder: PeftModel.from_pretrained(<the LM>, this folder))")
        return EXIT_OK
    import torch

    out = out or folder.parent.with_name(folder.parent.name + "_lm_comfyui.safetensors")
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: exists (leave out --no-overwrite to replace it)")
    path = export_lm_comfyui(folder, out, None if args.dtype == "keep" else getattr(torch, _TORCH_DTYPE[args.dtype]))
    say(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, planner LM adapter for ComfyUI's ACE-Step text "
        "encoder: LoraLoader's CLIP side, or Apply Adapter with a CLIP connected)")
    return EXIT_OK
