"""The planner LM loads from every real layout to the same model, with its tokenizer and clear errors."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sidestep_core.planner import vocab as V
from sidestep_core.planner.loading import PlannerError, find_planner, load_planner, load_planner_tokenizer, size_name
from sidestep_core.text.encoder import load_text_encoder
from sidestep_core.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def lm_layouts(tmp_path_factory, tiny_with_lm):
    root = tmp_path_factory.mktemp("lm_layouts")
    return {
        "original": tiny_with_lm,
        "comfyui-split": make_tiny_checkpoint(root / "split", "comfyui-split", "tiny", 0, lm=True),
        "comfyui-aio": make_tiny_checkpoint(root / "aio", "comfyui-aio", "tiny", 0, lm=True),
    }


def _comfy_tokenizer() -> Path | None:
    root = os.environ.get("COMFYUI_DIR")
    p = Path(root) / "comfy" / "text_encoders" / "qwen25_tokenizer" if root else None
    return p if p is not None and (p / "vocab.json").is_file() else None


def test_real_files_and_token_layout(lm_layouts):
    folder = lm_layouts["original"].planner
    assert folder.name == "acestep-5Hz-lm-1.7B"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        assert (folder / name).is_file(), name
    assert lm_layouts["comfyui-split"].planner.name == "qwen_1.7b_ace15.safetensors"
    # ComfyUI's names: model.* without lm_head (tied); in the AIO under qwen3_2b next to the 0.6B encoder
    keys = load_file(str(lm_layouts["comfyui-split"].planner)).keys()
    assert "model.embed_tokens.weight" in keys and not any(k.startswith("lm_head") for k in keys)
    aio = load_file(str(lm_layouts["comfyui-aio"].planner))
    assert aio["text_encoders.qwen3_2b.transformer.model.embed_tokens.weight"].shape[0] == V.LM_VOCAB_ROWS
    planner = load_planner(folder)
    tok = planner.tokenizer
    assert tok.has_code_tokens and tok.code_offset == V.AUDIO_CODE_OFFSET == 151669
    assert tok.codebook_size == V.CODEBOOK_SIZE == 64000
    assert tok.token_id(V.IM_END) == 151645 and tok.token_id(V.THINK_END) == 151668
    assert tok.encode("<|audio_code_63999|>") == [215668]
    ids = tok.encode("# Caption\ncalm piano") + tok.code_ids([0, 7, 63999])
    assert tok.decode(ids) == "# Caption\ncalm piano<|audio_code_0|><|audio_code_7|><|audio_code_63999|>"
    assert tok.codes_from_ids(ids) == [0, 7, 63999]
    with pytest.raises(PlannerError, match="outside the LM's codebook"):
        tok.code_ids([64000])


def test_every_layout_loads_the_same_lm(lm_layouts):
    ids = torch.tensor([[151644, 3, 4, 5, 151645, 151669 + 12, 151669 + 63999]])
    loaded = {name: load_planner(ck.planner) for name, ck in lm_layouts.items()}
    assert {p.layout for p in loaded.values()} == {"original", "comfyui", "comfyui-aio"}
    ref = loaded["original"]
    assert ref.size == "hidden-32" and ref.vocab_rows == V.LM_VOCAB_ROWS
    assert ref.model.lm_head.weight is ref.model.model.embed_tokens.weight  # tied, as the released LMs
    logits = ref.model(ids).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    for name, p in loaded.items():
        assert torch.equal(p.model(ids).logits, logits), name
        # the tiny tokenizer was written beside the ComfyUI files (ComfyUI itself uses its own)
        assert p.tokenizer.encode("# Lyric\n[verse]") == ref.tokenizer.encode("# Lyric\n[verse]"), name


def test_checkpoint_roots_find_their_lm(lm_layouts):
    assert find_planner(lm_layouts["original"].root) == lm_layouts["original"].planner
    assert find_planner(lm_layouts["original"].dit) == lm_layouts["original"].planner
    split = lm_layouts["comfyui-split"]
    assert find_planner(split.dit) == split.planner  # the DiT file → models/text_encoders/qwen_1.7b_ace15
    assert find_planner(lm_layouts["comfyui-aio"].dit) == lm_layouts["comfyui-aio"].dit
    assert load_planner(split.root).path == split.planner
    # the text encoder still loads from an all-in-one file that also holds the LM
    te = load_text_encoder(lm_layouts["comfyui-aio"].text_encoder)
    assert te.embed_tokens.weight.shape[1] == 32


def test_comfyui_tokenizer_places_codes_by_offset(lm_layouts):
    tok_dir = _comfy_tokenizer()
    if tok_dir is None:
        pytest.skip("needs COMFYUI_DIR (ComfyUI's qwen25_tokenizer)")
    p = load_planner(lm_layouts["comfyui-split"].planner, tokenizer=tok_dir)
    tok = p.tokenizer
    assert not tok.has_code_tokens and tok.code_offset == 151669 and tok.codebook_size == 64000
    assert tok.token_id(V.IM_START) == 151644 and tok.token_id(V.THINK) == 151667
    assert tok.decode(tok.encode("hi") + tok.code_ids([5])) == "hi<|audio_code_5|>"


def test_tokenizer_errors_are_the_planners(tmp_path, lm_layouts):
    # the text encoder's tokenizer loader underneath; its errors reach planner users as PlannerError, path first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlannerError, match=f"^{empty}: not a tokenizer folder"):
        load_planner_tokenizer(empty)
    broken = tmp_path / "broken"
    shutil.copytree(lm_layouts["original"].planner, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(PlannerError, match=f"^{broken}: cannot load tokenizer"):
        load_planner_tokenizer(broken)


def test_size_names():
    assert [size_name(h) for h in (1024, 2048, 2560, 32)] == ["0.6B", "1.7B", "4B", "hidden-32"]


def test_clear_errors(tmp_path, monkeypatch, lm_layouts, tiny_original):
    with pytest.raises(PlannerError, match="acestep-5Hz-lm-1.7B.*qwen_1.7b_ace15.safetensors"):
        find_planner(tiny_original)
    with pytest.raises(PlannerError, match="no such file"):
        load_planner(tmp_path / "missing")
    te_file = lm_layouts["comfyui-split"].text_encoder  # qwen_0.6b_ace15: same architecture, no code rows
    with pytest.raises(PlannerError, match="text encoder is not the LM"):
        load_planner(te_file)
    lonely = tmp_path / "models" / "text_encoders" / "qwen_1.7b_ace15.safetensors"
    lonely.parent.mkdir(parents=True)
    shutil.copy(lm_layouts["comfyui-split"].planner, lonely)
    # no ComfyUI to borrow a tokenizer from: none configured, and not the one the ComfyUI tests imported
    for var in ("COMFYUI_DIR", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    with pytest.raises(PlannerError, match="no tokenizer for the planner LM"):
        load_planner(lonely)
    monkeypatch.undo()
    # a tokenizer whose codes do not fit the LM: an LM cut to fewer rows than the codes need
    state = load_file(str(lonely))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:151700].clone()
    save_file(state, str(lonely))
    with pytest.raises(PlannerError, match="does not belong to this LM"):
        load_planner(lonely, tokenizer=lm_layouts["original"].planner)
