"""Training a LoRA on the 5 Hz planner LM, alone or in the same run as the DiT adapter.

What the LM learns: for each clip, the prompt the LM gets at inference for the clip's caption, lyrics and metadata
(in the dataset's prompt style, upstream's or ComfyUI's) followed by the clip's own 5 Hz audio codes and the end
token. The loss is the next-token cross-entropy on the codes and the end token (``lm_loss="codes"``); with
``codes_and_metadata`` also on the metadata block the LM writes before the codes. So the adapter shifts what the
LM decides — structure, phrasing, vocal placement, tempo, key — towards the dataset, which a DiT adapter alone cannot.

:class:`PlannerTraining` is the LM's part of a run, driven by :mod:`sidestep_core.training.loop` with the same data
order (the clips of each micro-batch), the same learning-rate schedule (its own peak ``lm_learning_rate``), its own
optimizer and gradient clipping, and a checkpoint sub-folder ``lm/`` (the PEFT folder) plus its share of the training
state, so a resumed joint run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..config import TrainConfig
from ..training import state as st
from ..training.optim import build_optimizer, build_scheduler, continue_at
from . import vocab as V
from .lm_adapter import LM_FOLDER, LMAdapter, LMAdapterMismatchError, describe_shape, inject_lm_lora

IGNORE = -100  # label of tokens without loss (torch's cross_entropy default)


@dataclass(frozen=True)
class LMSequence:
    """One training sequence: token ids and, per token, the label it is trained to predict there (or IGNORE)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def collate(seqs: list[LMSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; padding carries no loss."""
    n = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s.ids)] = torch.tensor(s.ids)
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
        mask[i, :len(s.ids)] = 1
    return ids, mask, labels


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the tokens a loss is taken on, as positions of the inputs predicting them."""
    return (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)


def lm_loss(causal_lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
            positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens. Logits are computed only where a label is (the
    vocabulary has 217k entries; logits for a whole song would be the largest tensor of the step). ``positions``:
    :func:`labelled_positions` of ``labels``, given when they cannot be read off them (the memory plan's fake
    tensors)."""
    rows, cols = positions if positions is not None else labelled_positions(labels)
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = causal_lm.lm_head(hidden[rows, cols]).float()
    return torch.nn.functional.cross_entropy(logits, labels[rows, cols + 1])


class PlannerTraining:
    """The LM's LoRA, optimizer and schedule inside a training run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, causal_lm: torch.nn.Module, sequences: list[LMSequence], pad_id: int,
                 schedule: dict[str, Any], device: torch.device, dtype: Optional[torch.dtype], identity: str = ""):
        if not sequences or not all(any(l != IGNORE for l in s.labels) for s in sequences):
            raise ValueError("lm: every clip needs audio codes to train the planner LM on")
        self.cfg = cfg.replace(learning_rate=cfg.lm_learning_rate)  # the optimizer and schedule read it from here
        self.sequences, self.pad_id = sequences, pad_id
        self.device, self.dtype = device, dtype
        self.identity = identity  # the frozen LM's content identity: a resume must continue on the same LM
        self.planner = None  # the loaded Planner (model + tokenizer), when built by build_planner_training
        self.lm = causal_lm
        self.adapter: LMAdapter = inject_lm_lora(causal_lm, rank=cfg.lm_rank, alpha=cfg.lm_alpha,
                                                 dropout=cfg.lm_dropout, mlp=cfg.lm_target_mlp)
        if cfg.gradient_checkpointing:
            enable_checkpointing(causal_lm)
        causal_lm.config.use_cache = False
        self.adapter.peft_model.train()
        self.params = self.adapter.parameters()
        self.optimizer = build_optimizer(self.params, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, schedule)

    # ----- training -----
    def loss(self, clips: list[int]) -> torch.Tensor:
        ids, mask, labels = (t.to(self.device) for t in collate([self.sequences[c] for c in clips], self.pad_id))
        ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return lm_loss(self.lm, ids, mask, labels)

    def backward(self, group: list[list[int]]) -> tuple[float, float]:
        """Gradients of one optimizer step over the micro-batches ``group`` (clip indices), clipped:
        ``(mean loss, gradient norm)``. Nothing changes the weights until :meth:`update`."""
        losses = []
        for clips in group:
            loss = self.loss(clips)
            (loss / len(group)).backward()
            losses.append(float(loss.detach()))
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        return sum(losses) / len(losses), norm

    def update(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    @torch.no_grad()
    def validation_loss(self, clips: list[int]) -> float:
        self.adapter.peft_model.eval()
        try:
            return sum(float(self.loss([c])) for c in clips) / len(clips)
        finally:
            self.adapter.peft_model.train()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def plan(self) -> dict[str, Any]:
        return {"lm_targets": len(self.adapter.targets), "lm_params": self.adapter.num_parameters(),
                "lm_rank": self.cfg.lm_rank, "lm_loss": self.cfg.lm_loss,
                "lm_tokens": sum(sum(l != IGNORE for l in s.labels) for s in self.sequences)}

    # ----- checkpoints -----
    def describe(self) -> dict[str, Any]:
        return {"targets": len(self.adapter.targets), "options": self.adapter.options, "shape": self.adapter.shape,
                "identity": self.identity}

    def state(self) -> dict[str, Any]:
        return {**self.describe(), "optimizer": st.optimizer_state(self.optimizer)}

    def save(self, folder: Path, metadata: Mapping[str, str]) -> None:
        self.adapter.save(Path(folder) / LM_FOLDER, metadata)

    def check_state(self, state: Any, folder: Path) -> None:
        """Refuse a checkpoint whose LM part cannot continue this run, before anything is loaded."""
        if not isinstance(state, dict):
            raise LMAdapterMismatchError(
                f"{folder}: the checkpoint holds no planner-LM adapter, but these settings train one (train_models "
                f"{self.cfg.train_models}); resume with the checkpoint's train_models, or train into another --out")
        shape = state.get("shape") or {}
        if shape != self.adapter.shape:
            raise LMAdapterMismatchError(
                f"{folder}: the checkpoint's LM adapter was trained on a planner LM of {describe_shape(shape)}; the "
                f"LM given has {describe_shape(self.adapter.shape)}")
        saved_identity = state.get("identity")
        if saved_identity and self.identity and saved_identity != self.identity:
            raise LMAdapterMismatchError(
                f"{folder}: the checkpoint's LM adapter was trained on another planner LM of the same size (identity "
                f"{saved_identity}; {self.cfg.lm} is {self.identity}); resume with the LM file the run started with, "
                "or train into another --out")
        saved = state.get("options") or {}
        differ = [k for k in saved if saved[k] != self.adapter.options.get(k)]
        if differ or state.get("targets") != len(self.adapter.targets):
            raise LMAdapterMismatchError(
                f"{folder}: the checkpoint's LM adapter was trained with {saved}; these settings ask for "
                f"{self.adapter.options}. Resume with the checkpoint's LM settings, or train into another --out")
        groups = state.get("optimizer", {}).get("param_groups", [])
        if sum(len(g.get("params", [])) for g in groups) != len(self.params):
            raise st.CheckpointStateError(f"{folder}: damaged training state: the LM optimizer state does not fit")

    def resume(self, folder: Path, state: dict[str, Any], step: int, schedule: dict[str, Any]) -> None:
        self.adapter.load(Path(folder) / LM_FOLDER)
        st.load_optimizer_state(self.optimizer, state["optimizer"], f"{folder} (planner LM)")
        self.scheduler = build_scheduler(self.optimizer, self.cfg, schedule)
        continue_at(self.scheduler, self.optimizer, self.cfg, step)


def build_planner_training(cfg: TrainConfig, dataset, device: torch.device, dtype: Optional[torch.dtype],
                           schedule: dict[str, Any], *, seed: int, say: Callable[[str], None]) -> PlannerTraining:
    """Load the planner LM named by ``cfg.lm`` (frozen, in ``dtype``), turn every clip of ``dataset`` into a
    training sequence (its codes from the checkpoint's own audio tokenizer, cached beside the dataset) and add the
    LoRA, initialised from ``seed``."""
    from ..data.cache import prompt_style
    from ..model import load_acestep
    from .codes import check_codebook, dataset_codes
    from .loading import load_planner

    planner = load_planner(cfg.lm, dtype=dtype, device=device)
    say(f"training the {planner.describe()}")
    loaded = load_acestep(cfg.checkpoint, variant=cfg.base_variant or None, dtype=torch.float32,
                          parts={"tokenizer"})
    check_codebook(loaded.model, planner)
    codes = dataset_codes(dataset, loaded.model, _silence_latent(loaded, dataset.root))
    del loaded
    style = prompt_style(dataset.root)
    flags = ("code_mask",) if cfg.lm_loss == "codes" else ("code_mask", "cot_mask")
    seqs = [clip_sequence(planner.tokenizer, clip.sample, codes[clip.sample.id], style, flags)
            for clip in dataset.clips]
    torch.manual_seed(seed)
    training = PlannerTraining(cfg, planner.model, seqs, planner.tokenizer.token_id(V.ENDOFTEXT), schedule, device,
                               dtype, planner.identity)
    training.planner = planner  # its model is the LM being trained (the LoRA is injected in place): previews use it
    return training


def clip_inputs(sample):
    """What inference conditions a clip's codes on: its caption — trigger tag included —, lyrics and metadata as
    preprocessing resolved them (a ``prompts.LMInputs``)."""
    from .prompts import LMInputs

    m = sample.metadata
    return LMInputs(caption=str(m.get("caption") or ""), lyrics=str(m.get("lyrics") or ""), bpm=m.get("bpm"),
                    keyscale=m.get("keyscale"), timesignature=m.get("timesignature"),
                    duration=m.get("duration"), language=m.get("language"))


def clip_sequence(tokenizer, sample, codes: torch.Tensor, style: str, flags: tuple[str, ...]) -> LMSequence:
    """A clip's training sequence: its prompt (:func:`clip_inputs`), its codes and the end token; loss on
    ``flags``' tokens."""
    from .prompts import training_example

    ex = training_example(tokenizer, clip_inputs(sample), codes.tolist(), style)
    trained = [any(getattr(ex, f)[i] for f in flags) for i in range(len(ex.ids))]
    return LMSequence(tuple(ex.ids), tuple(t if keep else IGNORE for t, keep in zip(ex.ids, trained)))


def _silence_latent(loaded, dataset_root: Path) -> torch.Tensor:
    """The checkpoint's silence latent (codes pad a clip's last 5-frame window with it); layouts without
    ``silence_latent.pt`` use the one preprocessing derived from the VAE and kept in the dataset."""
    if loaded.silence_latent is not None:
        return loaded.silence_latent
    from safetensors import safe_open

    from ..data.cache import WORK_DIR
    from ..data.preprocess import SILENCE_CACHE

    path = Path(dataset_root) / WORK_DIR / SILENCE_CACHE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor("silence_latent")
    except Exception as exc:
        raise ValueError(f"{path}: no silence latent for the audio codes ({exc}); preprocess the dataset again "
                         "with this checkpoint") from exc


def enable_checkpointing(lm) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing (the old name warns); older
    releases have only the old name."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
