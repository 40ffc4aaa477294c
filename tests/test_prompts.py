"""Prompts token for token: ``acestep`` (official pipeline) and ``comfyui`` (TextEncodeAceStepAudio1.5).

Expected strings are written out here from the documented templates (acestep15.md §4, ComfyUI's ace15.py), not
produced by the code under test.
"""

from __future__ import annotations

import pytest

from preprocess_helpers import comfyui_dir, tiny_checkpoint
from sidestep_core.text import prompts as P
from sidestep_core.text.encoder import COMFY_TOKENIZER_SUBDIR, is_tokenizer_dir, load_tokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_checkpoint("original").tokenizer_dir)


def _tokenizers(tok):
    out = [("tiny", tok)]
    root = comfyui_dir()
    if root is not None and is_tokenizer_dir(root / COMFY_TOKENIZER_SUBDIR):
        out.append(("qwen", load_tokenizer(root / COMFY_TOKENIZER_SUBDIR)))  # the real Qwen vocabulary
    return out


SAMPLE = P.PromptInputs(
    caption="dreamy synth pop, female vocals",
    lyrics="[verse]\nneon lights\n[chorus]\nhold on",
    language="en",
    duration=30.7,
    bpm="120",
    keyscale="C major",
    timesignature="4",
)


def test_acestep_caption_and_lyrics_token_for_token(tok):
    text = (
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
        "# Caption\ndreamy synth pop, female vocals\n\n"
        "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n"
        "<|endoftext|>\n"
    )
    lyric = "# Languages\nen\n\n# Lyric\n[verse]\nneon lights\n[chorus]\nhold on<|endoftext|>"
    for name, t in _tokenizers(tok):
        eot = t.token_id(EOT)
        out = P.tokenize(t, SAMPLE, P.ACESTEP)
        assert out.text_prompt == text and out.lyric_prompt == lyric
        # the Qwen3-Embedding tokenizer appends one <|endoftext|> to everything it encodes
        assert out.text_ids == t.encode(text) + [eot], name
        assert out.lyric_ids == t.encode(lyric) + [eot], name
        assert out.text_ids[-3:] == [eot] + t.encode("\n") + [eot]


def test_acestep_matches_a_tokenizer_that_appends_eos_itself(tok, tmp_path):
    """Upstream calls ``tokenizer(prompt, truncation=True, max_length=256)`` on Qwen3-Embedding's tokenizer, whose
    post-processor appends <|endoftext|>; building the ids explicitly must give the same sequence."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tiny_checkpoint("original").tokenizer_dir / "tokenizer.json"))
    eot = raw.token_to_id(EOT)
    raw.post_processor = processors.TemplateProcessing(single=f"$A {EOT}", special_tokens=[(EOT, eot)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOT, pad_token=EOT)
    long = P.PromptInputs(caption="word " * 400, lyrics="la " * 3000, language="en", duration=12)
    for inputs in (SAMPLE, long):
        ours = P.tokenize(tok, inputs, P.ACESTEP)
        assert ours.text_ids == hf(ours.text_prompt, truncation=True, max_length=256)["input_ids"]
        assert ours.lyric_ids == hf(ours.lyric_prompt, truncation=True, max_length=2048)["input_ids"]
    cut = P.tokenize(tok, long, P.ACESTEP)
    assert len(cut.text_ids) == 256 and len(cut.lyric_ids) == 2048 and cut.text_ids[-1] == eot


def test_comfyui_caption_and_lyrics_token_for_token(tok):
    text = (
        "# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
        "# Caption\ndreamy synth pop, female vocals\n\n"
        "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 31 seconds\n"
        "<|endoftext|>\n<|endoftext|>"
    )
    lyric = "# Languages\nen\n\n# Lyric\n[verse]\nneon lights\n[chorus]\nhold on<|endoftext|><|endoftext|>"
    for name, t in _tokenizers(tok):
        eot = t.token_id(EOT)
        out = P.tokenize(t, SAMPLE, P.COMFYUI)
        assert out.text_prompt == text and out.lyric_prompt == lyric
        assert out.text_ids == t.encode(text), name  # nothing appended, nothing cut
        assert out.lyric_ids == t.encode(lyric), name
        assert out.text_ids.count(eot) == 2 and out.text_ids[-1] == eot
        assert out.lyric_ids[-2:] == [eot, eot]


def test_comfyui_strips_the_caption_and_rounds_duration_up(tok):
    p = P.PromptInputs(caption="  lofi beat \n", lyrics="[Instrumental]", language="en", duration=10.01)
    text = P.caption_prompt(p, P.COMFYUI)
    assert ("# Caption\nlofi beat\n\n# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n"
            "- duration: 11 seconds\n") in text
    ace = P.caption_prompt(p, P.ACESTEP)
    assert "# Caption\n  lofi beat \n\n\n# Metas" in ace and "- duration: 10 seconds\n" in ace


def test_duration_is_never_zero():
    short = P.PromptInputs(caption="x", lyrics="y", language="en", duration=0.3)
    assert "- duration: 1 seconds" in P.caption_prompt(short, P.ACESTEP)
    assert "- duration: 1 seconds" in P.caption_prompt(short, P.COMFYUI)


def test_comfy_embedding_pieces():
    assert P.comfy_pieces("plain caption, no refs") == ["plain caption, no refs"]
    # ComfyUI splits before " embedding:" and drops a name it cannot load, keeping the words after it
    assert P.comfy_pieces("a song embedding:mystyle with drums") == ["a song", "with drums"]
    assert P.comfy_pieces("intro\nembedding:x") == ["intro"]
    assert P.comfy_pieces("embedding:x at start") == ["at start"]  # at the very start it is a reference too


def test_default_languages_and_styles():
    assert P.DEFAULT_LANGUAGE == {"acestep": "unknown", "comfyui": "en"}
    with pytest.raises(ValueError, match="prompt style"):
        P.caption_prompt(SAMPLE, "other")
