"""One seed, three on-disk layouts: every part loads to identical tensors."""

import pytest
import torch

from sidestep_core.model import load_acestep
from sidestep_core.text.encoder import find_text_encoder, load_text_encoder, load_tokenizer
from sidestep_core.tiny import make_tiny_checkpoint
from sidestep_core.vae import find_vae, load_vae, silence_latent_from_vae


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "comfyui-split": make_tiny_checkpoint(root / "split", "comfyui-split", "tiny", 0),
        "comfyui-aio": make_tiny_checkpoint(root / "aio", "comfyui-aio", "tiny", 0),
    }


def same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_written_files_are_the_real_formats(layouts, tiny_original):
    assert (tiny_original / "acestep-v15-turbo" / "config.json").is_file()
    assert (tiny_original / "acestep-v15-turbo" / "silence_latent.pt").is_file()
    assert (tiny_original / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_original / "Qwen3-Embedding-0.6B" / "tokenizer.json").is_file()
    split = layouts["comfyui-split"].root / "models"
    for rel in ("diffusion_models/acestep_v1.5_turbo.safetensors", "text_encoders/qwen_0.6b_ace15.safetensors",
                "vae/ace_1.5_vae.safetensors"):
        assert (split / rel).is_file(), rel
    assert (layouts["comfyui-aio"].root / "models/checkpoints/ace_step_1.5_turbo_aio.safetensors").is_file()


def test_dit_identical_in_every_layout(layouts, tiny_original):
    ref = load_acestep(tiny_original).model.state_dict()
    for name in ("comfyui-split", "comfyui-aio"):
        loaded = load_acestep(layouts[name].dit)
        assert loaded.info.layout == name and loaded.info.variant == "turbo"
        same(ref, loaded.model.state_dict())


def test_vae_identical_in_every_layout(layouts, tiny_original):
    ref = load_vae(find_vae(tiny_original / "acestep-v15-turbo")).state_dict()
    for name in ("comfyui-split", "comfyui-aio"):
        same(ref, load_vae(find_vae(layouts[name].dit)).state_dict())


def test_text_encoder_identical_in_every_layout(layouts, tiny_original):
    ref = load_text_encoder(find_text_encoder(tiny_original / "acestep-v15-turbo")).state_dict()
    for name in ("comfyui-split", "comfyui-aio"):
        same(ref, load_text_encoder(find_text_encoder(layouts[name].dit)).state_dict())


def test_silence_latent_file_equals_the_one_derived_from_the_vae(tiny_original):
    stored = load_acestep(tiny_original).silence_latent
    derived = silence_latent_from_vae(load_vae(tiny_original / "vae"))
    assert stored.shape == (1, 15000, 64)
    torch.testing.assert_close(stored, derived)


def test_tokenizer_round_trips_any_text_and_knows_the_special_tokens(tiny_original):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_original / "Qwen3-Embedding-0.6B" / "tokenizer.json"))
    text = "# Lyric\n[verse] Ünïcödé ✓ 日本語 🎵\n<|endoftext|>"
    assert raw.decode(raw.encode(text).ids, skip_special_tokens=False) == text
    tok = load_tokenizer(tiny_original / "Qwen3-Embedding-0.6B")  # the loader the pipeline uses
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.encode(special) == [raw.token_to_id(special)]


def test_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_original):
    again = make_tiny_checkpoint(tmp_path / "again", "original", "tiny", 0)
    other = make_tiny_checkpoint(tmp_path / "other", "original", "tiny", 1)
    ref = (tiny_original / "acestep-v15-turbo" / "model.safetensors").read_bytes()
    assert (again.dit / "model.safetensors").read_bytes() == ref
    assert (other.dit / "model.safetensors").read_bytes() != ref
