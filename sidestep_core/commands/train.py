"""``sidestep train``: train an adapter on a preprocessed dataset.

Every option comes from ``TrainConfig`` (one per field). The first Ctrl-C asks the loop to stop: it saves a
checkpoint and the current adapter, then the command exits with 130; a second Ctrl-C aborts at once.
Multi-GPU: ``accelerate launch -m sidestep_core train …``.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from ..config import REQUIRED_RUN_FIELDS, TrainConfig
from ._progress import EXIT_CODES_HELP, Renderer, add_plain


def register(subparsers, name: str = "train") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="train an adapter (LoRA, DoRA, LoKR, LoHA, OFT) on a preprocessed dataset",
        description="Train an ACE-Step 1.5 adapter. Writes OUT/final/ (inference-ready adapter), "
        "OUT/checkpoints/step_N/ (adapter + training state), OUT/runs/ (TensorBoard), OUT/loss.csv and "
        "OUT/training_config.json and OUT/loss.png. --resume auto continues an interrupted run exactly; see the "
        "README for what changed settings do on resume. One training at a time per OUT (the folder is locked).",
        epilog=EXIT_CODES_HELP,
    )
    src = p.add_argument_group("where settings come from (later ones win; options given here win over all)")
    src.add_argument("--preset", metavar="NAME", help="start from a preset (see `sidestep presets list`)")
    src.add_argument("--config", metavar="FILE",
                     help="JSON settings: a TrainConfig mapping, a run's training_config.json or a preset file")
    src.add_argument("--targets-from", metavar="FILE",
                     help="target modules and rank pattern from `sidestep estimate`")
    TrainConfig.add_arguments(p)
    add_plain(p)
    return p


class _Renderer(Renderer):
    """The shared progress bar, plus the training events worth a line of their own."""

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "step":
            eta = ev.get("eta_s") if self.plain else None  # the bar shows its own ETA: one is enough
            ev = {**ev, "extra": f"loss {ev['loss']:.4f} (avg {ev['smoothed_loss']:.4f}) lr {ev['lr']:.2e}"
                                 + (f" eta {_eta(eta)}" if eta is not None else "")}
        elif kind == "validation":
            self.write(f"step {ev['step']}: validation loss {ev['val_loss']:.5f}")
        elif kind == "checkpoint":
            self.write(f"step {ev['step']}: checkpoint saved to {ev['path']}")
        elif kind == "preview":
            self.write(f"step {ev['step']}: {len(ev['paths'])} preview(s) rendered in {ev['seconds']:.1f} s")
        super().__call__(ev)


def _eta(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig defaults < --preset < --config file < --targets-from < options given on the command line."""
    from ..estimate import load_targets
    from ..presets import compose_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if args.targets_from:
        targets = load_targets(args.targets_from)
        if given.get("adapter") == "oft":  # per-module ranks do not apply to OFT
            targets = {"target_modules": targets["target_modules"]}
        given = {**targets, **given}
    return compose_config(args.preset, args.config, given)


def run(args: argparse.Namespace) -> int:
    from ..training import NonFiniteLossError, train

    cfg = build_config(args)
    for name in REQUIRED_RUN_FIELDS:
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (give it here or in the --config file)")
    renderer = _Renderer(bool(getattr(args, "plain", False)), unit="step")

    stop_requested = {"flag": False}

    def on_sigint(signum, frame) -> None:
        if stop_requested["flag"]:
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        stop_requested["flag"] = True
        renderer.write("stop requested: finishing this step and saving (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(cfg, progress=renderer, should_stop=lambda: stop_requested["flag"])
    except NonFiniteLossError as exc:
        renderer.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        renderer.close()
    if not result.is_main:
        return 130 if result.status == "stopped" else 0
    if result.status == "stopped":
        print(f"stopped at step {result.step}; adapter: {result.final_dir}; resume with --resume auto",
              file=sys.stderr)
        return 130
    print(f"done: {result.step} steps; adapter: {result.final_dir}", file=sys.stderr)
    return 0

