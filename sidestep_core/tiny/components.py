"""Tiny text encoder (Qwen3 + byte-level BPE tokenizer) and tiny Oobleck VAE, in their original folder formats."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .profiles import Profile
from .weights import bf16_exact, seeded_state_dict

# Special tokens the ACE-Step prompts and Qwen's chat format use; <|endoftext|> is also the pad token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A fixed corpus so the BPE merges (and therefore token ids) are the same on every machine.
_CORPUS = [
    "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n# Caption\n",
    "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n",
    "# Languages\nen\n\n# Lyric\n[verse]\n[chorus]\n[bridge]\n[Instrumental]\n",
    "upbeat electronic dance track with synth bass, punchy drums and bright female vocals",
    "slow acoustic folk ballad, fingerpicked guitar, warm male voice, soft piano, melancholic",
    "heavy metal with distorted guitars, double kick drums, aggressive shouted vocals",
    "lofi hip hop beat, jazzy chords, vinyl crackle, mellow, relaxed, study music",
    "orchestral cinematic score, strings, brass, timpani, epic, building tension",
    "the quick brown fox jumps over the lazy dog 0123456789 N/A minor major sharp flat",
]


def build_tokenizer(vocab_size: int):
    """Byte-level BPE: every string round-trips, and the special tokens are single ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


# What the released Qwen3 configs (the text encoder's and the planner LM's) share.
QWEN3_SETTINGS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
                  "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
                  "use_sliding_window": False}


def _qwen3_config(profile: Profile, vocab: int) -> dict:
    te = profile.text_encoder
    return {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        "hidden_size": te.hidden_size,
        "intermediate_size": te.intermediate_size,
        "num_hidden_layers": te.num_hidden_layers,
        "num_attention_heads": te.num_attention_heads,
        "num_key_value_heads": te.num_key_value_heads,
        "head_dim": te.head_dim,
        "max_position_embeddings": 32768,
        **QWEN3_SETTINGS,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def _identity_layer_weight(key: str, first_identity: int) -> bool:
    """Attention and MLP projections of the layers that are made identities (their residual adds zero)."""
    parts = key.split(".")
    return (parts[0] == "layers" and int(parts[1]) >= first_identity and parts[-1] == "weight"
            and parts[-2].endswith("_proj"))


def text_encoder_state(profile: Profile, seed: int, vocab: int) -> dict[str, torch.Tensor]:
    """Weights in transformers ``Qwen3Model`` naming (no ``model.`` prefix, as in Qwen3-Embedding)."""
    from transformers import Qwen3Config, Qwen3Model

    te = profile.text_encoder
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**_qwen3_config(profile, te.embedding_rows or vocab)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first_identity = te.random_layers if te.random_layers is not None else te.num_hidden_layers
    zero = {k for k in shapes if _identity_layer_weight(k, first_identity)}
    state = bf16_exact(seeded_state_dict(seed + 1, {k: s for k, s in shapes.items() if k not in zero}))
    state.update({k: torch.zeros(shapes[k]) for k in zero})
    return state


def write_tokenizer_folder(folder: Path, profile: Profile) -> int:
    """Writes tokenizer.json and tokenizer_config.json; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(profile.vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    eot = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eot,
                "pad_token": eot,
                "padding_side": "right",
                "model_max_length": 32768,
                "added_tokens_decoder": {
                    str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL_TOKENS
                },
            },
            indent=2,
        )
    )
    return tok.get_vocab_size()


def write_text_encoder_folder(folder: Path, profile: Profile, seed: int) -> dict[str, torch.Tensor]:
    """A Qwen3-Embedding-style folder: the tokenizer files, config.json and model.safetensors (bf16)."""
    vocab = write_tokenizer_folder(folder, profile)
    (folder / "config.json").write_text(
        json.dumps(_qwen3_config(profile, profile.text_encoder.embedding_rows or vocab), indent=2))
    state = text_encoder_state(profile, seed, vocab)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(folder / "model.safetensors"))
    return state


def _vae_config(profile: Profile) -> dict:
    return {
        "_class_name": "AutoencoderOobleck",
        "audio_channels": 2,
        "sampling_rate": 48000,
        "encoder_hidden_size": profile.vae.encoder_hidden_size,
        "decoder_channels": profile.vae.decoder_channels,
        "decoder_input_channels": 64,
        "channel_multiples": list(profile.vae.channel_multiples),
        "downsampling_ratios": [2, 4, 4, 6, 10],
    }


def build_vae(profile: Profile, seed: int):
    """A diffusers ``AutoencoderOobleck`` with the real 48 kHz / hop-1920 / 64-channel geometry."""
    from diffusers import AutoencoderOobleck

    cfg = {k: v for k, v in _vae_config(profile).items() if not k.startswith("_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers still uses the old weight_norm API
        vae = AutoencoderOobleck(**cfg)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    state = bf16_exact(seeded_state_dict(seed + 2, shapes, transposed=("conv_t1.weight_v",)))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def write_vae_folder(folder: Path, vae) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    cfg = dict(vae.config)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    cfg["_class_name"] = "AutoencoderOobleck"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return state
