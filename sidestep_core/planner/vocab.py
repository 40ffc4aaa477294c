"""The planner LM's token layout: Qwen3's text vocabulary, its special tokens, then one token per audio code.

The released LMs (and ComfyUI, which hard-codes the range) put ``<|audio_code_0|>`` right after Qwen3's last special
token ``</think>`` (151668) and size the embedding table 217,204 rows; the FSQ audio tokenizer's codebook is the
product of its levels (8·8·8·5·5·5 = 64,000), so codes take ids 151,669 … 215,668.
"""

from __future__ import annotations

import math

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK = "<think>"
THINK_END = "</think>"

# Qwen3's added tokens from 151643 on, in id order; the first 14 are "special" (skipped when decoding).
QWEN3_ADDED_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", THINK, THINK_END,
)
QWEN3_SPECIAL_COUNT = 14
FIRST_ADDED_ID = 151643
AUDIO_CODE_OFFSET = FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS)  # 151669, ComfyUI's audio_start_id
FSQ_LEVELS = (8, 8, 8, 5, 5, 5)
CODEBOOK_SIZE = math.prod(FSQ_LEVELS)  # 64000
LM_VOCAB_ROWS = 217204  # embedding rows of the released LMs (ComfyUI's Qwen3_2B/4B_ACE15_lm configs)

def code_token(code: int) -> str:
    return f"<|audio_code_{code}|>"
