"""Caption and lyric prompts, token for token as the two inference front ends build them.

``acestep`` (default) — the official ACE-Step 1.5 pipeline:
  caption: ``# Instruction\\n{instruction}\\n\\n# Caption\\n{caption}\\n\\n# Metas\\n{metas}<|endoftext|>\\n`` with
  metas ``- bpm: …\\n- timesignature: …\\n- keyscale: …\\n- duration: {int} seconds\\n`` (N/A when unknown);
  lyrics: ``# Languages\\n{language}\\n\\n# Lyric\\n{lyrics}<|endoftext|>``. The Qwen3-Embedding tokenizer appends
  one more ``<|endoftext|>`` to every encoded text (its post-processor); it is added here explicitly so any
  tokenizer folder gives the same ids. Captions are cut at 256 tokens and lyrics at 2048, the end token kept.

``comfyui`` — ComfyUI's ``TextEncodeAceStepAudio1.5`` node:
  caption: ``# Instruction\\nGenerate audio semantic tokens based on the given conditions:\\n\\n# Caption\\n{caption}``
  ``\\n\\n# Metas\\n{metas}\\n<|endoftext|>\\n<|endoftext|>`` with metas lines joined by ``\\n`` and the duration
  rounded up; lyrics: ``# Languages\\n{language}\\n\\n# Lyric\\n{lyrics}<|endoftext|><|endoftext|>``. Nothing is
  appended or truncated, and text is tokenized the way ComfyUI's tokenizer wrapper splits it (see
  :func:`comfy_pieces`).

Both styles give all-ones attention masks: a single prompt has no padding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

ACESTEP = "acestep"
COMFYUI = "comfyui"
PROMPT_STYLES = (ACESTEP, COMFYUI)
ENDOFTEXT = "<|endoftext|>"
ACESTEP_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
COMFYUI_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
TEXT_MAX_TOKENS = 256
LYRIC_MAX_TOKENS = 2048
INSTRUMENTAL = "[Instrumental]"
# Language used when a sample names none: upstream's "unknown", ComfyUI's node default "en".
DEFAULT_LANGUAGE = {ACESTEP: "unknown", COMFYUI: "en"}
_COMFY_EMBEDDING = "embedding:"


@dataclass(frozen=True)
class PromptInputs:
    caption: str
    lyrics: str
    language: str
    duration: float  # seconds of audio actually encoded
    bpm: Optional[str] = None
    keyscale: Optional[str] = None
    timesignature: Optional[str] = None


@dataclass(frozen=True)
class PromptTokens:
    text_prompt: str
    lyric_prompt: str
    text_ids: list[int]
    lyric_ids: list[int]


def _meta(value: Optional[str]) -> str:
    return "N/A" if value is None or str(value).strip() == "" else str(value)


def caption_prompt(p: PromptInputs, style: str = ACESTEP) -> str:
    if style == ACESTEP:
        seconds = max(1, int(p.duration))  # upstream formats the duration with int()
        metas = (
            f"- bpm: {_meta(p.bpm)}\n- timesignature: {_meta(p.timesignature)}\n"
            f"- keyscale: {_meta(p.keyscale)}\n- duration: {seconds} seconds\n"
        )
        return f"# Instruction\n{ACESTEP_INSTRUCTION}\n\n# Caption\n{p.caption}\n\n# Metas\n{metas}{ENDOFTEXT}\n"
    if style == COMFYUI:
        seconds = max(1, math.ceil(p.duration))  # the node rounds the duration up
        metas = "\n".join(
            [
                f"- bpm: {_meta(p.bpm)}",
                f"- timesignature: {_meta(p.timesignature)}",
                f"- keyscale: {_meta(p.keyscale)}",
                f"- duration: {seconds} seconds",
            ]
        )
        return (
            f"# Instruction\n{COMFYUI_INSTRUCTION}\n\n# Caption\n{p.caption.strip()}\n\n# Metas\n{metas}\n"
            f"{ENDOFTEXT}\n{ENDOFTEXT}"
        )
    raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def lyric_prompt(p: PromptInputs, style: str = ACESTEP) -> str:
    if style == ACESTEP:
        return f"# Languages\n{p.language}\n\n# Lyric\n{p.lyrics}{ENDOFTEXT}"
    if style == COMFYUI:
        return f"# Languages\n{p.language}\n\n# Lyric\n{p.lyrics}{ENDOFTEXT}{ENDOFTEXT}"
    raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def comfy_pieces(text: str) -> list[str]:
    """The pieces ComfyUI's tokenizer wrapper encodes separately, in order.

    With prompt weights disabled (as the ACE-Step node does) the weight-syntax escapes ``\\(`` and ``\\)`` still
    become plain parentheses, and the text is split only before ``embedding:`` references that follow a space or
    newline. An ``embedding:NAME`` piece loads a textual-inversion file; when none exists ComfyUI drops the name
    and keeps the words after it, whitespace collapsed. Ordinary prompts are one piece.
    """
    text = text.replace("\\)", ")").replace("\\(", "(")
    split = re.split(f" {_COMFY_EMBEDDING}|\n{_COMFY_EMBEDDING}", text)
    pieces = [split[0]] + [_COMFY_EMBEDDING + s for s in split[1:]]
    out = []
    for piece in pieces:
        if piece == "":
            continue
        if piece.startswith(_COMFY_EMBEDDING):
            words = piece[len(_COMFY_EMBEDDING):].strip("\n").split()
            rest = " ".join(words[1:])
            if rest:
                out.append(rest)
            continue
        out.append(piece)
    return out


def tokenize(tokenizer, p: PromptInputs, style: str = ACESTEP) -> PromptTokens:
    """Token ids of both prompts. ``tokenizer.encode(text)`` must add no special tokens of its own."""
    text, lyric = caption_prompt(p, style), lyric_prompt(p, style)
    if style == ACESTEP:
        eot = tokenizer.token_id(ENDOFTEXT)
        text_ids = tokenizer.encode(text)[: TEXT_MAX_TOKENS - 1] + [eot]
        lyric_ids = tokenizer.encode(lyric)[: LYRIC_MAX_TOKENS - 1] + [eot]
    else:
        text_ids = [i for piece in comfy_pieces(text) for i in tokenizer.encode(piece)]
        lyric_ids = [i for piece in comfy_pieces(lyric) for i in tokenizer.encode(piece)]
    return PromptTokens(text, lyric, text_ids, lyric_ids)
