"""The planner LM's share of the memory plan, for runs that train it (``train_models`` lm / both).

Made as the DiT's plan (:mod:`.plan`), from the LM's headers and config only:

- **weights**: every tensor the loader keeps, at the dtype it loads them in (the training dtype; fp32 runs load fp32),
  the tied output embedding once;
- **adapter**: the LoRA's fp32 parameters and the optimizer's state per parameter;
- **step**: the peak of one micro-batch's forward and backward, *measured* with the real transformers model, the
  real PEFT LoRA and the real loss (:func:`~sidestep_core.planner.training.lm_loss`) on fake tensors at the real
  shape, counted by :class:`.plan.LiveBytes`; measured at depth 2 and 4 and extrapolated when the LM is deeper.

An LM sequence is its clip's whole prompt and all its codes (the LM is not cropped): ``prompt_tokens`` + one code
per 5 latent frames + the end token, and a micro-batch pads to the longest. With a dataset the plan takes its longest
sequence (:func:`longest_sequence`: each clip's prompt tokenized as training builds it, with the LM's tokenizer only);
without one, a 240 s song and ``sidestep plan``'s ``--cond-tokens``. With ``lm_loss`` codes_and_metadata the CoT's
tokens have a loss too: the sequence's own count with a dataset, ``METADATA_TOKENS`` without.

In a joint run the LM's gradients are made first and kept while the DiT's step runs (nothing is applied before
both are checked), so the run's peak is both models' weights and adapters plus the larger of the LM's step and the
LM's gradients with the DiT's step (:func:`joint_peak`). A DiT plan carrying the LM's (``MemoryPlan.lm``) has that
peak, so ``sidestep plan`` and the check ``train`` runs before loading (:func:`.plan.settle`) refuse and choose the
DiT's settings against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import TrainConfig
from .plan import DTYPES, LiveBytes, MemoryPlan, adapter_bytes, make_fake, size, slack_bytes

POOL = 5  # latent frames per audio code
METADATA_TOKENS = 48  # the CoT's tokens assumed without a dataset (bpm, duration, key, time, …)


@dataclass
class LMMemoryPlan:
    weights: int
    adapter: int
    step: int
    trainable_params: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.weights + self.adapter + self.step

    @property
    def gradients(self) -> int:
        """The LoRA's fp32 gradients, alive from the LM's backward until the update."""
        return 4 * self.trainable_params

    def describe(self) -> str:
        return (f"planner LM: {size(self.peak)} (weights {size(self.weights)} in {self.settings['dtype']}, "
                f"LoRA+optimizer {size(self.adapter)}, {self.step_text()})")

    def step_text(self) -> str:
        s = self.settings
        return (f"step {size(self.step)} for {s['batch_size']} × {s['tokens']} tokens ({s['prompt_tokens']} of "
                "prompt)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak": self.peak}


def sequence_tokens(frames: int, prompt_tokens: int, lm_loss: str,
                    cot_tokens: int = METADATA_TOKENS) -> tuple[int, int]:
    """(tokens in the sequence, tokens with a loss) of a song of ``frames`` latent frames after ``prompt_tokens``
    (the CoT's ``cot_tokens`` among them: trained with ``codes_and_metadata``)."""
    codes = math.ceil(frames / POOL) + 1  # its codes and the end token
    return prompt_tokens + codes, codes + (cot_tokens if lm_loss == "codes_and_metadata" else 0)


def load_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the training loop loads the frozen LM in."""
    return DTYPES[cfg.precision]


def lm_weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the frozen LM as loaded: every parameter and buffer of the architecture (tied ones once)."""
    model = _meta_lm(config, dtype)
    seen = {id(t): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    return sum(seen.values())


def _meta_lm(config, dtype: torch.dtype):
    from transformers import Qwen3ForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the frozen base in the load dtype, as the loader leaves it
    try:
        with torch.device("meta"):
            return Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def _fake_lm_step(config, cfg: TrainConfig, tokens: int, labelled: int) -> tuple[int, int]:
    """(peak bytes of one micro-batch's forward + backward, LoRA parameters), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..planner.lm_adapter import inject_lm_lora
    from ..planner.training import IGNORE, enable_checkpointing, labelled_positions, lm_loss

    dtype = load_dtype(cfg)
    model = _meta_lm(config, dtype)
    with torch.device("meta"):
        adapter = inject_lm_lora(model, rank=cfg.lm_rank, alpha=cfg.lm_alpha, dropout=cfg.lm_dropout,
                                 mlp=cfg.lm_target_mlp)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    adapter.peft_model.train()
    b = cfg.batch_size
    labels = torch.full((b, tokens), IGNORE, dtype=torch.long)
    labels[:, tokens - labelled:] = 0
    positions = labelled_positions(labels)  # real index tensors: fake ones cannot be read
    with FakeTensorMode(allow_non_fake_inputs=True):
        make_fake(adapter.peft_model)
        ids = torch.zeros(b, tokens, dtype=torch.long)
        mask = torch.ones(b, tokens, dtype=torch.long)
        counter = LiveBytes()
        counter.known([*adapter.peft_model.parameters(), *adapter.peft_model.buffers(), ids, mask, labels,
                       *positions])
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
        with counter:
            with autocast:
                loss = lm_loss(model, ids, mask, labels, positions)
            loss.backward()
            del loss
    return counter.peak, adapter.num_parameters()


def lm_step_bytes(config, cfg: TrainConfig, tokens: int, labelled: int) -> tuple[int, int]:
    """(peak bytes of a step, LoRA parameters). Layers are alike: deeper LMs are measured at depth 2 and 4 and
    extrapolated linearly to their depth, as the DiT's plan does."""
    n = config.num_hidden_layers
    if n <= 4:
        return _fake_lm_step(config, cfg, tokens, labelled)
    (p2, n2), (p4, n4) = (_fake_lm_step(_with_depth(config, d), cfg, tokens, labelled) for d in (2, 4))
    return p2 + (p4 - p2) * (n - 2) // 2, n2 + (n4 - n2) * (n - 2) // 2


def _with_depth(config, depth: int):
    out = config.__class__.from_dict(config.to_dict())
    out.num_hidden_layers = depth
    if getattr(out, "layer_types", None):
        out.layer_types = out.layer_types[:depth]
    out._attn_implementation = "sdpa"
    return out


def estimate_lm(lm: str | Path, cfg: TrainConfig, *, frames: int, prompt_tokens: int,
                cot_tokens: int = METADATA_TOKENS) -> LMMemoryPlan:
    """Plan the planner LM's part of a run of ``cfg`` on the LM at ``lm`` (headers and config only), for songs of
    ``frames`` latent frames (the longest of the dataset) and prompts of ``prompt_tokens`` tokens, ``cot_tokens``
    of them the CoT's."""
    from ..planner.loading import planner_architecture

    config = planner_architecture(lm).config
    tokens, labelled = sequence_tokens(frames, prompt_tokens, cfg.lm_loss, cot_tokens)
    dtype = load_dtype(cfg)
    step, n_params = lm_step_bytes(config, cfg, tokens, labelled)
    adapter = adapter_bytes(cfg.optimizer, n_params)
    return LMMemoryPlan(lm_weight_bytes(config, dtype), adapter, step, n_params, settings={
        "frames": frames, "tokens": tokens, "prompt_tokens": prompt_tokens, "labelled": labelled,
        "batch_size": cfg.batch_size,
        "rank": cfg.lm_rank, "dtype": str(dtype).removeprefix("torch."), "hidden_size": int(config.hidden_size),
        "layers": int(config.num_hidden_layers)})


def joint_peak(dit: Optional[MemoryPlan], lm: LMMemoryPlan) -> int:
    """Peak of a run training ``lm`` (and ``dit``, in a joint run): the LM's backward runs first and its gradients
    stay until both models' are checked and applied."""
    if dit is None:
        return lm.peak
    return dit.weights + dit.adapter + lm.weights + lm.adapter + max(lm.step, lm.gradients + dit.step)


def lm_needed(lm: LMMemoryPlan, device: str) -> int:
    """Free memory a run training the LM alone needs: its peak and, on CUDA, the allocator's slack."""
    return lm.peak + slack_bytes(lm.peak, device)


def plan_for_run(cfg: TrainConfig, prompt_tokens: int) -> LMMemoryPlan:
    """The planner LM's plan for a run of ``cfg``: at its dataset's longest training sequence (or, without a dataset,
    a 240 s song after ``prompt_tokens``), as both ``sidestep plan`` and the check before loading make it."""
    frames, prompt, cot = longest_sequence(cfg, prompt_tokens)
    return estimate_lm(cfg.lm, cfg, frames=frames, prompt_tokens=prompt, cot_tokens=cot)


def longest_sequence(cfg: TrainConfig, prompt_tokens: int,
                     default_seconds: float = 240.0) -> tuple[int, int, int]:
    """(latent frames, prompt tokens, the CoT's tokens among them) of the LM's longest training sequence. With
    ``cfg.dataset``: its clips as :func:`~sidestep_core.planner.training.build_planner_training` makes them — each
    whole song and its prompt and CoT in the dataset's prompt style, tokenized with the LM's tokenizer (no weights
    read). Without one: a song of ``default_seconds`` and ``prompt_tokens`` (``METADATA_TOKENS`` of CoT)."""
    if not cfg.dataset:
        return int(round(default_seconds * 25)), prompt_tokens, METADATA_TOKENS
    from ..data.cache import prompt_style
    from ..planner.loading import find_planner_tokenizer, load_planner_tokenizer, planner_architecture
    from ..planner.prompts import training_prompt_ids
    from ..planner.training import clip_inputs
    from ..training.data import open_dataset

    dataset = open_dataset(cfg.dataset)
    tokenizer = load_planner_tokenizer(find_planner_tokenizer(planner_architecture(cfg.lm).path))
    style = prompt_style(dataset.root)

    def lengths(clip) -> tuple[int, int, int]:
        prompt, cot = training_prompt_ids(tokenizer, clip_inputs(clip.sample), style)
        return clip.frames, len(prompt) + len(cot), len(cot)

    return max((lengths(c) for c in dataset.clips), key=lambda seq: sequence_tokens(*seq[:2], cfg.lm_loss, seq[2]))
