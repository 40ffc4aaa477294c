"""``sidestep train``: train an adapter on a preprocessed dataset.

Every option comes from ``TrainConfig`` (one per field). The first Ctrl-C asks the loop to stop: it saves a
checkpoint and the current adapter, then the command exits with 130; a second Ctrl-C aborts at once.
Multi-GPU: ``accelerate launch -m sidestep_core train …``.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..config import TrainConfig


def register(subparsers, name: str = "train") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="train an adapter (LoRA, DoRA, LoKR, LoHA, OFT) on a preprocessed dataset",
        description="Train an ACE-Step 1.5 adapter. Writes OUT/final/ (inference-ready adapter), "
        "OUT/checkpoints/step_N/ (adapter + training state), OUT/runs/ (TensorBoard), OUT/loss.csv and "
        "OUT/training_config.json. --resume auto continues an interrupted run exactly.",
    )
    TrainConfig.add_arguments(p)
    # Also accepted after the subcommand; SUPPRESS keeps a top-level `sidestep --plain train` intact.
    p.add_argument("--plain", action="store_true", default=argparse.SUPPRESS,
                   help="plain log lines instead of a progress bar")
    return p


class _Renderer:
    """Turns progress events into a tqdm bar (or plain lines)."""

    def __init__(self, plain: bool):
        self.plain = plain
        self.bar = None

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "log":
            self._print(ev["message"])
        elif kind == "step":
            if self.plain:
                if ev["step"] == 1 or ev["step"] % 10 == 0 or ev["step"] == ev["total"]:
                    self._print(_step_line(ev))
                return
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=ev["total"], initial=ev["step"] - 1, unit="step", dynamic_ncols=True,
                                file=sys.stderr)
            self.bar.update(ev["step"] - self.bar.n)
            self.bar.set_postfix_str(
                f"loss {ev['loss']:.4f} (avg {ev['smoothed_loss']:.4f}) lr {ev['lr']:.2e}", refresh=False
            )
        elif kind == "validation":
            self._print(f"step {ev['step']}: validation loss {ev['val_loss']:.5f}")
        elif kind == "checkpoint":
            self._print(f"step {ev['step']}: checkpoint saved to {ev['path']}")
        elif kind == "done":
            self.close()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _step_line(ev: dict) -> str:
    eta = ev.get("eta_s")
    sps = ev.get("steps_per_s")
    return (f"step {ev['step']}/{ev['total']} loss {ev['loss']:.5f} avg {ev['smoothed_loss']:.5f} "
            f"lr {ev['lr']:.3e} grad {ev['grad_norm']:.3g}"
            + (f" {sps:.2f} step/s" if sps else "") + (f" eta {eta:.0f}s" if eta is not None else ""))


def run(args: argparse.Namespace) -> int:
    from ..training import NonFiniteLossError, train

    cfg = TrainConfig.from_args(args)
    for name in ("checkpoint", "dataset", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name}: required")
    renderer = _Renderer(bool(getattr(args, "plain", False)))

    stop_requested = {"flag": False}

    def on_sigint(signum, frame) -> None:
        if stop_requested["flag"]:
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        stop_requested["flag"] = True
        renderer._print("stop requested: finishing this step and saving (Ctrl-C again to abort)")

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

