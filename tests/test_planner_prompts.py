"""Planner prompts token for token as upstream's LM inference and ComfyUI's ACE-Step 1.5 encoder build them
(goldens made by running their code: tests/data/README.md), and the training sequence built on them."""

import json
import os
from pathlib import Path

import pytest

from sidestep_core.planner.loading import load_planner_tokenizer
from sidestep_core.planner.prompts import (
    LMInputs,
    codes_prompt,
    codes_prompt_ids,
    cot_text,
    generation_prompt,
    training_example,
    understand_prompt_ids,
)

DATA = Path(__file__).parent / "data"


def _inputs(case: dict) -> LMInputs:
    return LMInputs(caption=case["caption"], lyrics=case["lyrics"], bpm=case["bpm"], keyscale=case["keyscale"],
                    timesignature=case["timesignature"], duration=case["duration"], language=case["language"])


@pytest.fixture(scope="module")
def tiny_tok(tiny_with_lm):
    return load_planner_tokenizer(tiny_with_lm.planner)


@pytest.fixture(scope="module")
def comfy_tok():
    root = os.environ.get("COMFYUI_DIR")
    folder = Path(root) / "comfy" / "text_encoders" / "qwen25_tokenizer" if root else None
    if folder is None or not folder.is_dir():
        pytest.skip("needs COMFYUI_DIR (ComfyUI's own Qwen tokenizer)")
    return load_planner_tokenizer(folder)


def test_upstream_prompts(tiny_tok):
    golden = json.loads((DATA / "planner_prompts_upstream.json").read_text())
    assert golden["provenance"]["commit"].startswith("68ef61d")
    for case in golden["cases"]:
        inputs = _inputs(case)
        assert cot_text(inputs, "acestep") == case["cot"], case["name"]
        assert generation_prompt(inputs, "acestep") == case["texts"]["generation"], case["name"]
        assert codes_prompt(inputs, "acestep") == case["texts"]["codes"], case["name"]
        assert codes_prompt(inputs, "acestep", negative=True) == case["texts"]["codes_negative"], case["name"]
        assert codes_prompt_ids(tiny_tok, inputs, "acestep") == case["ids"]["codes"], case["name"]
        assert codes_prompt_ids(tiny_tok, inputs, "acestep", negative=True) == case["ids"]["codes_negative"]
    u = golden["understand"]
    assert understand_prompt_ids(tiny_tok, u["codes"]) == u["ids"]


def test_comfyui_prompts(comfy_tok):
    golden = json.loads((DATA / "planner_prompts_comfyui.json").read_text())
    assert golden["provenance"]["comfyui_version"] == "0.27.0"
    for case in golden["cases"]:
        inputs = _inputs(case)
        assert codes_prompt_ids(comfy_tok, inputs, "comfyui") == case["ids"]["codes"], case["name"]
        assert codes_prompt_ids(comfy_tok, inputs, "comfyui", negative=True) == case["ids"]["codes_negative"]


def test_the_styles_differ_where_the_front_ends_do():
    golden = json.loads((DATA / "planner_prompts_upstream.json").read_text())
    inputs = _inputs(golden["cases"][2])
    up, comfy = codes_prompt(inputs, "acestep"), codes_prompt(inputs, "comfyui")
    assert "language: en" in up and "caption:" in up and "language" not in comfy.split("<think>")[1]
    assert "# Caption\nlofi hip hop" in comfy and "# Caption\n  lofi" in up  # ComfyUI strips the caption
    with pytest.raises(ValueError, match="unknown prompt style"):
        codes_prompt(inputs, "other")


def test_training_example_is_the_codes_prompt_completed(tiny_tok):
    golden = json.loads((DATA / "planner_prompts_upstream.json").read_text())
    case = golden["cases"][0]
    codes = [3, 0, 63999, 42]
    ex = training_example(tiny_tok, _inputs(case), codes, "acestep")
    assert ex.ids == case["ids"]["codes"] + [151669 + c for c in codes] + [151645]
    assert ex.ids[:ex.prompt_len] == tiny_tok.encode(case["texts"]["generation"])
    assert sum(ex.code_mask) == len(codes) + 1 and all(ex.code_mask[-5:])
    cot = [i for i, m in zip(ex.ids, ex.cot_mask) if m]
    assert tiny_tok.decode(cot) == case["cot"] + "\n\n<|im_end|>\n"
    assert not any(c and m for c, m in zip(ex.cot_mask, ex.code_mask))
