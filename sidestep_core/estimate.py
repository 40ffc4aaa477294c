"""Gradient estimation: which decoder projections matter most for a dataset, and a rank pattern to train with.

For every adapter target (``layers.{i}.{self_attn|cross_attn}.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``)
the score is the mean squared gradient of the training objective with respect to the module's weight — the
diagonal of the empirical Fisher information, averaged over its parameters:

    score(module) = Σ_batches Σ_params (∂L/∂w)² / (batches · numel)

with L the flow-matching MSE the trainer uses, but with no adapter and no CFG dropout. Gradients are taken one group
(self-attention, cross-attention, MLP) at a time, so only one group's gradients exist at once; every group sees the
same batches, timesteps and noise, so scores compare across groups. ``runs`` independent passes (different clips,
crops, timesteps and noise) give the spread (standard deviation across runs) of each score.

The output JSON ranks the modules and holds ``train_settings`` — ``target_modules``, ``rank_pattern`` and
``alpha_pattern`` — that ``TrainConfig.from_dict`` accepts as they are (``sidestep train --targets-from FILE``).
Ranks follow ``base_rank · sqrt(score / median score of the selected modules)``, rounded to a multiple of 4 and
clamped to [rank_min, rank_max]; alpha = alpha_ratio · rank keeps the scale alpha/rank constant.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import __version__
from .fsutil import atomic_write_json

if TYPE_CHECKING:
    import torch

FORMAT = "sidestep-estimate"
FORMAT_VERSION = 1
GROUPS = ("self_attn", "cross_attn", "mlp")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
FOCUS_RANGES = {"texture": (0.0, 0.4), "structure": (0.6, 1.0)}  # t = 1 is pure noise
FOCUSES = ("balanced", "texture", "structure")

Progress = Callable[[dict], None]


@dataclass
class EstimateSettings:
    batches: int = 8  # batches per run
    runs: int = 2
    focus: str = "balanced"  # balanced | texture | structure | "lo,hi"
    top_k: Optional[int] = None  # modules suggested for training (None: half of them, every group represented)
    seed: int = 0
    crop_seconds: float = 30.0
    base_rank: int = 64
    rank_min: int = 16
    rank_max: int = 128
    alpha_ratio: float = 2.0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp32
    gradient_checkpointing: bool = True
    groups: tuple = GROUPS  # module groups to score: any of self_attn, cross_attn, mlp

    def validate(self) -> "EstimateSettings":
        for name in ("batches", "runs", "base_rank", "rank_min", "rank_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1 (got {v!r})")
        if self.rank_min > self.rank_max:
            raise ValueError(f"rank_min: {self.rank_min} is larger than rank_max {self.rank_max}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: must be an integer >= 1 (got {self.top_k!r})")
        if not (isinstance(self.alpha_ratio, (int, float)) and self.alpha_ratio > 0):
            raise ValueError(f"alpha_ratio: must be a number > 0 (got {self.alpha_ratio!r})")
        if self.crop_seconds < 0:
            raise ValueError(f"crop_seconds: must be >= 0 (got {self.crop_seconds!r})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: must be auto, bf16 or fp32 (got {self.precision!r})")
        timestep_range(self.focus)
        self.groups = tuple(self.groups)
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise ValueError(f"groups: choose from {', '.join(GROUPS)} "
                             f"(got {', '.join(map(str, self.groups)) or 'none'})")
        return self


@dataclass
class EstimateResult:
    """The ranking as JSON-ready ``data`` plus shortcuts for callers (CLI, nodes)."""

    data: dict

    @property
    def targets(self) -> list[str]:
        return list(self.data["train_settings"]["target_modules"])

    @property
    def rank_pattern(self) -> dict[str, int]:
        return dict(self.data["train_settings"]["rank_pattern"])

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return dict(self.data["train_settings"]["alpha_pattern"])

    @property
    def train_settings(self) -> dict[str, Any]:
        return dict(self.data["train_settings"])

    @property
    def scores(self) -> list[tuple[str, float]]:
        return [(r["module"], r["score"]) for r in self.data["modules"]]

    @property
    def text(self) -> str:
        return format_table(self.data)

    def save(self, path: str | Path) -> Path:
        return write_result(self.data, path)


def timestep_range(focus: str) -> Optional[tuple[float, float]]:
    """None for ``balanced`` (the model's own distribution), else the uniform range of t."""
    if focus == "balanced":
        return None
    if focus in FOCUS_RANGES:
        return FOCUS_RANGES[focus]
    m = re.fullmatch(r"\s*([0-9.]+)\s*,\s*([0-9.]+)\s*", str(focus))
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        if 0 <= lo < hi <= 1:
            return lo, hi
    raise ValueError(f"focus: must be balanced, texture, structure or 'lo,hi' with 0 <= lo < hi <= 1 "
                     f"(got {focus!r})")


def candidate_modules(decoder: torch.nn.Module) -> dict[str, str]:
    """Adapter targets of the decoder -> their group, in module order."""
    import torch

    out = {}
    for name, mod in decoder.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not name.startswith("layers."):
            continue
        parts = name.split(".")
        if len(parts) == 4 and parts[2] in ("self_attn", "cross_attn") and parts[3] in ATTN_PROJ:
            out[name] = parts[2]
        elif len(parts) == 4 and parts[2] == "mlp" and parts[3] in MLP_PROJ:
            out[name] = "mlp"
    return out


def _seed(*key: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])


def _plan_batches(frames: list[int], crop: int, settings: EstimateSettings, run: int) -> list[tuple[int, int, int]]:
    """(clip, start, length) for each batch of a run: a seeded shuffle of the clips, cycled, with random crops."""
    import numpy as np

    rng = np.random.default_rng(_seed(settings.seed, 1, run))
    order: list[int] = []
    while len(order) < settings.batches:
        order.extend(int(i) for i in rng.permutation(len(frames)))
    plan = []
    for clip in order[: settings.batches]:
        t = frames[clip]
        length = t if crop <= 0 or t <= crop else crop
        start = int(rng.integers(0, t - length + 1))
        plan.append((clip, start, length))
    return plan


def _sample_t(n: int, settings: EstimateSettings, mu: float, sigma: float, g: torch.Generator) -> torch.Tensor:
    import torch

    from .training.objective import sample_timesteps

    rng = timestep_range(settings.focus)
    if rng is None:
        return sample_timesteps(n, "continuous", mu, sigma, g)
    lo, hi = rng
    return lo + (hi - lo) * torch.rand(n, generator=g)


def estimate(
    checkpoint: str | Path,
    dataset: str | Path,
    settings: Optional[EstimateSettings] = None,
    *,
    progress: Optional[Progress] = None,
    base_variant: Optional[str] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **overrides: Any,
) -> EstimateResult:
    """Run the estimation (see the module docstring). ``overrides`` set :class:`EstimateSettings` fields
    (``batches=4, focus="texture", top_k=16, device="cuda"`` …); ``variant`` is accepted for ``base_variant``.
    ``should_stop()`` is polled before every batch; returning True raises ``KeyboardInterrupt``."""
    import dataclasses

    import numpy as np
    import torch

    if "variant" in overrides:
        base_variant = overrides.pop("variant") or base_variant
    names = {f.name for f in dataclasses.fields(EstimateSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"estimate() got unknown setting(s): {', '.join(unknown)}")
    settings = dataclasses.replace(settings or EstimateSettings(), **overrides)
    from .model import load_acestep
    from .training.data import FRAMES_PER_SECOND, Item, load_batch, open_dataset
    from .training.objective import masked_mse, noisy_input

    s = (settings or EstimateSettings()).validate()
    emit = progress or (lambda ev: None)
    t0 = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
    precision = s.precision if s.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    loaded = load_acestep(checkpoint, variant=base_variant, dtype=dtype, device=device,
                          parts={"decoder", "null_condition_emb"})
    decoder = loaded.model.decoder
    decoder.requires_grad_(False)
    decoder.checkpoint_ratio = 1.0 if s.gradient_checkpointing else 0.0
    decoder.train()  # no dropout in the DiT; train mode only switches activation checkpointing on
    modules = {n: g for n, g in candidate_modules(decoder).items() if g in s.groups}
    if not modules:
        raise ValueError(f"{checkpoint}: the decoder has no adaptable projections")
    data = open_dataset(dataset)
    for note in data.skipped_notes():
        emit({"event": "log", "message": note, "level": "warning"})
    frames = [c.frames for c in data.clips]
    crop = int(round(s.crop_seconds * FRAMES_PER_SECOND))
    mu, sigma = loaded.info.timestep_mu, loaded.info.timestep_sigma
    plans = [_plan_batches(frames, crop, s, r) for r in range(s.runs)]

    weights = {name: decoder.get_submodule(name).weight for name in modules}
    sums = {name: torch.zeros(s.runs, dtype=torch.float64) for name in modules}
    total = len(s.groups) * s.runs * s.batches
    done = 0
    emit({"event": "plan", "modules": len(modules), "groups": list(s.groups), "runs": s.runs, "batches": s.batches,
          "total": total, "device": str(device), "precision": precision, "clips": len(data)})
    stopped = False
    for group in s.groups:
        members = [n for n, g in modules.items() if g == group]
        if not members:
            done += s.runs * s.batches
            continue
        for n in members:
            weights[n].requires_grad_(True)
        for run in range(s.runs):
            for b, (clip, start, length) in enumerate(plans[run]):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                batch = load_batch(data, [Item(clip, start, length)]).to(device)
                g = torch.Generator().manual_seed(_seed(s.seed, 2, run, b))
                t = _sample_t(1, s, mu, sigma, g)
                noise = torch.randn(batch.target_latents.shape, generator=g)
                t_model = t.to(dtype)
                x_t, target = noisy_input(batch.target_latents.float(), noise.to(device), t_model.float().to(device))
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    pred = decoder(hidden_states=x_t, timestep=t_model.to(device), timestep_r=t_model.to(device),
                                   encoder_hidden_states=batch.encoder_hidden_states,
                                   context_latents=batch.context_latents)
                loss = masked_mse(pred, target, batch.frame_mask)
                if not torch.isfinite(loss):
                    raise ValueError(f"{checkpoint}: the loss is not finite on clip {data.clips[clip].name}")
                loss.backward()
                for n in members:
                    w = weights[n]
                    sums[n][run] += float(w.grad.float().square().sum())
                    w.grad = None
                done += 1
                emit({"event": "step", "step": done, "total": total, "group": group, "run": run + 1,
                      "loss": float(loss.detach())})
            if stopped:
                break
        for n in members:
            weights[n].requires_grad_(False)
            weights[n].grad = None
        if stopped:
            break
    if stopped:
        raise KeyboardInterrupt("estimation stopped")

    rows = []
    for name, group in modules.items():
        numel = weights[name].numel()
        per_run = (sums[name] / (numel * s.batches)).tolist()
        mean = float(np.mean(per_run))
        spread = float(np.std(per_run, ddof=1)) if s.runs > 1 else 0.0
        rows.append({"module": name, "group": group, "score": mean, "spread": spread, "runs": per_run})
    rows.sort(key=lambda r: (-r["score"], list(modules).index(r["module"])))
    for i, r in enumerate(rows):
        r["rank"] = i + 1

    chosen = select_modules(rows, s.top_k)
    pattern = rank_pattern(rows, chosen, s)
    for r in rows:
        r["suggested_rank"] = pattern.get(r["module"])
    result = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sidestep_version": __version__,
        "checkpoint": {"path": str(checkpoint), "variant": loaded.info.variant, "identity": loaded.info.identity},
        "dataset": {"path": str(dataset), "clips": len(data)},
        "settings": {"batches": s.batches, "runs": s.runs, "focus": s.focus,
                     "timestep_range": timestep_range(s.focus), "timestep_mu": mu, "timestep_sigma": sigma,
                     "seed": s.seed, "crop_seconds": s.crop_seconds, "precision": precision,
                     "base_rank": s.base_rank, "rank_min": s.rank_min, "rank_max": s.rank_max,
                     "alpha_ratio": s.alpha_ratio, "groups": list(s.groups)},
        "score": "mean squared gradient of the flow-matching loss per weight (no adapter, no CFG dropout)",
        "modules": rows,
        "train_settings": train_settings(chosen, pattern, s.alpha_ratio),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    emit({"event": "done", "elapsed_s": result["elapsed_s"]})
    return EstimateResult(result)


def select_modules(rows: list[dict], top_k: Optional[int]) -> list[str]:
    """The ``top_k`` highest-scoring modules (default: half of them), with at least one module of every group
    (and a tenth of its modules when the group is large) so no projection kind disappears entirely."""
    n = len(rows)
    k = min(n, top_k if top_k is not None else max(1, math.ceil(n / 2)))
    chosen = [r["module"] for r in rows[:k]]
    if top_k is None:
        for group in GROUPS:
            members = [r for r in rows if r["group"] == group]
            need = max(1, math.ceil(0.1 * len(members))) if members else 0
            have = sum(1 for r in members if r["module"] in chosen)
            for r in members:
                if have >= need:
                    break
                if r["module"] not in chosen:
                    chosen.append(r["module"])
                    have += 1
    order = {r["module"]: i for i, r in enumerate(rows)}
    return sorted(chosen, key=order.__getitem__)


def _round4(x: float) -> int:
    return max(4, int(round(x / 4.0)) * 4)


def rank_pattern(rows: list[dict], chosen: list[str], s: EstimateSettings) -> dict[str, int]:
    import numpy as np

    scores = {r["module"]: r["score"] for r in rows}
    positive = [scores[m] for m in chosen if scores[m] > 0]
    median = float(np.median(positive)) if positive else 0.0
    out = {}
    for m in chosen:
        ratio = scores[m] / median if median > 0 else 1.0
        out[m] = int(min(s.rank_max, max(s.rank_min, _round4(s.base_rank * math.sqrt(ratio)))))
    return out


def train_settings(chosen: list[str], pattern: dict[str, int], alpha_ratio: float) -> dict[str, Any]:
    """``TrainConfig`` keys: exact target names and per-module rank / alpha (keys are escaped regexes, as PEFT and
    the LyCORIS injection match them)."""
    return {
        "target_modules": list(chosen),
        "rank_pattern": {re.escape(m): r for m, r in pattern.items()},
        "alpha_pattern": {re.escape(m): float(alpha_ratio * r) for m, r in pattern.items()},
    }


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path).expanduser()
    atomic_write_json(path, result)
    return path


def load_targets(path: str | Path) -> dict[str, Any]:
    """The ``train_settings`` of an estimation file (``--targets-from``), checked; a plain JSON object holding
    ``target_modules`` / ``rank_pattern`` / ``alpha_pattern`` is accepted too."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    settings = data.get("train_settings", data)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: 'train_settings' must be an object")
    allowed = {"target_modules", "rank_pattern", "alpha_pattern"}
    out = {k: settings[k] for k in allowed if k in settings}
    if not out.get("target_modules"):
        raise ValueError(f"{path}: holds no target_modules (is it an estimation result?)")
    if not isinstance(out["target_modules"], list) or not all(isinstance(x, str) for x in out["target_modules"]):
        raise ValueError(f"{path}: target_modules must be a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        value = out.get(key, {})
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()):
            raise ValueError(f"{path}: {key} must map module patterns to positive numbers")
    return out


def format_table(result: dict, limit: int = 20) -> str:
    """A short human-readable ranking."""
    rows = result["modules"]
    chosen = set(result["train_settings"]["target_modules"])
    lines = [f"{'#':>3}  {'module':<28} {'score':>11} {'spread':>10}  rank"]
    for r in rows[:limit]:
        mark = str(r["suggested_rank"]) if r["module"] in chosen else "-"
        lines.append(f"{r['rank']:>3}  {r['module']:<28} {r['score']:>11.4e} {r['spread']:>10.2e}  {mark}")
    if len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more in the JSON")
    return "\n".join(lines)
