"""Progress rendering shared by the commands: a tqdm bar on stderr, or plain lines with ``--plain`` or when stderr
is not a terminal (a log file, a pipe, CI). Events are the core's ``progress(event)`` dicts; ``step`` events carry
``step`` and ``total``, ``log`` events a ``message``."""

from __future__ import annotations

import sys
from typing import Optional

# Exit codes of the commands (cli.py maps ValueError to 2 and KeyboardInterrupt to 130 as well).
EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (diverging loss, a check that did not pass)
EXIT_USAGE = 2  # bad options, files or settings
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = ("exit codes: 0 done; 1 the work failed (e.g. a verification did not pass); "
                   "2 bad options, files or settings; 130 interrupted")


def add_plain(parser) -> None:
    import argparse

    parser.add_argument("--plain", action="store_true", default=argparse.SUPPRESS,
                        help="plain log lines instead of progress bars")


class Renderer:
    def __init__(self, plain: bool, label: str = "", unit: str = "batch", every: int = 10):
        self.plain = plain or not _is_terminal(sys.stderr)
        self.label = label
        self.unit = unit
        self.every = every
        self.bar = None

    def __call__(self, ev: dict) -> None:
        if "event" not in ev and "stage" in ev:  # preprocessing's {"stage", "done", "total"} events
            if ev["stage"] == "done":  # the closing summary is printed by the command
                self.close()
                return
            if "done" not in ev:
                if ev.get("message"):
                    self.write(f"{ev['stage']}: {ev.get('current', '')}: {ev['message']}")
                return
            if ev["stage"] != getattr(self, "_stage", None):
                self.close()
                self._stage = ev["stage"]
                self.label = ev["stage"]
            if int(ev["total"]) > 0 and int(ev["done"]) > 0:
                self({"event": "step", "step": int(ev["done"]), "total": int(ev["total"])})
                if int(ev["done"]) >= int(ev["total"]):
                    self.close()  # a finished stage's clock stops here, not when the next stage starts
            return
        kind = ev.get("event")
        if kind == "log":
            self.write(str(ev.get("message", "")))
        elif kind == "step":
            step, total = int(ev["step"]), int(ev["total"])
            extra = _postfix(ev)
            if self.plain:
                if step == 1 or step % self.every == 0 or step == total:
                    self.write(f"{self.label}{' ' if self.label else ''}{step}/{total}"
                               + (f" {extra}" if extra else ""))
                return
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=step - 1, unit=self.unit, desc=self.label or None,
                                dynamic_ncols=True, file=sys.stderr)
            if extra:  # before update(), which redraws: the bar shows this step's values, not the last one's
                self.bar.set_postfix_str(extra, refresh=False)
            self.bar.update(step - self.bar.n)
        elif kind == "done":
            self.close()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _postfix(ev: dict) -> str:
    if "extra" in ev:
        return str(ev["extra"])
    parts = []
    if "group" in ev:
        parts.append(str(ev["group"]))
    if "run" in ev:
        parts.append(f"run {ev['run']}")
    if "loss" in ev and ev["loss"] is not None:
        parts.append(f"loss {float(ev['loss']):.4f}")
    return " ".join(parts)


def is_plain(args) -> bool:
    return bool(getattr(args, "plain", False))


def say(text: str, file: Optional[object] = None) -> None:
    print(text, file=file or sys.stdout, flush=True)
