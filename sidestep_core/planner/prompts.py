"""The planner LM's prompts, token for token as the two inference front ends build them, and the training format.

Both front ends wrap the request in Qwen3's chat format; the assistant turn holds the chain of thought (the song's
metadata as sorted YAML inside ``<think>``), and the codes follow the closed assistant turn:

``<|im_start|>system\\n# Instruction\\n{instruction}\\n\\n<|im_end|>\\n<|im_start|>user\\n# Caption\\n{caption}\\n\\n``
``# Lyric\\n{lyrics}\\n<|im_end|>\\n<|im_start|>assistant\\n<think>\\n{yaml}\\n</think>\\n\\n<|im_end|>\\n`` + codes.

``acestep`` — upstream's LM inference: the CoT holds whichever of bpm, caption, duration, keyscale, language and
time signature are known (phase 1 writes them, or the user gives them); caption and lyrics go in as given.
``comfyui`` — ComfyUI's ``TextEncodeAceStepAudio1.5``: the CoT holds only bpm, duration (rounded up), keyscale and
time signature; the caption and lyrics are stripped; text is split the way ComfyUI's tokenizer wrapper splits it.
In both, a time signature "N/4" is written "N", digit strings become YAML integers, and the CFG prompt has an empty
CoT. Code generation stops at ``<|im_end|>``.

Labelling uses upstream's "understand" prompt: the song's codes as the user turn, and the LM answers with the CoT
and then the lyrics.

PyYAML formats the CoT, as in both front ends (its line folding of long captions is part of the token sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..text.prompts import ACESTEP, COMFYUI, PROMPT_STYLES, comfy_pieces
from . import vocab as V

GENERATE_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
UNDERSTAND_INSTRUCTION = "Understand the given musical conditions and describe the audio semantics accordingly:"
# The CoT fields each front end writes, in the sorted order YAML gives them.
COT_FIELDS = {
    ACESTEP: ("bpm", "caption", "duration", "keyscale", "language", "timesignature"),
    COMFYUI: ("bpm", "duration", "keyscale", "timesignature"),
}
_UNSET = (None, "", "N/A", "unspecified")


@dataclass(frozen=True)
class LMInputs:
    caption: str
    lyrics: str = ""
    bpm: Optional[str | int] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str | int] = None
    duration: Optional[float] = None  # seconds
    language: Optional[str] = None


@dataclass
class TrainingExample:
    """One LM training sequence: ``ids`` with a mask for each part a loss may be taken on."""

    ids: list[int]
    cot_mask: list[bool]  # the metadata (the CoT and the end of the assistant turn)
    code_mask: list[bool]  # the codes and the <|im_end|> that ends them
    prompt_len: int = 0  # ids before the assistant turn's content


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def _chat(system: str, user: str) -> str:
    return (f"{V.IM_START}system\n# Instruction\n{system}\n\n{V.IM_END}\n"
            f"{V.IM_START}user\n{user}{V.IM_END}\n{V.IM_START}assistant\n")


def cot_metadata(inputs: LMInputs, style: str = ACESTEP) -> dict:
    """The CoT's fields and values as the front end puts them into YAML."""
    _check_style(style)
    values = {"bpm": inputs.bpm, "caption": inputs.caption, "duration": inputs.duration,
              "keyscale": inputs.keyscale, "language": inputs.language, "timesignature": inputs.timesignature}
    out = {}
    for key in COT_FIELDS[style]:
        value = values[key]
        if value in _UNSET:
            continue
        if key == "duration":
            value = math.ceil(float(value)) if style == COMFYUI else int(float(value))
        if isinstance(value, str):
            if key == "timesignature" and value.endswith("/4"):
                value = value[:-2]
            if value.isdigit():
                value = int(value)
        out[key] = value
    return out


def cot_text(inputs: Optional[LMInputs], style: str = ACESTEP) -> str:
    """``<think>\\n{yaml}\\n</think>``; None → the empty CoT of the CFG prompt."""
    import yaml

    meta = cot_metadata(inputs, style) if inputs is not None else {}
    body = yaml.dump(meta, allow_unicode=True, sort_keys=True).strip() if meta else ""
    return f"{V.THINK}\n{body}\n{V.THINK_END}"


def _user(caption: str, lyrics: str) -> str:
    return f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n"


def generation_prompt(inputs: LMInputs, style: str = ACESTEP) -> str:
    """The prompt up to the assistant turn (upstream's phase-1 prompt; the prefix of the codes prompt)."""
    _check_style(style)
    if style == COMFYUI:
        return _chat(GENERATE_INSTRUCTION, _user(inputs.caption.strip(), inputs.lyrics.strip()))
    return _chat(GENERATE_INSTRUCTION, _user(inputs.caption, inputs.lyrics))


def codes_prompt(inputs: LMInputs, style: str = ACESTEP, *, negative: bool = False) -> str:
    """The prompt the LM continues with audio codes: the closed assistant turn holding the CoT.
    ``negative``: the CFG prompt (same caption and lyrics, empty CoT)."""
    think = cot_text(None if negative else inputs, style)
    return f"{generation_prompt(inputs, style)}{think}\n\n{V.IM_END}\n"


def understand_prompt_parts(codes: Sequence[int]) -> tuple[str, list[int], str]:
    """Upstream's labelling prompt as (text before the codes, the codes, text after)."""
    head = f"{V.IM_START}system\n# Instruction\n{UNDERSTAND_INSTRUCTION}\n\n{V.IM_END}\n{V.IM_START}user\n"
    return head, [int(c) for c in codes], f"{V.IM_END}\n{V.IM_START}assistant\n"


def encode(tokenizer, text: str, style: str = ACESTEP) -> list[int]:
    """Token ids of prompt text: whole for upstream, in ComfyUI's pieces for ComfyUI."""
    _check_style(style)
    if style == COMFYUI:
        return [i for piece in comfy_pieces(text) for i in tokenizer.encode(piece)]
    return tokenizer.encode(text)


def codes_prompt_ids(tokenizer, inputs: LMInputs, style: str = ACESTEP, *, negative: bool = False) -> list[int]:
    return encode(tokenizer, codes_prompt(inputs, style, negative=negative), style)


def understand_prompt_ids(tokenizer, codes: Sequence[int]) -> list[int]:
    head, codes, tail = understand_prompt_parts(codes)
    return tokenizer.encode(head) + tokenizer.code_ids(codes) + tokenizer.encode(tail)


def training_prompt_ids(tokenizer, inputs: LMInputs, style: str = ACESTEP) -> tuple[list[int], list[int]]:
    """What a training sequence holds before the codes: (the generation prompt's ids, the CoT's ids with the end of
    the assistant turn)."""
    return (encode(tokenizer, generation_prompt(inputs, style), style),
            encode(tokenizer, f"{cot_text(inputs, style)}\n\n{V.IM_END}\n", style))


def training_example(tokenizer, inputs: LMInputs, codes: Sequence[int], style: str = ACESTEP) -> TrainingExample:
    """The sequence inference conditions code generation on, completed with the song's codes and ``<|im_end|>``.

    Splits fall on added tokens (``<think>``, ``<|im_end|>``), so the ids equal those of the whole text."""
    prompt, cot = training_prompt_ids(tokenizer, inputs, style)
    tail = tokenizer.code_ids(codes) + [tokenizer.token_id(V.IM_END)]
    ids = prompt + cot + tail
    n_p, n_c = len(prompt), len(cot)
    return TrainingExample(
        ids=ids,
        cot_mask=[n_p <= i < n_p + n_c for i in range(len(ids))],
        code_mask=[i >= n_p + n_c for i in range(len(ids))],
        prompt_len=n_p,
    )
