"""The training loop: ``train(config, …) -> TrainResult``.

Setup: load only the decoder and ``null_condition_emb`` (conditions come from the cache), freeze it in the chosen
precision, add the adapter (fp32), build optimizer and schedule, resume if asked, print a plan from a measured
warm-up, then train. Randomness per micro-batch (t, CFG drop, noise) comes from a generator seeded with
(seed, rank, step, micro-batch) and the data order from (seed, epoch), so a resumed run repeats the uninterrupted
one; the global RNG (adapter dropout) is saved and restored with every checkpoint.

``train_models`` lm / both add the planner LM's LoRA (:mod:`sidestep_core.planner.training`): it trains on the same
micro-batches (the clips, uncropped) with its own optimizer and clipping on the same schedule, and is saved as
``lm/`` in every checkpoint and in ``final/``. With ``lm`` alone the DiT is not loaded at all.

Multi-GPU: ``accelerate launch -m sidestep_core train …``; each rank trains on its share of every epoch's
batches, DDP averages the gradients, and only rank 0 writes files, logs and reports progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import LOG_SHOWN, __version__
from ..config import TrainConfig
from ..fsutil import RunLock, atomic_write_json, clean_stale_temps
from . import state as st
from .adapters import Adapter, AdapterMismatchError, inject_adapter, load_adapter_weights, metadata_json, \
    unapplied_dropout
from .data import FRAMES_PER_SECOND, LatentDataset, load_batch, open_dataset, plan_epoch, split_validation, \
    validation_items
from .ema import EMA
from .fused import FusedBackward
from .logs import CsvLog, LossSmoother, Speed, TensorBoard
from .objective import Objective
from .prefetch import Prefetcher
from .optim import build_optimizer, build_scheduler, continue_at, extend_schedule, new_schedule

log = logging.getLogger("sidestep.train")

Progress = Callable[[dict], None]
StepHook = Callable[[int, Adapter], None]  # (step, live adapter); see train()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or the gradient norm) became NaN or infinite."""


@dataclass
class TrainResult:
    status: str  # "complete" or "stopped"
    step: int
    total_steps: int
    out_dir: Path
    final_dir: Optional[Path]
    checkpoint: Optional[Path]
    loss: Optional[float] = None
    smoothed_loss: Optional[float] = None
    val_loss: Optional[float] = None
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run only
    interrupted: bool = False  # stopped by KeyboardInterrupt rather than a stop request
    is_main: bool = True  # False on the other ranks of a multi-process run (they write nothing)


# ----------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------


class Dist:
    """Single process (plain torch) or data parallel through accelerate when launched with several processes."""

    def __init__(self, device: str):
        self.acc = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device == "cpu")
            self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        else:
            self.rank, self.world = 0, 1
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.acc.prepare_model(module) if self.acc else module

    def no_sync(self, module):
        return self.acc.no_sync(module) if self.acc else contextlib.nullcontext()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.acc:
            return x
        return self.acc.reduce(x.to(self.device), reduction="mean")

    def any(self, flag: bool) -> bool:
        if not self.acc:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def gather(self, obj: Any) -> list:
        if not self.acc:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def close(self) -> None:
        """Destroy the process group before the process exits: left to interpreter shutdown, its gloo threads can
        abort a finished process ("terminate called without an active exception")."""
        if self.acc and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _seed_for(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    checkpoint_path: Optional[str | Path] = None,
    dataset_path: Optional[str | Path] = None,
    out_dir: Optional[str | Path] = None,
    progress: Optional[Progress] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    step_hook: Optional[StepHook] = None,
) -> TrainResult:
    """Train an adapter; see the module docstring. Path arguments override the config's run fields.

    ``progress(event)`` receives dicts with ``event`` in plan | step | validation | checkpoint | log | done (rank 0
    only). ``should_stop()`` is polled after every optimizer step; returning True saves a checkpoint and the current
    adapter (``final/``) and returns a result with ``status == "stopped"``. Raises ``ValueError`` for bad settings or
    files, ``NonFiniteLossError`` when the loss diverges (nothing is saved then; earlier checkpoints stay).

    ``step_hook(step, adapter)`` (rank 0 only) is called after every optimizer step, after the checkpoint of that
    step is saved, with the live :class:`~sidestep_core.training.adapters.Adapter` (``adapter.module`` is the
    unwrapped module; ``adapter.comfyui_state_dict()`` gives detached CPU copies of its weights; ``adapter.lm`` is
    the planner LM's adapter in a run that trains both). It runs inside
    :class:`sidestep_core.inference.previews.Isolated`: eval mode, no grad, and every global RNG restored after, so
    a hook that renders (and draws random numbers) leaves training exactly as it would be without it. The hook
    decides itself at which steps to do work; exceptions it raises propagate.
    """
    overrides = {k: str(v) for k, v in (("checkpoint", checkpoint_path), ("dataset", dataset_path),
                                          ("out", out_dir)) if v is not None}
    cfg = config.replace(**overrides).validate()
    for name in ("checkpoint", "dataset", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"{name}: required")
    cfg.check_lm()
    trainer = _Trainer(cfg, progress, should_stop, step_hook)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()


class _Trainer:
    def __init__(self, cfg: TrainConfig, progress: Optional[Progress], should_stop: Optional[Callable[[], bool]],
                 step_hook: Optional[StepHook] = None):
        self.cfg = cfg
        self._progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.step_hook = step_hook
        self.out = Path(cfg.out).expanduser()
        self.dist = Dist(cfg.device)
        self.device = self.dist.device

    # ----- reporting -----
    def emit(self, event: str, **data) -> None:
        if self.dist.main and self._progress is not None:
            self._progress({"event": event, **data})

    def say(self, message: str, level: int = logging.INFO) -> None:
        if self.dist.main:
            # marked when the progress callback shows it too, so the CLI's log handler does not print it twice
            log.log(level, message, extra={LOG_SHOWN: self._progress is not None})
            self.emit("log", message=message, level=logging.getLevelName(level).lower())

    # ----- setup -----
    def setup(self) -> None:
        from ..device import check_compute_precision

        cfg = self.cfg
        self.dtype = DTYPES[cfg.precision]
        check_compute_precision(cfg.precision, self.device.type)
        if cfg.trains_lm and cfg.precision == "fp16":
            raise ValueError("precision: training the planner LM needs bf16 or fp32 (fp16 would need loss scaling)")
        if cfg.trains_lm and self.dist.world > 1:
            raise ValueError("train_models: the planner LM trains in a single process; launch without accelerate")
        if cfg.fused_backward and self.dist.world > 1:
            raise ValueError("fused_backward: several processes average their gradients after backward, so a "
                             "tensor cannot be updated as its gradient arrives; launch one process")
        self._check_out_dir()

        self.dataset = open_dataset(cfg.dataset)
        for note in self.dataset.skipped_notes():
            self.say(note, logging.WARNING)
        self.train_idx, self.val_idx = split_validation(len(self.dataset), cfg.val_split, cfg.seed)
        self.train_ds = self.dataset.subset(self.train_idx)
        self.val_ds: Optional[LatentDataset] = self.dataset.subset(self.val_idx) if self.val_idx else None
        self.crop = int(round(cfg.crop_seconds * FRAMES_PER_SECOND))
        self.frames = [c.frames for c in self.train_ds.clips]
        self.repeats = [c.repeat for c in self.train_ds.clips]
        self.batches_per_epoch = len(self._epoch_plan(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation)
        self.total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        self.schedule = new_schedule(cfg, self.total)
        self.trigger = cfg.trigger_tag or self.dataset.trigger_tag

        self.adapter: Optional[Adapter] = None
        self.info = self.ema = self.previews = self.fused = None
        self.requested: dict[str, Any] = {}  # the user's device settings the memory plan replaced
        self.params: list[torch.nn.Parameter] = []
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        if cfg.trains_dit:
            self._setup_dit()  # the memory plan (with the planner LM's share in a joint run) before loading the DiT
        else:
            from ..device.plan import settle

            settle(cfg, self.device, self.say)  # the planner LM's plan alone, before loading it
        self.planner = None
        if cfg.trains_lm:
            from ..planner.training import build_planner_training

            self.planner = build_planner_training(cfg, self.dataset, self.device,
                                                  None if cfg.precision == "fp32" else self.dtype, self.schedule,
                                                  seed=_seed_for(cfg.seed, 1), say=self.say)
            if self.adapter is not None:
                self.adapter.lm = self.planner.adapter

        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.elapsed_before = 0.0
        self.smoother = LossSmoother()
        self.last_checkpoint: Optional[Path] = None
        self.best_val: Optional[float] = None
        self.last_val: Optional[float] = None
        self._resume()

    def _setup_dit(self) -> None:
        """Load the frozen DiT and add its adapter, optimizer, EMA, objective and previews."""
        from ..device import load_frozen_base, recompute_last_layer

        cfg = self.cfg
        loaded, self.holding = load_frozen_base(cfg, self.device, self.dtype, self.say)  # plan, precision, offload
        self.info = loaded.info
        self.model_config = loaded.config
        decoder = loaded.model.decoder
        decoder.requires_grad_(False)
        self.null = loaded.model.null_condition_emb.detach()
        self._check_dataset_fits(decoder)

        _seed_everything(cfg.seed)  # adapter initialisation
        self.adapter = inject_adapter(decoder, cfg)
        if note := unapplied_dropout(cfg):
            self.say(note, logging.WARNING)
        decoder.checkpoint_ratio = cfg.checkpointing_ratio if cfg.gradient_checkpointing else 0.0
        decoder.checkpoint_selective = cfg.selective_checkpointing
        if cfg.torch_compile:
            decoder.compile_layers()
        self.holding.attach(self.adapter, self.device, self.say)  # trainable tensors to the device, start streaming
        if cfg.selective_checkpointing and not round(decoder.checkpoint_ratio * len(decoder.layers)):
            self.say("selective_checkpointing changes nothing: no decoder layer is checkpointed "
                     f"(gradient_checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, checkpointing_ratio "
                     f"{cfg.checkpointing_ratio} of {len(decoder.layers)} layers, no offload)", logging.WARNING)
        self.adapter.module.train()
        self.model = self.dist.wrap(self.adapter.module)
        self.params = self.adapter.parameters()
        self.optimizer = build_optimizer(self.params, cfg)
        chosen = self.holding.chosen(cfg)
        if chosen:  # memory / offload auto: the run's files record what it uses, and what was asked (requested)
            self.requested = {k: getattr(cfg, k) for k in chosen}
            self.say("device settings chosen by the memory plan: " + ", ".join(
                f"{k} {v} (asked: {self.requested[k]})" for k, v in chosen.items())
                + (" — the optimizer steps inside backward" if chosen.get("fused_backward") else ""))
            self.cfg = cfg = cfg.replace(**chosen)
        self.fused = FusedBackward(self.params, self.optimizer, cfg.max_grad_norm) if cfg.fused_backward else None
        decoder.recompute_last = recompute_last_layer(cfg.fused_backward, self.holding.offload_layers,
                                                      len(decoder.layers))
        self.ema = EMA.for_config(self.adapter, cfg)
        if cfg.ema_start_step and self.ema is None:
            self.say(f"ema_start_step {cfg.ema_start_step} changes nothing: no average is kept (ema_decay 0)",
                     logging.WARNING)
        mu = cfg.timestep_mu if cfg.timestep_mu is not None else self.info.timestep_mu
        sigma = cfg.timestep_sigma if cfg.timestep_sigma is not None else self.info.timestep_sigma
        self.objective = Objective(cfg.timestep_mode, mu, sigma, cfg.cfg_ratio, self.null,
                                   None if cfg.precision == "fp32" else self.dtype)
        self.previews = self._build_previews() if cfg.preview_every and self.dist.main else None

    def _epoch_plan(self, epoch: int):
        return plan_epoch(self.frames, self.crop, self.cfg.batch_size, self.cfg.seed, epoch, self.dist.world,
                          self.dist.rank, self.repeats)

    def _check_out_dir(self) -> None:
        cfg = self.cfg
        if cfg.resume == "none" and (st.list_checkpoints(self.out) or (self.out / "final").exists()):
            raise ValueError(
                f"{self.out}: already holds a training run; pass --resume auto to continue it, or choose another --out"
            )

    def _check_dataset_fits(self, decoder) -> None:
        clip = self.dataset.clips[0]  # all clips share its widths (open_dataset leaves out those that differ)
        lat, ctx, cond = clip.widths
        want_lat = self.model_config.audio_acoustic_hidden_dim
        want_ctx = self.model_config.in_channels - want_lat
        want_cond = decoder.condition_embedder.in_features
        if lat != want_lat or ctx != want_ctx or cond != want_cond:
            raise ValueError(
                f"{clip.path}: preprocessed for a different model (latents {lat}, context {ctx}, condition "
                f"width {cond}; this model needs {want_lat}, {want_ctx}, {want_cond})"
            )

    # ----- resume -----
    def _resume(self) -> None:
        """Continue from a checkpoint (the newest usable one with ``auto``, falling back past damaged ones); build
        the learning-rate schedule either way."""
        cfg = self.cfg
        state = folder = None
        if cfg.resume == "auto":
            found = st.list_checkpoints(self.out)
            for _, candidate in reversed(found):
                try:
                    state = self._read_state(candidate)
                except st.CheckpointStateError as exc:
                    self.say(f"skipping {candidate}: {_after_path(exc, candidate)}", logging.WARNING)
                    continue
                folder = candidate
                break
            if folder is None and found:
                raise st.CheckpointStateError(
                    f"{self.out / 'checkpoints'}: no checkpoint there can be resumed from (see above); move them "
                    "away or choose another --out")
            if folder is None:
                self.say("resume auto: no checkpoint yet, starting from scratch")
        elif cfg.resume != "none":
            folder = Path(cfg.resume).expanduser()
            if not (folder / st.STATE_JSON).exists() and (folder / "checkpoints").is_dir():
                folder = st.latest_valid_checkpoint(folder) or folder
            state = self._read_state(folder)
        if state is None:
            self.scheduler = build_scheduler(self.optimizer, cfg, self.schedule) if self.adapter else None
            return
        self._apply_state(folder, state)

    def _read_state(self, folder: Path) -> dict[str, Any]:
        """A checkpoint's training state, checked completely before anything of it is used."""
        state = st.read_checkpoint(folder)
        if not isinstance(state, dict):
            raise st.CheckpointStateError(f"{folder}: damaged training state: not a mapping")
        if self.planner is not None:
            self.planner.check_state(state.get("lm"), folder)
        elif state.get("lm") is not None:
            raise AdapterMismatchError(f"{folder}: the checkpoint also trains the planner LM; resume with "
                                       f"train_models {'both' if state.get('adapter') else 'lm'}")
        if self.adapter is None:
            if state.get("adapter") is not None:
                raise AdapterMismatchError(f"{folder}: the checkpoint also trains a DiT adapter; resume with "
                                           "train_models both")
            st.check_state(state, folder, [])
            return self._check_length(state, folder)
        if not isinstance(state.get("adapter"), dict):
            raise AdapterMismatchError(f"{folder}: the checkpoint holds no DiT adapter (it trains the planner LM "
                                       "only); resume with train_models lm")
        a = state["adapter"]
        if a.get("kind") != self.cfg.adapter or list(a.get("targets", [])) != list(self.adapter.targets):
            raise AdapterMismatchError(
                f"{folder}: checkpoint holds a {a.get('kind')} adapter on {len(a.get('targets', []))} modules; these "
                f"settings train a {self.cfg.adapter} adapter on {len(self.adapter.targets)} modules"
            )
        base = a.get("base_identity")  # absent in checkpoints of earlier versions
        if base and self.info.identity and base != self.info.identity:
            raise AdapterMismatchError(
                f"{folder}: the checkpoint's adapter was trained on another base model (identity {base}; "
                f"{self.cfg.checkpoint} is {self.info.identity}; the same model in another file layout counts as "
                "another file); resume with the checkpoint the run started with, or train into another --out")
        saved, now = a.get("options") or {}, self.adapter.options
        differ = [k for k in saved if k in now and saved[k] != now[k]]
        if differ:
            raise AdapterMismatchError(
                f"{folder}: the checkpoint's {a['kind']} adapter was trained with "
                f"{_options_text(saved, differ)}; these settings ask for {_options_text(now, differ)}. Resume with "
                "the checkpoint's adapter settings, or train into another --out")
        if state.get("optimizer_name") != self.cfg.optimizer:
            raise AdapterMismatchError(
                f"{folder}: was trained with optimizer {state.get('optimizer_name')}; resume with the same optimizer"
            )
        st.check_state(state, folder, self.params)
        return self._check_length(state, folder)

    def _check_length(self, state: dict[str, Any], folder: Path) -> dict[str, Any]:
        if state["step"] > self.total:  # a settings problem, not a damaged checkpoint: no fallback
            raise ValueError(
                f"{folder}: is at step {state['step']}, beyond this run's {self.total} steps; nothing would be "
                "trained (raise --max-steps / --epochs, or choose another checkpoint)")
        return state

    def _apply_state(self, folder: Path, state: dict[str, Any]) -> None:
        cfg = self.cfg
        if self.adapter is not None:
            load_adapter_weights(self.adapter, folder)
            st.load_optimizer_state(self.optimizer, state["optimizer"], str(folder))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_pos = state["step"], state["epoch"], state["batch_pos"]
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.smoother = LossSmoother(**state["smoother"])
        self.best_val, self.last_val = state.get("best_val"), state.get("val_loss")
        if self.ema is not None and not self.ema.load_state(state.get("ema"), str(folder)):
            self.say(f"{folder}: has no EMA weights; the average starts from the resumed weights", logging.WARNING)
        rngs = state["rng"]
        if len(rngs) != self.dist.world:
            self.say(f"checkpoint was written by {len(rngs)} process(es), now {self.dist.world}: the data order and "
                     "noise continue, but the run will not repeat an uninterrupted one exactly", logging.WARNING)
        st.set_rng_state(rngs[self.dist.rank % len(rngs)])

        old = state.get("config", {})
        saved = state.get("schedule") or _schedule_of_old_checkpoint(cfg, old, int(state.get("total_steps", 0)))
        notes = []
        if saved["total"] == self.total:
            self.schedule = saved
        else:
            self.schedule = extend_schedule(saved, self.step, self.total)
            notes.append(f"run length {saved['total']} -> {self.total} steps: the rest of the learning-rate schedule "
                         f"is spread over steps {self.step}-{self.total}, continuing from where it is (no jump)")
        self.scheduler = None
        if self.adapter is not None:
            self.scheduler = build_scheduler(self.optimizer, cfg, self.schedule)
            continue_at(self.scheduler, self.optimizer, cfg, self.step)
        if self.planner is not None:
            self.planner.resume(folder, state["lm"], self.step, self.schedule)
        for key, what in (("learning_rate", "learning rate"), ("lm_learning_rate", "LM learning rate"),
                          ("scheduler", "schedule"),
                          ("min_lr_ratio", "min_lr_ratio"), ("scheduler_cycles", "scheduler_cycles"),
                          ("weight_decay", "weight decay"), ("max_grad_norm", "max_grad_norm"),
                          ("fused_backward", "fused_backward")):
            if key in old and old[key] != getattr(cfg, key):
                notes.append(f"{what} {old[key]} -> {getattr(cfg, key)} from step {self.step}")
        if "warmup_steps" in old and old["warmup_steps"] != cfg.warmup_steps:
            notes.append(f"warmup_steps {cfg.warmup_steps} is not applied: a started run keeps its warmup "
                         f"({self.schedule['warmup']} steps)")
        data = [k for k in ("seed", "batch_size", "gradient_accumulation", "crop_seconds", "timestep_mode",
                            "timestep_mu", "timestep_sigma", "cfg_ratio", "val_split", "precision",
                            "base_precision") if k in old and old[k] != getattr(cfg, k)]
        if data:
            notes.append(f"{', '.join(data)} changed: applied from step {self.step}, so the run will not repeat an "
                         "uninterrupted one")
        for note in notes:
            self.say(f"resuming with changed settings: {note}", logging.WARNING)
        self.last_checkpoint = folder
        self.say(f"resumed from {folder} at step {self.step} (epoch {self.epoch}), learning rate {self._lr():.3g}")

    # ----- plan -----
    def _plan(self) -> dict[str, Any]:
        cfg = self.cfg
        plan: dict[str, Any] = {
            "train_models": cfg.train_models, "precision": cfg.precision, "device": str(self.device),
            "processes": self.dist.world, "clips": len(self.train_ds), "val_clips": len(self.val_ds or []),
            "batch_size": cfg.batch_size, "gradient_accumulation": cfg.gradient_accumulation,
            "crop_frames": self.crop, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
            "start_step": self.step, "warmup_steps": self.schedule["warmup"],
        }
        if self.adapter is not None:
            plan.update({
                "adapter": cfg.adapter, "targets": len(self.adapter.targets),
                "trainable_params": self.adapter.num_parameters(), "base_variant": self.info.variant,
                "timestep_mode": cfg.timestep_mode, "timestep_mu": self.objective.mu,
                "timestep_sigma": self.objective.sigma, "cfg_ratio": cfg.cfg_ratio,
            })
        if self.planner is not None:
            plan.update(self.planner.plan())
        if cfg.estimate_steps and self.step < self.total and self.adapter is not None:
            plan.update(self._measure(cfg.estimate_steps, plan["trainable_params"]))
        return plan

    def _measure(self, n: int, n_params: int) -> dict[str, Any]:
        """Estimate time and memory without changing any training state: one untimed pass on the epoch's largest
        micro-batch (warm-up, and the memory peak), then ``n`` timed passes (loading included) on a median-sized
        one. Time is scaled by padded frames to the epoch's mean micro-batch and multiplied by the micro-batches a
        step really has (an epoch shorter than the accumulation ends steps early). With fewer than two timings, or
        timings that disagree, the plan says it cannot tell instead of guessing."""
        batches = self._epoch_plan(self.epoch)
        size = [len(b) * max(it.length for it in b) for b in batches]  # padded frames in each micro-batch
        largest = max(range(len(batches)), key=lambda i: size[i])
        median = sorted(range(len(batches)), key=lambda i: size[i])[len(batches) // 2]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        devices = [self.device.index or 0] if cuda else []
        if self.fused is not None:
            self.fused.mode = "discard"  # gradients freed as they come, as in training, but nothing is updated
        with torch.random.fork_rng(devices=devices):
            for i in range(n + 1):
                t0 = time.perf_counter()
                batch = load_batch(self.train_ds, batches[largest if i == 0 else median]).to(self.device)
                gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 77, i))
                with self.dist.no_sync(self.model):
                    loss, _ = self.objective(self.model, batch, gen)
                    self.scaler.scale(loss).backward()
                if cuda:
                    torch.cuda.synchronize(self.device)
                if i:
                    times.append(time.perf_counter() - t0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.fused is not None:
            self.fused.mode = "step"
        out: dict[str, Any] = {}
        if len(times) < 2 or max(times) > 1.5 * min(times):
            out["estimate_note"] = (f"cannot tell the time per step yet (timings {', '.join(f'{t:.3g}' for t in times)}"
                                    " s per micro-batch)" if len(times) > 1 else
                                    "cannot tell the time per step from one timing (--estimate-steps 2 or more)")
        else:
            per_micro = statistics.median(times) * statistics.fmean(size) / size[median]
            per_step = per_micro * len(batches) / self.steps_per_epoch
            out.update(seconds_per_step=per_step, estimated_seconds=per_step * (self.total - self.step))
        if cuda:
            from ..device.plan import OPTIMIZER_BYTES  # the plan's figures: its estimate and this one agree

            opt_bytes = int(OPTIMIZER_BYTES.get(self.cfg.optimizer, 8) * n_params)
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device) + opt_bytes)
            out["memory_kind"] = "cuda"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["peak_memory_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
            out["memory_kind"] = "process peak RSS"
        return out

    # ----- one optimizer step -----
    def _next_items(self, taken: int):
        """The first micro-batch of the step after the current one (the one the loop will take next)."""
        epoch, pos = self.epoch, self.batch_pos + taken
        batches = self._epoch_plan(epoch)
        if pos >= len(batches):
            batches, pos = self._epoch_plan(epoch + 1), 0
        return batches[pos] if pos < len(batches) and self.step + 1 < self.total else None

    def _train_step(self, group) -> tuple[float, float, list[float], Optional[tuple[float, float]]]:
        """One optimizer step of every adapter trained: ``(loss, grad norm, timesteps, (LM loss, LM grad norm))``;
        with the LM alone its loss and norm are also the first two. All gradients are computed and checked before
        any weight changes, so an interruption or a non-finite loss never leaves one adapter a step ahead."""
        lm = None
        if self.planner is not None:
            lm = self.planner.backward([[self.train_idx[it.clip] for it in items] for items in group])
            if not all(math.isfinite(v) for v in lm):
                raise NonFiniteLossError(self._nan_message("planner LM loss or gradient norm", lm[0]))
        if self.fused is not None:
            mean_loss, grad_norm, ts = self._dit_fused_step(group)
        elif self.adapter is not None:
            mean_loss, grad_norm, ts = self._dit_backward(group)
        else:
            (mean_loss, grad_norm), ts = lm, []
        self._in_update = True
        if self.adapter is not None:
            if self.fused is None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.scheduler.step()
        if self.planner is not None:
            self.planner.update()
        self._in_update = False
        self._zero_grad()
        return mean_loss, grad_norm, ts, lm

    def _dit_backward(self, group) -> tuple[float, float, list[float]]:
        """The DiT adapter's gradients for one step, unscaled and clipped: ``(loss, grad norm, timesteps)``."""
        losses, ts = [], []
        n = len(group)
        for j, items in enumerate(group):
            batch = self.prefetcher.get(items)
            self.prefetcher.prefetch(group[j + 1] if j + 1 < n else self._next_items(n))
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, self.dist.rank, self.step, j))
            ctx = self.dist.no_sync(self.model) if j < n - 1 else contextlib.nullcontext()
            with ctx:
                loss, t = self.objective(self.model, batch, gen)
                self.scaler.scale(loss / n).backward()
            losses.append(loss.detach())
            ts.extend(t.tolist())
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # One host synchronisation per step, for the log line; nothing is applied before both values are checked.
        mean_loss, grad_norm = torch.stack([self.dist.mean(torch.stack(losses).mean()).float(),
                                            norm.float().to(losses[0].device)]).tolist()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(self._nan_message("loss", mean_loss))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise NonFiniteLossError(self._nan_message("gradient norm", grad_norm))
        return mean_loss, grad_norm, ts

    def _dit_fused_step(self, group) -> tuple[float, float, list[float]]:
        """The DiT adapter's step with the optimizer inside backward (``training.fused``): the loss is checked
        before backward (one synchronisation), so a non-finite loss updates nothing; a gradient that overflows while
        the loss is finite is applied before it can be seen, and the run then stops on the step's gradient norm
        without saving it."""
        (items,) = group  # gradient_accumulation 1 (TrainConfig.fused_backward_refusal)
        batch = self.prefetcher.get(items)
        self.prefetcher.prefetch(self._next_items(1))
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, self.dist.rank, self.step, 0))
        loss, t = self.objective(self.model, batch, gen)
        mean_loss = loss.detach().float().item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(self._nan_message("loss", mean_loss))
        self._in_update = True  # from here an interruption leaves some tensors updated
        loss.backward()
        grad_norm = self.fused.take_norm().item()  # the norm before per-tensor clipping
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(self._nan_message("gradient norm", grad_norm))
        return mean_loss, grad_norm, t.tolist()

    def _zero_grad(self) -> None:
        if self.adapter is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.planner is not None:
            self.planner.optimizer.zero_grad(set_to_none=True)

    def _lr(self) -> float:
        """The learning rate shown and logged: the DiT adapter's, or the LM's when it trains alone."""
        return (self.scheduler if self.adapter is not None else self.planner.scheduler).get_last_lr()[0]

    def _nan_message(self, what: str, value: float) -> str:
        keep = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was saved yet"
        return (f"step {self.step + 1}: {what} is {value}; training stopped and nothing was saved ({keep}). "
                "Try a lower learning rate, --max-grad-norm, or check the dataset")

    # ----- validation -----
    def _validations(self) -> tuple[Optional[float], Optional[float]]:
        """``(validation loss, the LM's)``; with the LM alone its loss is both."""
        if not self.dist.main:
            return None, None
        lm = self.planner.validation_loss(self.val_idx) if self.planner is not None else None
        return (self._validate() if self.adapter is not None else lm), lm

    def _validate(self) -> Optional[float]:
        """Deterministic: every held-out clip's centre crop, a fixed t and noise per clip, no CFG dropout."""
        if self.val_ds is None or not self.dist.main:
            return None
        module = self.adapter.module
        module.eval()
        total = 0.0
        items = validation_items([c.frames for c in self.val_ds.clips], self.crop)
        with torch.no_grad():
            for i, item in enumerate(items):
                batch = load_batch(self.val_ds, [item]).to(self.device)
                gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 99, i))
                loss, _ = self.objective(module, batch, gen, cfg_ratio=0.0)
                total += float(loss)
        module.train()
        return total / len(items)

    # ----- saving -----
    def _run_metadata(self, status: str) -> dict[str, Any]:
        """What every adapter file of the run records (the LM adapter adds its own ``sidestep_lm_*``)."""
        return {"sidestep_format": "1", "sidestep_version": __version__, "sidestep_trigger_tag": self.trigger,
                "sidestep_steps": self.step, "sidestep_epoch": self.epoch, "sidestep_status": status,
                "sidestep_training": self.cfg.to_dict(include_run=False)}

    def _metadata(self, status: str) -> dict[str, str]:
        info = self.info
        return metadata_json({
            **self._run_metadata(status),
            "sidestep_adapter": self.adapter.kind,
            "sidestep_adapter_options": {**self.adapter.options, **self.adapter.extra},
            "sidestep_targets": self.adapter.targets,
            "sidestep_base_variant": info.variant,
            "sidestep_base_identity": info.identity,
            "sidestep_base_is_turbo": info.is_turbo,
            "sidestep_recommended_shift": info.shift,
            "sidestep_recommended_steps": info.steps,
            "sidestep_recommended_guidance": info.guidance,
        })

    def _save_checkpoint(self, elapsed: float) -> Optional[Path]:
        rngs = self.dist.gather(st.rng_state())  # every rank's RNG, so each resumes its own stream
        folder = None
        if self.dist.main:
            state = {
                "step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos, "total_steps": self.total,
                "elapsed_s": elapsed, "world_size": self.dist.world,
                "adapter": {"kind": self.adapter.kind, "targets": self.adapter.targets,
                            "options": self.adapter.options, "base_identity": self.info.identity}
                if self.adapter else None,
                "optimizer_name": self.cfg.optimizer,
                # without a DiT adapter: an optimizer over no parameters (the LM's is in "lm")
                "optimizer": st.optimizer_state(self.optimizer) if self.adapter else {"state": {}, "param_groups": []},
                "lm": self.planner.state() if self.planner else None,
                "schedule": self.schedule,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "smoother": self.smoother.state(),
                "best_val": self.best_val, "val_loss": self.last_val,
                "ema": self.ema.state() if self.ema is not None else None,
                "rng": rngs,
                "config": self.cfg.to_dict(include_run=False),
                "version": __version__,
            }
            folder = st.write_checkpoint(st.step_dir(self.out, self.step),
                                         lambda d: self._save_adapters(d, "checkpoint"),
                                         state)
            st.prune_checkpoints(self.out, self.cfg.keep_checkpoints, protect=folder)
            self.last_checkpoint = folder
            self._write_loss_png()
            self.emit("checkpoint", step=self.step, path=str(folder))
        self.dist.barrier()
        return folder

    def _save_final(self, status: str) -> Optional[Path]:
        final = None
        if self.dist.main:
            final = st.write_dir_atomically(self.out / "final", lambda d: self._save_adapters(d, status))
            self._write_loss_png()
        self.dist.barrier()
        return final

    def _save_adapters(self, folder: Path, status: str) -> None:
        if self.adapter is not None:
            meta = self._metadata(status)
            self.adapter.save(folder, meta)
            if self.ema is not None:
                self.ema.save(folder, meta)
        if self.planner is not None:
            self.planner.save(folder, metadata_json(self._run_metadata(status)))

    def _write_loss_png(self) -> None:
        from .chart import write_loss_png

        try:
            write_loss_png(self.out, title=f"{self.out.name}: loss (thin) and smoothed loss, step {self.step}")
        except ImportError as exc:  # Pillow missing: the chart is not worth a run
            log.warning("loss.png not written: %s", exc)

    def _write_run_files(self, plan: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "training_config.json", {
            "version": __version__,
            "config": self.cfg.to_dict(),  # as used: with what memory / offload auto chose
            "requested": self.requested,  # the user's values of the settings it changed
            "model": self.info.to_dict() if self.info else None,
            "adapter": {"kind": self.adapter.kind, "options": self.adapter.options, "targets": self.adapter.targets,
                        **self.adapter.extra} if self.adapter else None,
            "lm_adapter": self.planner.describe() if self.planner else None,
            "dataset": {"clips": [c.name for c in self.train_ds.clips],
                        "val_clips": [c.name for c in (self.val_ds.clips if self.val_ds else [])],
                        "trigger_tag": self.trigger},
            "plan": plan,
        })

    # ----- main -----
    def _build_previews(self):
        """Preview renderer (rank 0): prompts encoded once, in the style the dataset was preprocessed with."""
        from ..data.cache import prompt_style
        from ..inference.generate import SamplerSettings
        from ..inference.previews import PreviewRenderer, load_preview_prompts

        cfg = self.cfg
        settings = SamplerSettings(steps=cfg.preview_steps, shift=cfg.preview_shift, guidance=cfg.preview_guidance)
        return PreviewRenderer.build(
            cfg.checkpoint, self.out, load_preview_prompts(cfg.preview_prompts), cfg.preview_every,
            device=self.device, variant=cfg.base_variant or None, null_condition_emb=self.null, settings=settings,
            prompt_style=prompt_style(cfg.dataset), progress=self._progress,
            lm=cfg.lm if cfg.preview_codes else None, live_lm=cfg.trains_lm and cfg.preview_codes,
        )

    def run(self) -> TrainResult:
        """Lock OUT (rank 0), clear what interrupted saves left there, then train."""
        if not self.dist.main:
            return self._run()
        # Creating OUT and its lock is the first write: a read-only or missing place fails here, before any loading.
        created = not self.out.exists()
        try:
            with RunLock(self.out, "another training run"):
                for folder in (self.out, self.out / "checkpoints"):
                    for p in clean_stale_temps(folder):
                        self.say(f"removed {p} (left by an interrupted save)")
                return self._run()
        except BaseException:
            if created:  # a run that failed before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.out.rmdir()
            raise

    def _run(self) -> TrainResult:
        self.setup()
        cfg = self.cfg
        plan = self._plan()
        self._write_run_files(plan)
        self.emit("plan", **plan)
        self.say(_plan_text(plan))
        csv = tb = None
        if self.dist.main:
            csv = CsvLog(self.out / "loss.csv", self.step)
            tb = TensorBoard(self.out / "runs", self.step, cfg.tensorboard)
            if self.previews is not None:
                self.previews.writer = tb
        result = TrainResult("complete", self.step, self.total, self.out, None, self.last_checkpoint,
                             is_main=self.dist.main)
        speed = Speed()
        self.prefetcher = Prefetcher(self.train_ds, self.device)
        t_start = time.perf_counter()
        t_hist: list[float] = []
        saved_at = self.step if self.last_checkpoint else -1
        self._in_update = False
        stop = False
        try:
            while self.step < self.total and not stop:
                batches = self._epoch_plan(self.epoch)
                if self.batch_pos >= len(batches):
                    self.epoch, self.batch_pos = self.epoch + 1, 0
                    continue
                group = batches[self.batch_pos:self.batch_pos + cfg.gradient_accumulation]
                lr = self._lr()
                loss, grad_norm, ts, lm = self._train_step(group)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.step)
                self.batch_pos += len(group)
                if self.batch_pos >= len(batches):
                    self.epoch, self.batch_pos = self.epoch + 1, 0
                smoothed = self.smoother.update(loss)
                result.losses.append(loss)
                speed.tick()
                t_hist.extend(ts)
                elapsed = self.elapsed_before + time.perf_counter() - t_start

                stop = self.dist.any(bool(self.should_stop()) if self.dist.main else False)
                save = stop or self.step == self.total or (cfg.save_every and self.step % cfg.save_every == 0)
                val = lm_val = None
                if self.val_ds is not None and (
                    (cfg.val_every and self.step % cfg.val_every == 0) or (not cfg.val_every and save)
                ):
                    val, lm_val = self._validations()
                    if val is not None:
                        self.last_val = val
                        self.best_val = val if self.best_val is None else min(self.best_val, val)
                        self.emit("validation", step=self.step, val_loss=val)
                if self.dist.main:
                    csv.write(step=self.step, epoch=self.epoch, loss=loss, smoothed_loss=smoothed, lr=lr,
                              grad_norm=grad_norm, val_loss=val, elapsed_s=elapsed, lm_loss=lm[0] if lm else None)
                    if cfg.log_every and self.step % cfg.log_every == 0:
                        tb.scalars(self.step, {"train/loss": loss, "train/loss_smoothed": smoothed, "train/lr": lr,
                                               "train/grad_norm": grad_norm, "train/epoch": self.epoch})
                        if lm is not None:
                            tb.scalars(self.step, {"lm/loss": lm[0], "lm/grad_norm": lm[1],
                                                   "lm/lr": self.planner.lr()})
                    if val is not None:
                        tb.scalars(self.step, {"val/loss": val})
                    if lm_val is not None:
                        tb.scalars(self.step, {"val/lm_loss": lm_val})
                    if cfg.histogram_every and self.step % cfg.histogram_every == 0 and t_hist:
                        tb.histogram("train/timesteps", t_hist, self.step)
                        t_hist = []
                self.emit("step", step=self.step, total=self.total, epoch=self.epoch, loss=loss,
                          smoothed_loss=smoothed, lr=lr, grad_norm=grad_norm, steps_per_s=speed.steps_per_s(),
                          eta_s=speed.eta_s(self.total - self.step), **({"lm_loss": lm[0]} if lm else {}))
                if save:
                    self._save_checkpoint(elapsed)
                    saved_at = self.step
                if self.previews is not None:  # after saving: a slow render never risks the checkpoint
                    self.previews.maybe_render(self.step, self.adapter.module, force=self.step == self.total or stop,
                                               lm=self.planner.planner if self.planner is not None else None)
                if self.step_hook is not None and self.dist.main and self.adapter is not None:  # as the previews
                    from ..inference.previews import Isolated

                    with Isolated(self.adapter.module, self.device):
                        self.step_hook(self.step, self.adapter)
                result.loss, result.smoothed_loss = loss, smoothed
        except KeyboardInterrupt:
            if self._in_update or self.dist.world > 1:
                raise  # parameters half-updated, or other ranks cannot follow: keep the last checkpoint as it is
            self._zero_grad()
            stop, result.interrupted = True, True
            self.say(f"interrupted at step {self.step}: saving")
            if self.step != saved_at:
                self._save_checkpoint(self.elapsed_before + time.perf_counter() - t_start)
        finally:
            self.prefetcher.close()
            if tb is not None:
                tb.close()
            if csv is not None:
                csv.close()

        if self.step == self.total and self.step != saved_at:
            self._save_checkpoint(self.elapsed_before + time.perf_counter() - t_start)
        result.status = "stopped" if stop and self.step < self.total else "complete"
        result.final_dir = self._save_final(result.status)
        result.step, result.checkpoint, result.val_loss = self.step, self.last_checkpoint, self.last_val
        if self.dist.main:  # the caller reports the end (the CLI prints one line), so only the log gets this
            log.info("%s at step %d/%d; adapter in %s", result.status, self.step, self.total, result.final_dir)
        self.emit("done", status=result.status, step=self.step, total=self.total,
                  final=str(result.final_dir) if result.final_dir else None,
                  checkpoint=str(result.checkpoint) if result.checkpoint else None)
        return result


def _after_path(exc: Exception, path: Path) -> str:
    """An error message without its leading ``PATH: `` (for lines that name the path already)."""
    text = str(exc)
    return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text


def _options_text(options: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {options[k]}" for k in keys)


def _schedule_of_old_checkpoint(cfg: TrainConfig, old: dict[str, Any], total: int) -> dict[str, Any]:
    """Checkpoints written before schedules were saved: rebuild it from the settings they recorded."""
    return new_schedule(cfg.replace(**{k: old[k] for k in ("warmup_steps", "scheduler") if k in old}),
                        total or 1)


def _plan_text(plan: dict[str, Any]) -> str:
    lines = []
    if "adapter" in plan:
        lines.append(f"plan: {plan['adapter']} on {plan['targets']} modules ({plan['trainable_params']:,} trainable "
                     f"parameters), base {plan['base_variant']}, {plan['precision']} on {plan['device']} "
                     f"x{plan['processes']}")
    if "lm_targets" in plan:
        lines.append(f"{'      ' if lines else 'plan: '}planner LM: LoRA rank {plan['lm_rank']} on "
                     f"{plan['lm_targets']} modules ({plan['lm_params']:,} trainable parameters), loss on "
                     f"{plan['lm_loss']}, {plan['lm_tokens']:,} tokens to learn in the dataset, {plan['precision']} "
                     f"on {plan['device']}")
    crop = f"crop {plan['crop_frames']} frames" if plan["crop_frames"] else "whole clips (no crop)"
    lines.append(
        f"      {plan['clips']} clips ({plan['val_clips']} held out), batch {plan['batch_size']} x accumulation "
        f"{plan['gradient_accumulation']}, {crop}; {plan['steps_per_epoch']} steps per "
        f"epoch, steps {plan['start_step']} -> {plan['total_steps']} (warmup {plan['warmup_steps']})")
    if "adapter" in plan:
        lines.append(f"      timesteps {plan['timestep_mode']} (mu {plan['timestep_mu']:.3g}, sigma "
                     f"{plan['timestep_sigma']:.3g}), CFG dropout {plan['cfg_ratio']}")
    if "peak_memory_bytes" in plan:
        time_text = (f"{plan['seconds_per_step']:.3g} s/step, about {_duration(plan['estimated_seconds'])} to go"
                     if "seconds_per_step" in plan else plan["estimate_note"])
        lines.append(f"      estimate: {time_text}; peak memory about {plan['peak_memory_bytes'] / 2**30:.2f} GiB "
                     f"({plan['memory_kind']})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
