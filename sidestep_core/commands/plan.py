"""``sidestep plan``: peak device memory of training, before anything is loaded.

The architecture comes from ``--checkpoint`` (its config.json or safetensors headers; no weights are read) or from
``--shape 2b|xl``; every training option is the same as ``sidestep train``'s. With ``--train-models lm|both`` the
planner LM (``--lm``, headers only) is planned too (``device/plan_lm.py``). Prints the plan beside the device's
free memory (or ``--free``), and the smallest change that fits when it does not (exit code 1). ``--table`` prints
every base precision, with and without offloading every layer; ``--tiers`` the least change of each ``vram_*`` preset
that fits its card, at the 2B and XL shapes (the README's table).
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import BASE_PRECISIONS, TrainConfig

SHAPES = ("2b", "xl")  # plain here so that building the parser imports no torch (a test checks they are the core's)


def register(subparsers, name: str = "plan") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="estimate the peak device memory of training from the checkpoint's shape, before loading anything",
        description="Estimate peak device memory for `sidestep train` with the same options: weights at the base "
        "precision, adapter and optimizer state, and a training step measured on fake tensors at the real shape, "
        "plus allocator slack on CUDA. Exit code 1 when it does not fit the free memory.",
    )
    src = p.add_argument_group("what to plan for")
    src.add_argument("--shape", choices=SHAPES, help="a released architecture instead of --checkpoint")
    src.add_argument("--free", type=float, metavar="GIB", help="free device memory in GiB (default: the device's)")
    src.add_argument("--cond-tokens", type=int,
                     help="condition length (default: the --dataset's longest, else 512); also the planner LM's "
                     "prompt when no --dataset gives its real one")
    src.add_argument("--table", action="store_true", help="every base precision, with and without full offload")
    src.add_argument("--tiers", action="store_true",
                     help="markdown table: the least change of each vram_* preset that fits its card, 2B and XL")
    src.add_argument("--preset", metavar="NAME", help="start from a preset (see `sidestep presets list`)")
    src.add_argument("--config", metavar="FILE", help="JSON settings, as for train")
    src.add_argument("--targets-from", metavar="FILE", help="targets and ranks from `sidestep estimate`")
    TrainConfig.add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..device import check_compute_precision
    from ..device import plan as P
    from ..device.shapes import real_shape
    from .train import build_config

    if args.tiers:
        print(tier_table(args.cond_tokens or P.CONDITION_TOKENS))
        return 0
    cfg = build_config(args).validate()
    if cfg.train_models == "lm":
        return run_lm_only(args, cfg)
    if args.shape:
        config = real_shape(args.shape)
    elif cfg.checkpoint:
        config = P.checkpoint_config(cfg.checkpoint)
    else:
        raise ValueError("plan: give --checkpoint or --shape")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cuda (planned)")
    free = int(args.free * P.GIB) if args.free else (
        P.free_memory(torch.device(cfg.device if cfg.device != "auto" else "cuda"))
        if torch.cuda.is_available() else None)
    target = "cpu" if device == "cpu" else "cuda"
    check_compute_precision(cfg.precision, target)
    what = args.shape or cfg.checkpoint
    frames, cond_tokens = P.dataset_shape(cfg)
    cond_tokens = args.cond_tokens or cond_tokens
    batch = f"the dataset's largest micro-batch: {frames / 25:g} s, " if cfg.dataset else ""
    print(f"plan for {what}: decoder {config.hidden_size} wide, {config.num_hidden_layers} layers; {cfg.adapter} "
          f"r{cfg.rank}, {cfg.optimizer}, crop {cfg.crop_seconds:g} s, batch {cfg.batch_size}, checkpointing "
          f"{'on' if cfg.gradient_checkpointing else 'off'}, fused backward {'on' if cfg.fused_backward else 'off'}, "
          f"{batch}{cond_tokens} condition tokens, {cfg.precision} compute; device {device}"
          + (f", {P.size(free)} free" if free is not None else ""))
    cache: dict = {}
    shape = {"frames": frames, "cond_tokens": cond_tokens}

    def plan_of(bp: str, off: int):
        return P.estimate_cached(config, cfg, bp, off, target, cache, **shape)

    if args.table:
        grads = ("only those of the layer backward is in are alive at once (fused backward)" if cfg.fused_backward
                 else "all of them are alive at the end of backward")
        print(f"adapter: {plan_of(cfg.base_precision, 0).trainable_params / 1e6:.1f} M trainable parameters, 4 B "
              f"each (fp32) + {P.OPTIMIZER_BYTES.get(cfg.optimizer, 8):.3g} B of {cfg.optimizer} state; their fp32 "
              f"gradients are part of 'step': {grads}. 'peak' is what torch.cuda.max_memory_allocated would "
              "report; '+ slack' is what must be free on CUDA.")
        plans = [plan_of(bp, off) for bp in BASE_PRECISIONS for off in (0, config.num_hidden_layers)]
        width = max(len(p.label) for p in plans) + 2
        print(f"{'settings':<{width}}{'weights':>11}{'adapter+opt':>13}{'step':>11}{'peak':>11}{'+ slack':>11}")
        for plan in plans:
            print(f"{plan.label:<{width}}{P.size(plan.weights):>11}{P.size(plan.adapter):>13}"
                  f"{P.size(plan.step):>11}{P.size(plan.peak):>11}{P.size(plan.needed):>11}")
        return 0

    plan = plan_of(cfg.base_precision, P._offload_number(cfg))
    plan.free = free
    print("plan: " + plan.describe())
    if cfg.trains_lm:
        return _with_lm(cfg, config, plan, free, target, cache, shape)
    if plan.fits is False:
        better = P.smallest_fit(config, cfg, free, target, cache=cache, **shape)
        print("does not fit; " + (f"smallest change that fits: {better.describe()}" if better else
                                   "nothing fits: lower crop_seconds, batch_size or rank"))
        return 1
    return 0


def _lm_plan(cfg: TrainConfig, prompt_tokens: int):
    """The planner LM's plan; ``prompt_tokens`` stands for its prompt when no dataset gives the real ones."""
    from ..device import plan_lm

    cfg.check_lm()
    lm = plan_lm.plan_for_run(cfg, prompt_tokens)
    s = lm.settings
    where = "the dataset's longest training sequence" if cfg.dataset else "assumed"
    print(f"planner LM {cfg.lm}: LoRA r{cfg.lm_rank}{' + MLP' if cfg.lm_target_mlp else ''}, loss on "
          f"{cfg.lm_loss} ({s['labelled']} tokens), songs of {s['frames'] / 25:g} s ({where}; the LM trains on whole "
          f"songs), {s['prompt_tokens']} prompt tokens")
    return lm


def _with_lm(cfg: TrainConfig, config, dit, free, target: str, cache: dict, shape: dict) -> int:
    """``train_models`` both: the LM's share and the joint run's peak against the free memory."""
    from ..device import plan as P

    lm = _lm_plan(cfg, shape["cond_tokens"])
    print("      " + lm.describe())
    joint = dataclasses.replace(dit, lm=lm)
    print(f"both: {P.size(joint.needed)} (peak {P.size(joint.peak)}: both models' weights and adapters, and the larger "
          "of the LM's step and the DiT's step beside the LM's gradients)" + (f"; {P.size(free)} free" if free else ""))
    if joint.fits is False:
        better = P.smallest_fit(config, cfg, free, target, cache=cache, lm=lm, **shape)
        print("does not fit; " + (f"smallest change of the DiT's settings that fits: {better.describe()}" if better
                                   else f"no DiT setting fits beside the LM: {P.LM_CHANGES}, or train the LM in its "
                                   "own run"))
        return 1
    return 0


def run_lm_only(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """``train_models`` lm: the DiT is not loaded at all; only the planner LM is planned."""
    import torch

    from ..device import plan as P
    from ..device.plan_lm import lm_needed

    target = "cpu" if cfg.device == "cpu" else "cuda"
    free = int(args.free * P.GIB) if args.free else (
        P.free_memory(torch.device(cfg.device if cfg.device != "auto" else "cuda"))
        if torch.cuda.is_available() else None)
    lm = _lm_plan(cfg, args.cond_tokens or P.CONDITION_TOKENS)
    needed = lm_needed(lm, target)
    print(f"plan: {lm.describe()}; needed {P.size(needed)}" + (f", {P.size(free)} free" if free else ""))
    if free is not None and needed > free:
        print(f"does not fit; {P.LM_CHANGES}")
        return 1
    return 0


def tier_table(cond_tokens: int) -> str:
    """Each ``vram_*`` preset on its card at the 2B and XL shapes: its own settings when they fit, else the least
    change that does (the plan's ``needed``: peak + CUDA slack)."""
    from .. import presets
    from ..device import plan as P
    from ..device.shapes import real_shape

    rows = ["| card | preset | 2B | XL |", "|---|---|---|---|"]
    for name, gib in presets.VRAM_TIERS.items():
        cfg = presets.load_preset(name)
        cells = []
        for shape in SHAPES:
            plan = P.fit_on_card(real_shape(shape), cfg, gib, cache={}, cond_tokens=cond_tokens)
            cells.append(f"{plan.label}: {P.size(plan.needed)}" if plan else "does not fit")
        rows.append(f"| {gib} GB | `{name}` | {' | '.join(cells)} |")
    return "\n".join(rows)
