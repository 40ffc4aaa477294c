"""Architectures of the tiny checkpoints.

``tiny`` builds and runs in seconds on CPU; ``tiny-xl`` is the same size with the XL architecture (a decoder wider
than its condition encoder, attention wider than the decoder, so upstream's ``xl_*`` modeling files apply).
``comfyui-min`` is the smallest model ComfyUI itself loads: its ACE-Step 1.5
implementation fixes head_dim 128, 8 KV heads, an encoder 2048 wide with 8 lyric / 4 timbre layers, a 1024-wide text
input and 6144-wide tokenizer/detokenizer MLPs, so only the decoder and the encoder MLP shrink; its VAE and Qwen3
text encoder are built with fixed sizes, so those two are full-size (the text encoder's extra layers are identities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..model.config import AceStepConfig
from . import PROFILES



@dataclass(frozen=True)
class TextEncoderShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    # Layers from this index on get zero projections, i.e. are identity layers (cheap to make, exact to run).
    random_layers: Optional[int] = None
    # Rows of the embedding table when it must be larger than the tiny tokenizer's vocabulary.
    embedding_rows: Optional[int] = None


@dataclass(frozen=True)
class VaeShape:
    # diffusers Oobleck ties the first conv's width to 2 × latent channels, so encoder_hidden_size stays 128.
    encoder_hidden_size: int
    decoder_channels: int
    channel_multiples: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    dit: AceStepConfig
    text_encoder: TextEncoderShape
    vae: VaeShape
    vocab_size: int  # BPE vocabulary of the tiny tokenizer (special tokens included)


# The tiny decoder; tiny-xl changes only what gives it XL's proportions.
_TINY_DIT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    text_hidden_dim=32,
    num_lyric_encoder_hidden_layers=2,
    num_timbre_encoder_hidden_layers=2,
    num_attention_pooler_hidden_layers=1,
    fsq_dim=64,
    is_turbo=True,
    model_version="turbo",
)
_TINY_TE = TextEncoderShape(32, 2, 4, 2, 8, 64)
_TINY_VAE = VaeShape(128, 8, (1, 1, 1, 1, 1))


def get_profile(name: str) -> Profile:
    if name == "tiny":
        return Profile(AceStepConfig(**_TINY_DIT), _TINY_TE, _TINY_VAE, vocab_size=512)
    if name == "tiny-xl":
        # XL proportions at tiny size: decoder 96 wide with 8 × 16 attention, encoder/tokenizer 64 wide.
        dit = AceStepConfig(**{
            **_TINY_DIT,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_attention_heads": 8,
            "encoder_hidden_size": 64,
            "encoder_intermediate_size": 128,
            "encoder_num_attention_heads": 4,
            "encoder_num_key_value_heads": 2,
        })
        return Profile(dit, _TINY_TE, _TINY_VAE, vocab_size=512)
    if name == "comfyui-min":
        dit = AceStepConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=128,
            text_hidden_dim=1024,
            num_lyric_encoder_hidden_layers=8,
            num_timbre_encoder_hidden_layers=4,
            num_attention_pooler_hidden_layers=2,
            fsq_dim=2048,
            encoder_hidden_size=2048,
            encoder_intermediate_size=256,
            encoder_num_attention_heads=8,
            encoder_num_key_value_heads=8,
            tokenizer_intermediate_size=6144,
            tokenizer_num_attention_heads=16,
            is_turbo=True,
            model_version="turbo",
        )
        # ComfyUI builds its Qwen3 0.6B encoder with fixed sizes and needs every tensor at full shape, so this one
        # has the real shape; layers past the second are identities.
        te = TextEncoderShape(1024, 28, 16, 8, 128, 3072, random_layers=2, embedding_rows=151669)
        # ComfyUI builds the VAE from fixed sizes, so this one is the full-size Oobleck.
        return Profile(dit, te, VaeShape(128, 128, (1, 2, 4, 8, 16)), vocab_size=1024)
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
