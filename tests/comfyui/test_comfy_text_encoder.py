"""Which Qwen3 text encoder files ComfyUI's DualCLIPLoader (type ``ace``) loads.

ComfyUI builds ``Qwen3_06B_ACE15`` with fixed sizes (comfy/text_encoders/llama.py: vocabulary 151669, 28 layers,
16 heads / 8 KV heads of 128, MLP 3072) and loads files with ``strict=False``: every tensor in the file must have
the full shape, while tensors missing from it are silently left uninitialised. So a small encoder (the ``tiny``
profile's) cannot be used, and the smallest working file is the full-shape one the ``comfyui-min`` profile writes
(layers 2–27 with zero projections = identity layers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_harness as H

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def test_comfyui_refuses_a_text_encoder_of_another_shape(comfy, tmp_path):
    """Why ``comfyui-min`` writes a full-shape encoder: ComfyUI rejects the small one of the ``tiny`` profile."""
    from safetensors.torch import save_file

    from sidestep_core.text.encoder import qwen_state_dict_to_comfy
    from sidestep_core.tiny import get_profile
    from sidestep_core.tiny.components import text_encoder_state

    prof = get_profile("tiny")
    state = qwen_state_dict_to_comfy(text_encoder_state(prof, 0, prof.vocab_size))
    path = tmp_path / H.TE_NAME
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(RuntimeError, match="size mismatch for model.embed_tokens.weight"):
        comfy.sd.load_clip(ckpt_paths=[str(path), str(path)], clip_type=comfy.sd.CLIPType.ACE)


def test_the_comfyui_min_text_encoder_loads_and_encodes(comfy):
    models = H.write_model_set()
    te = models / "text_encoders"
    clip = comfy.sd.load_clip(ckpt_paths=[str(te / H.TE_NAME), str(te / H.LM_NAME)],
                              clip_type=comfy.sd.CLIPType.ACE)
    tokens = clip.tokenize("sdstp, upbeat pop", lyrics="[verse]\nla la", bpm=120, duration=10.0,
                           timesignature=4, language="en", keyscale="C major", seed=0, generate_audio_codes=False)
    cond = clip.encode_from_tokens_scheduled(tokens)
    caption, extra = cond[0]
    assert caption.shape[0] == 1 and caption.shape[-1] == 1024 and torch.isfinite(caption).all()
    lyrics = extra["conditioning_lyrics"]
    assert lyrics.shape[-1] == 1024 and torch.isfinite(lyrics).all()
    assert "audio_codes" not in extra
    del clip
    comfy.model_management.unload_all_models()


def test_the_running_comfyui_tokenizer_is_found_without_env(comfy, tmp_path, monkeypatch):
    """Inside ComfyUI (a namespace ``comfy`` package, no __file__) the core finds ComfyUI's own Qwen tokenizer."""
    from sidestep_core.text.encoder import COMFY_TOKENIZER_SUBDIR, find_tokenizer

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    elsewhere = tmp_path / "models" / "diffusion_models" / "x.safetensors"
    elsewhere.parent.mkdir(parents=True)
    found = find_tokenizer(near=elsewhere)
    assert found.as_posix().endswith(COMFY_TOKENIZER_SUBDIR.as_posix())
    comfy_root = Path(comfy.sd.__file__).resolve().parents[1]
    assert found.resolve() == (comfy_root / COMFY_TOKENIZER_SUBDIR).resolve()
