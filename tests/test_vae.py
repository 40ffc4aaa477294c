"""VAE: ComfyUI key mapping, loading from every layout, tiled encoding and the silence latent."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from preprocess_helpers import comfyui_dir, small_vae, tiny_checkpoint
from sidestep_core import vae as V


def _state(vae):
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def test_comfy_mapping_round_trips_exactly():
    sd = _state(small_vae())
    comfy = V.vae_state_dict_to_comfy(sd)
    assert len(comfy) == len(sd)
    back = V.vae_state_dict_from_comfy(comfy)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_comfy_names_follow_stable_audio_tools():
    comfy = V.vae_state_dict_to_comfy(_state(small_vae()))
    # first conv, a residual unit's conv inside block 0, block snake + strided conv, last snake and conv
    for key in (
        "encoder.layers.0.parametrizations.weight.original0",
        "encoder.layers.0.parametrizations.weight.original1",
        "encoder.layers.1.layers.0.layers.1.parametrizations.weight.original1",
        "encoder.layers.1.layers.2.layers.3.bias",
        "encoder.layers.1.layers.3.alpha",
        "encoder.layers.1.layers.4.parametrizations.weight.original1",
        "encoder.layers.6.beta",
        "encoder.layers.7.parametrizations.weight.original1",
        "decoder.layers.1.layers.0.beta",  # ComfyUI's detection key
        "decoder.layers.1.layers.1.parametrizations.weight.original1",  # transposed conv
        "decoder.layers.2.layers.4.layers.3.bias",
        "decoder.layers.7.parametrizations.weight.original0",
    ):
        assert key in comfy, key
    assert comfy["encoder.layers.1.layers.3.alpha"].shape == (16,)  # Snake parameters are [C], not [1, C, 1]
    # ComfyUI detects the 48 kHz VAE by the second decoder block's kernel (2 × stride 6)
    assert comfy["decoder.layers.2.layers.1.parametrizations.weight.original1"].shape[-1] == 12


def test_from_comfy_accepts_legacy_weight_norm_and_folded_weights():
    sd = _state(small_vae())
    comfy = V.vae_state_dict_to_comfy(sd)
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g")
         .replace("parametrizations.weight.original1", "weight_v"): v
        for k, v in comfy.items()
    }
    prefixed = {"vae." + k: v for k, v in legacy.items()}
    back = V.vae_state_dict_from_comfy(prefixed)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # weight norm folded into plain weights: g, v are recomputed and give the same effective weight
    folded = {}
    for k, v in comfy.items():
        if k.endswith("original1"):
            g = comfy[k.replace("original1", "original0")]
            w = g * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1)
            folded[k.replace("parametrizations.weight.original1", "weight")] = w
        elif not k.endswith("original0"):
            folded[k] = v
    back = V.vae_state_dict_from_comfy(folded)
    model = V.build_vae(V.vae_config_from_state_dict(back))
    model.load_state_dict(back)
    x = torch.randn(1, 2, 1920 * 3, generator=torch.Generator().manual_seed(1))
    ref = small_vae()
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), ref.encoder(x), atol=1e-5)


def test_config_is_read_off_the_shapes():
    cfg = V.vae_config_from_state_dict(_state(small_vae()))
    assert cfg == {
        "encoder_hidden_size": 16, "downsampling_ratios": [2, 4, 4, 6, 10], "channel_multiples": [1, 1, 1, 1, 1],
        "decoder_channels": 16, "decoder_input_channels": 8, "audio_channels": 2, "sampling_rate": 48000,
    }


def _load_comfy_autoencoder(root):
    """ComfyUI's own stable-audio-tools Oobleck module, with ``comfy.ops`` reduced to plain torch layers."""
    fake_comfy = types.ModuleType("comfy")
    fake_ops = types.ModuleType("comfy.ops")
    fake_ops.disable_weight_init = torch.nn
    fake_comfy.ops = fake_ops
    saved = {k: sys.modules.get(k) for k in ("comfy", "comfy.ops")}
    sys.modules.update({"comfy": fake_comfy, "comfy.ops": fake_ops})
    try:
        spec = importlib.util.spec_from_file_location("_comfy_autoencoder", root / "comfy/ldm/audio/autoencoder.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_module_loads_mapped_weights_and_encodes_identically():
    root = comfyui_dir()
    if root is None:
        pytest.skip("no ComfyUI source tree (set COMFYUI_DIR)")
    mod = _load_comfy_autoencoder(root)
    ours = small_vae(seed=3)
    theirs = mod.AudioOobleckVAE(channels=16, latent_dim=8, c_mults=[1, 1, 1, 1, 1], strides=[2, 4, 4, 6, 10])
    theirs.load_state_dict(V.vae_state_dict_to_comfy(_state(ours)), strict=True)
    back = V.vae_state_dict_from_comfy(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in _state(ours).items())
    x = torch.randn(1, 2, 1920 * 4 + 77, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(theirs.encoder(x), ours.encoder(x), atol=1e-5)
        z = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(4))
        assert torch.allclose(theirs.decoder(z), ours.decoder(z), atol=1e-5)


@pytest.mark.slow
def test_tiled_encode_matches_whole_file_encode():
    vae = small_vae()
    frames = 26
    x = torch.randn(2, frames * 1920 + 555, generator=torch.Generator().manual_seed(0)) * 0.3
    whole = V.encode_moments(vae, x, chunk_seconds=100, overlap_seconds=0)
    assert whole.shape == (1, 16, frames)  # T = S // hop; the trailing partial frame is dropped
    tiled = V.encode_moments(vae, x, chunk_seconds=0.32, overlap_seconds=0.32)  # 8-frame tiles, 8 frames context
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5, rtol=0)
    # without context the seams show: the overlap is what makes tiling exact
    naive = V.encode_moments(vae, x, chunk_seconds=0.32, overlap_seconds=0)
    assert (naive - whole).abs().max() > 1e-3


def test_sampling_is_seeded_and_independent_of_tiling():
    vae = small_vae()
    x = torch.randn(2, 20 * 1920, generator=torch.Generator().manual_seed(5)) * 0.3
    a = V.encode_audio(vae, x, seed=123, chunk_seconds=100)
    b = V.encode_audio(vae, x, seed=123, chunk_seconds=0.32, overlap_seconds=0.32)
    c = V.encode_audio(vae, x, seed=124)
    mean = V.encode_audio(vae, x, seed=None)
    assert a.shape == (20, 8)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, mean)
    assert torch.equal(V.encode_audio(vae, x, seed=123), a)


def test_too_short_audio_is_rejected():
    with pytest.raises(ValueError, match="shorter than one latent frame"):
        V.encode_moments(small_vae(), torch.zeros(2, 1919))


@pytest.mark.slow
def test_silence_latent_shortcut_equals_a_full_encode():
    vae = small_vae()
    fast = V.silence_latent_from_vae(vae, frames=48)
    full = V.encode_audio(vae, torch.zeros(2, 48 * 1920), seed=None)
    assert fast.shape == (1, 48, 8)
    assert torch.allclose(fast[0], full, atol=1e-6)
    short = V.silence_latent_from_vae(vae, frames=5)  # below the probe length: encoded directly
    assert torch.allclose(short[0], V.encode_audio(vae, torch.zeros(2, 5 * 1920), seed=None), atol=1e-6)
    assert V.receptive_span(vae) > 1920  # several frames of context on each side


@pytest.mark.slow
def test_tiny_vae_loads_identically_from_every_layout(tmp_path):
    ref = V.load_vae(tiny_checkpoint("original").vae)
    sd = _state(ref)
    for layout in ("comfyui-split", "comfyui-aio"):
        other = V.load_vae(tiny_checkpoint(layout).vae)
        assert dict(other.config)["sampling_rate"] == 48000
        osd = _state(other)
        assert set(osd) == set(sd)
        assert all(torch.equal(osd[k], sd[k]) for k in sd), layout
    # and back out through the ComfyUI layout, e.g. for writing an AIO file
    path = tmp_path / "vae.safetensors"
    save_file({"vae." + k: v.contiguous() for k, v in V.vae_state_dict_to_comfy(sd).items()}, str(path))
    assert V.is_comfy_vae_file(path)
    again = _state(V.load_vae(path))
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_find_vae_for_each_layout():
    orig = tiny_checkpoint("original")
    assert V.find_vae(orig.root) == orig.vae
    assert V.find_vae(orig.dit) == orig.vae
    split = tiny_checkpoint("comfyui-split")
    assert V.find_vae(split.dit) == split.vae
    aio = tiny_checkpoint("comfyui-aio")
    assert V.find_vae(aio.dit) == aio.dit


def test_load_vae_errors_name_the_file(tmp_path):
    with pytest.raises(V.VaeError, match=str(tmp_path)):
        V.load_vae(tmp_path)
    bad = tmp_path / "x.safetensors"
    save_file({"foo": torch.zeros(1)}, str(bad))
    with pytest.raises(V.VaeError, match="x.safetensors"):
        V.load_vae(bad)
