"""Preprocessing against ComfyUI itself: the ``comfyui`` prompt style against ``ACE15Tokenizer`` (the tokenizer
of TextEncodeAceStepAudio1.5) token for token, and our VAE / text-encoder key mappings against ComfyUI's modules
at full size."""

from __future__ import annotations

import pytest

from sidestep_core.text import prompts as P
from sidestep_core.text.encoder import COMFY_TOKENIZER_SUBDIR, load_tokenizer

CASES = [
    dict(caption="dreamy synth pop, female vocals", lyrics="[verse]\nneon lights\n[chorus]\nhold on", language="en",
         duration=30.7, bpm=120, keyscale="C major", timesignature=4),
    dict(caption="  lofi beat with vinyl crackle \n", lyrics="[Instrumental]", language="ja", duration=8.0,
         bpm=84, keyscale="A minor", timesignature=3),
    dict(caption="a song embedding:missing_style with brass", lyrics="la la (la) \\(x\\)", language="unknown",
         duration=119.2, bpm=174, keyscale="F# minor", timesignature=6),
]


@pytest.mark.comfyui
@pytest.mark.parametrize("case", CASES, ids=["plain", "whitespace", "embedding-ref"])
def test_comfyui_style_matches_ace15_tokenizer(comfy, case, tmp_path):
    import comfy.text_encoders.ace15 as ace15

    # An embeddings folder exists in a running ComfyUI; without one, "embedding:" text is tokenized as words.
    theirs = ace15.ACE15Tokenizer(embedding_directory=str(tmp_path)).tokenize_with_weights(
        case["caption"], lyrics=case["lyrics"], bpm=case["bpm"], duration=case["duration"],
        timesignature=case["timesignature"], language=case["language"], keyscale=case["keyscale"],
        seed=0, generate_audio_codes=False,
    )
    tok = load_tokenizer(comfy.dir / COMFY_TOKENIZER_SUBDIR)
    inputs = P.PromptInputs(
        caption=case["caption"], lyrics=case["lyrics"], language=case["language"], duration=case["duration"],
        bpm=str(case["bpm"]), keyscale=case["keyscale"], timesignature=str(case["timesignature"]),
    )
    ours = P.tokenize(tok, inputs, P.COMFYUI)
    assert ours.text_ids == [t for t, _ in theirs["qwen3_06b"][0]]
    assert ours.lyric_ids == [t for t, _ in theirs["lyrics"][0]]


@pytest.mark.comfyui
def test_text_encoder_names_match_comfyui_at_full_size(comfy):
    """Our mapping of a full-size Qwen3-Embedding-0.6B gives exactly the keys and shapes ComfyUI's ACE-Step 1.5
    text encoder has, in the split file and under the all-in-one prefix."""
    import torch
    import comfy.text_encoders.ace15 as ace15
    from transformers import Qwen3Config, Qwen3Model

    from sidestep_core.text.encoder import qwen_state_dict_to_comfy

    with torch.device("meta"):
        theirs = ace15.te(lm_model=None)(device="meta", dtype=torch.bfloat16).state_dict()
        ours = Qwen3Model(Qwen3Config(
            vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        )).state_dict()
    theirs = {k: tuple(v.shape) for k, v in theirs.items() if not k.endswith("logit_scale")}
    aio = {k: tuple(v.shape) for k, v in qwen_state_dict_to_comfy(ours, aio=True).items()}
    assert aio == {"text_encoders." + k: s for k, s in theirs.items()}
    split = qwen_state_dict_to_comfy(ours)
    assert set(split) == {k.removeprefix("qwen3_06b.transformer.") for k in theirs}


@pytest.mark.comfyui
def test_vae_names_match_comfyui_at_full_size(comfy):
    """The real ACE-Step VAE geometry mapped to ComfyUI names equals ComfyUI's AudioOobleckVAE, which ComfyUI
    builds (48 kHz, hop 1920) when it detects those names."""
    import torch
    from comfy.ldm.audio.autoencoder import AudioOobleckVAE

    from sidestep_core.vae import build_vae, vae_state_dict_to_comfy

    config = {"encoder_hidden_size": 128, "downsampling_ratios": [2, 4, 4, 6, 10],
              "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 128, "decoder_input_channels": 64,
              "audio_channels": 2, "sampling_rate": 48000}
    ours = vae_state_dict_to_comfy(build_vae(config, device="meta").state_dict())
    with torch.device("meta"):
        theirs = AudioOobleckVAE(strides=[2, 4, 4, 6, 10]).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours["decoder.layers.2.layers.1.parametrizations.weight.original1"].shape[-1] == 12
