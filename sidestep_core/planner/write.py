"""The planner LM writes a prompt's audio codes, as ComfyUI's ACE-Step 1.5 text encoder does with
``generate_audio_codes`` on, and an LM adapter is applied to it for that (previews, ``sidestep generate|compare``).

ComfyUI's sampler: classifier-free guidance on the logits between the codes prompt and its negative (the same
caption and lyrics with an empty CoT), every token but the audio codes masked out, then top-k, min-p and top-p,
temperature, and one multinomial draw per token from a generator seeded with the prompt's seed; it writes
``ceil(duration) · 5`` codes (its minimum and maximum are both that, so the end token never wins). Upstream's LM
inference samples alike (CFG 2.0, temperature 0.85, top-p 0.9 by default). Here the two prompts run as two streams
with their own KV caches (ComfyUI left-pads them into one batch) in transformers' arithmetic, so the codes follow the
same distribution, not ComfyUI's exact tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .label import Stream
from .prompts import LMInputs, codes_prompt_ids


@dataclass(frozen=True)
class CodeSampling:
    """ComfyUI's TextEncodeAceStepAudio1.5 defaults."""

    cfg_scale: float = 2.0
    temperature: float = 0.85
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0


def code_count(seconds: float) -> int:
    """Codes ComfyUI writes for a duration: ``ceil(seconds) · 5``."""
    return math.ceil(float(seconds)) * 5


def _filtered(logits: torch.Tensor, s: CodeSampling) -> torch.Tensor:
    """ComfyUI's order: top-k, min-p, top-p (on the guided logits), then temperature."""
    low = torch.finfo(logits.dtype).min
    if s.top_k and s.top_k > 0:
        logits = torch.where(logits < torch.topk(logits, s.top_k).values[-1], low, logits)
    if s.min_p and s.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = torch.where(probs < s.min_p * probs.max(), low, logits)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1) > s.top_p
        drop[1:] = drop[:-1].clone()
        drop[0] = False
        logits = torch.where(drop.scatter(0, order, drop), low, logits)
    return logits / s.temperature if s.temperature > 0 else logits


@torch.no_grad()
def write_codes(planner, inputs: LMInputs, style: str, *, seed: int, count: int,
                sampling: CodeSampling = CodeSampling()) -> list[int]:
    """``count`` audio codes for ``inputs`` from ``planner`` (whatever adapter is applied to its model). Draws only
    from its own generator; the model should be in eval mode."""
    tok = planner.tokenizer
    guided = sampling.cfg_scale != 1.0
    pos = Stream(planner.model, codes_prompt_ids(tok, inputs, style))
    neg = Stream(planner.model, codes_prompt_ids(tok, inputs, style, negative=True)) if guided else None
    gen = torch.Generator().manual_seed(int(seed))
    lo, hi = tok.code_offset, tok.code_offset + tok.codebook_size
    codes: list[int] = []
    for i in range(count):
        cond = pos.logits[lo:hi]
        logits = neg.logits[lo:hi] + sampling.cfg_scale * (cond - neg.logits[lo:hi]) if guided else cond.clone()
        logits = _filtered(logits, sampling)
        if sampling.temperature > 0:
            code = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        else:
            code = int(torch.argmax(logits))
        codes.append(code)
        if i + 1 < count:
            pos.feed([lo + code])
            if neg is not None:
                neg.feed([lo + code])
    return codes


# ----------------------------------------------------------------------------------------------------------
# applying a trained LM adapter for inference
# ----------------------------------------------------------------------------------------------------------


class AppliedLMAdapter:
    """A saved LM adapter (PEFT folder) on a planner's model at a strength; :meth:`remove` gives the plain model
    back (nothing is merged)."""

    def __init__(self, planner, folder: str | Path, strength: float = 1.0):
        from peft import PeftModel

        from .lm_adapter import check_fits, lm_shape, read_lm_adapter

        self.planner, self.folder = planner, Path(folder)
        check_fits(read_lm_adapter(self.folder), lm_shape(planner.model.config))
        self.peft_model = PeftModel.from_pretrained(planner.model, str(self.folder), is_trainable=False)
        self.peft_model.eval()
        self.set_strength(strength)

    def set_strength(self, strength: float) -> None:
        from peft.tuners.lora import LoraLayer

        self.strength = float(strength)
        for m in self.peft_model.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", self.strength)

    def remove(self) -> None:
        self.planner.model = self.peft_model.unload()


def lm_adapter_folder(adapter: str | Path) -> Optional[Path]:
    """The LM adapter that came with a run's adapter folder (``<folder>/lm``), or None."""
    from .lm_adapter import LM_FOLDER

    folder = Path(adapter) / LM_FOLDER
    return folder if folder.is_dir() else None
