"""Qwen3 text encoder: ComfyUI key mapping, loading from every layout, tokenizer discovery, the two branches."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from preprocess_helpers import comfyui_dir, tiny_checkpoint
from sidestep_core.text import encoder as E


def _hf_names():
    from sidestep_core.model.loading import read_header

    folder = tiny_checkpoint("original").text_encoder
    return [k for k in read_header(folder / "model.safetensors") if k != "__metadata__"]


def test_comfy_mapping_names_and_round_trip():
    sd = {k: torch.full((1,), float(i)) for i, k in enumerate(_hf_names())}
    comfy = E.qwen_state_dict_to_comfy(sd)
    assert "model.embed_tokens.weight" in comfy
    assert "model.layers.0.self_attn.q_norm.weight" in comfy
    assert "model.layers.1.post_attention_layernorm.weight" in comfy  # ComfyUI's ACE15TEModel.load_sd checks this
    assert "model.norm.weight" in comfy
    aio = E.qwen_state_dict_to_comfy(sd, aio=True)
    assert "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.gate_proj.weight" in aio
    for mapped in (comfy, aio):
        back = E.qwen_state_dict_from_comfy(mapped)
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_from_comfy_picks_the_small_encoder_in_an_all_in_one_file():
    sd = {k: torch.zeros(1) for k in _hf_names()}
    mixed = {**E.qwen_state_dict_to_comfy(sd, aio=True)}
    mixed.update({"text_encoders.qwen3_2b.transformer.model." + k: torch.ones(1) for k in sd})  # the 5 Hz LM
    mixed["model.diffusion_model.decoder.x"] = torch.zeros(1)
    mixed["vae.encoder.layers.0.bias"] = torch.zeros(1)
    back = E.qwen_state_dict_from_comfy(mixed)
    assert set(back) == set(sd) and all(float(v) == 0 for v in back.values())
    # lm_head of a causal-LM dump is dropped on the way to ComfyUI, which has none for the 0.6B encoder
    assert "lm_head.weight" not in E.qwen_state_dict_to_comfy({"lm_head.weight": torch.zeros(1), **sd})


@pytest.mark.slow
def test_loads_identically_from_every_layout():
    ids = [3, 17, 42, 5, 0]
    outs = {}
    for layout in ("original", "comfyui-split", "comfyui-aio"):
        model = E.load_text_encoder(tiny_checkpoint(layout).text_encoder)
        assert not any(p.is_meta for p in model.parameters())
        x = torch.tensor([ids])
        with torch.no_grad():
            outs[layout] = (model(input_ids=x).last_hidden_state, model.embed_tokens(x))
    ref = outs["original"]
    for layout, (hidden, emb) in outs.items():
        assert hidden.shape == (1, 5, 32)
        assert torch.equal(hidden, ref[0]), layout
        assert torch.equal(emb, ref[1]), layout


def test_config_inferred_from_shapes_matches_the_folder_config():
    from sidestep_core.model.loading import read_header, tensor_shapes

    folder = tiny_checkpoint("original").text_encoder
    cfg = E.qwen3_config_from_shapes(tensor_shapes(read_header(folder / "model.safetensors")))
    stored = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size"):
        assert getattr(cfg, key) == stored[key], key


def test_text_encoder_branches():
    ck = tiny_checkpoint("original")
    enc = E.TextEncoder(E.load_text_encoder(ck.text_encoder), E.load_tokenizer(ck.tokenizer_dir))
    ids = enc.tokenizer.encode("# Caption\nrock<|endoftext|>")
    assert ids[-1] == enc.tokenizer.token_id("<|endoftext|>")
    cap = enc.encode_caption(ids)
    lyr = enc.embed_lyrics(ids)
    assert cap.shape == lyr.shape == (len(ids), 32) and cap.dtype == torch.float32
    # the lyric branch is the embedding table only; the caption branch runs the layers and the final norm
    assert torch.equal(lyr, enc.model.embed_tokens.weight[ids].float())
    assert not torch.allclose(cap, lyr)
    with pytest.raises(E.TextEncoderError, match="outside the text encoder's vocabulary"):
        enc.check_ids([10**6], "caption")


def test_find_text_encoder_and_tokenizer_for_each_layout():
    orig = tiny_checkpoint("original")
    assert E.find_text_encoder(orig.root) == orig.text_encoder
    assert E.find_text_encoder(orig.dit) == orig.text_encoder
    assert E.find_tokenizer(text_encoder=orig.text_encoder, near=orig.dit) == orig.text_encoder
    split = tiny_checkpoint("comfyui-split")
    assert E.find_text_encoder(split.dit) == split.text_encoder
    assert E.find_tokenizer(text_encoder=split.text_encoder, near=split.dit) == split.tokenizer_dir
    aio = tiny_checkpoint("comfyui-aio")
    assert E.find_text_encoder(aio.dit) == aio.dit
    assert E.find_tokenizer(text_encoder=aio.dit, near=aio.dit) == aio.tokenizer_dir


def test_tokenizer_from_a_comfyui_installation(tmp_path, monkeypatch):
    """Inside a ComfyUI tree the tokenizer ComfyUI itself uses is found above the model file."""
    src = tiny_checkpoint("comfyui-split")
    root = tmp_path / "ComfyUI"
    (root / "models" / "text_encoders").mkdir(parents=True)
    te = root / "models" / "text_encoders" / "qwen_0.6b_ace15.safetensors"
    shutil.copy(src.text_encoder, te)
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delitem(sys.modules, "comfy", raising=False)  # a ComfyUI the ComfyUI tests imported in this process
    with pytest.raises(E.TextEncoderError, match="no tokenizer found.*--tokenizer"):
        E.find_tokenizer(text_encoder=te, near=te)
    tok_dir = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    shutil.copytree(src.tokenizer_dir, tok_dir)
    assert E.find_tokenizer(text_encoder=te, near=te) == tok_dir
    with pytest.raises(E.TextEncoderError, match="not a tokenizer folder"):
        E.find_tokenizer(tmp_path / "nothing")


def test_comfyui_vocab_merges_tokenizer_loads():
    root = comfyui_dir()
    if root is None or not E.is_tokenizer_dir(root / E.COMFY_TOKENIZER_SUBDIR):
        pytest.skip("no ComfyUI source tree with qwen25_tokenizer")
    tok = E.load_tokenizer(root / E.COMFY_TOKENIZER_SUBDIR)
    assert tok.token_id("<|endoftext|>") == 151643  # Qwen's pad / end-of-text id
    assert tok.encode("# Caption\n") == tok.encode("# Caption\n")


def test_errors_name_the_path(tmp_path):
    bad = tmp_path / "te.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(E.TextEncoderError, match="te.safetensors"):
        E.load_text_encoder(bad)
    with pytest.raises(E.TextEncoderError, match=str(tmp_path)):
        E.load_text_encoder(tmp_path)
