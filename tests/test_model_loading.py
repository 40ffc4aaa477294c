"""Every layout a user has loads to the same tensors; every broken file fails with its name and key."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sidestep_core.model import CheckpointError, load_acestep
from sidestep_core.model.variants import detect_variant
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state

PROFILE = get_profile("tiny")


@pytest.fixture(scope="module")
def state():
    return {k: v.to(torch.bfloat16) for k, v in dit_state(PROFILE, 0).items()}


def write_folder(root, state, name="acestep-v15-turbo", config=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or PROFILE.dit.to_dict()))
    save_file(state, str(root / "model.safetensors"))
    return root


def assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_single_file_any_prefix_matches_folder(tmp_path, state, prefix):
    folder = load_acestep(write_folder(tmp_path / "acestep-v15-turbo", state))
    f = tmp_path / "acestep_v1.5_turbo.safetensors"
    save_file({prefix + k: v for k, v in state.items()}, str(f))
    single = load_acestep(f)
    assert_same_weights(folder, single)
    assert single.info.layout == "comfyui-split"
    assert single.source.prefix == prefix
    assert single.info.variant == "turbo"  # from the file name: no config in a ComfyUI file


def test_aio_file_loads_only_the_diffusion_model(tmp_path, state):
    f = tmp_path / "ace_step_1.5_turbo_aio.safetensors"
    tensors = {"model.diffusion_model." + k: v for k, v in state.items()}
    tensors["vae.decoder.conv1.bias"] = torch.zeros(3)
    tensors["text_encoders.qwen3_06b.transformer.model.norm.weight"] = torch.ones(4)
    save_file(tensors, str(f))
    loaded = load_acestep(f)
    assert loaded.info.layout == "comfyui-aio"
    assert_same_weights(load_acestep(write_folder(tmp_path / "ref", state)), loaded)


def test_sharded_folder(tmp_path, state):
    folder = tmp_path / "acestep-v15-xl-turbo-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PROFILE.dit.to_dict()))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
        weight_map.update({k: name for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_weights(load_acestep(write_folder(tmp_path / "ref", state)), load_acestep(folder))


def test_checkpoints_root_with_text_encoder_beside(tmp_path, state):
    root = tmp_path / "checkpoints"
    write_folder(root / "acestep-v15-turbo", state)
    te = root / "Qwen3-Embedding-0.6B"
    te.mkdir()
    (te / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    save_file({"x": torch.zeros(1)}, str(te / "model.safetensors"))
    assert load_acestep(root).info.variant == "turbo"


def test_parts_leave_the_rest_on_meta(tmp_path, state):
    lm = load_acestep(write_folder(tmp_path / "m", state), parts={"decoder", "null_condition_emb"}, dtype=torch.float32)
    assert lm.model.decoder.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert not lm.model.decoder.layers[0].self_attn.q_proj.weight.is_meta
    assert lm.model.encoder.text_projector.weight.is_meta
    assert lm.model.decoder.rotary.inv_freq.device.type == "cpu"


def test_stored_dtype_is_kept_by_default(tmp_path, state):
    lm = load_acestep(write_folder(tmp_path / "m", state))
    assert lm.model.decoder.proj_in[1].weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "folder_name,config_patch,stated,expected",
    [
        ("acestep-v15-base", {"is_turbo": False, "model_version": None}, None, "base"),
        ("acestep-v15-sft", {"is_turbo": False, "model_version": None}, None, "sft"),
        ("my-finetune", {"is_turbo": False, "model_version": None}, None, "base"),
        ("my-finetune", {"is_turbo": None, "model_version": None}, None, "unknown"),
        ("my-finetune", {"is_turbo": None, "model_version": None}, "sft", "sft"),
        ("whatever", {}, None, "turbo"),
    ],
)
def test_variant_detection(tmp_path, state, folder_name, config_patch, stated, expected):
    cfg = {**PROFILE.dit.to_dict(), **config_patch}
    lm = load_acestep(write_folder(tmp_path / folder_name, state, config=cfg), variant=stated)
    assert lm.info.variant == expected
    if expected in ("base", "sft"):
        assert (lm.info.shift, lm.info.steps, lm.info.is_turbo) == (1.0, 50, False)
    if expected == "turbo":
        assert (lm.info.shift, lm.info.steps, lm.info.is_turbo) == (3.0, 8, True)


def test_stated_variant_must_be_known(tmp_path, state):
    with pytest.raises(ValueError, match="unknown base variant"):
        load_acestep(write_folder(tmp_path / "m", state), variant="turbo-2")
    # an XL variant for a 2B model (and the reverse) was taken as stated: XL in the adapters' metadata
    with pytest.raises(ValueError, match="base variant xl-turbo: the checkpoint is a 2B model by its shape; state "
                                         "turbo"):
        load_acestep(write_folder(tmp_path / "m2", state), variant="xl-turbo")
    with pytest.raises(ValueError, match="base variant sft: the checkpoint is an XL model by its shape; state xl-sft"):
        detect_variant(get_profile("tiny-xl").dit, [], "sft")


def test_identity_changes_with_the_weights(tmp_path, state):
    a = load_acestep(write_folder(tmp_path / "a", state)).info.identity
    b = load_acestep(write_folder(tmp_path / "b", state)).info.identity
    tuned = dict(state)
    tuned["decoder.layers.0.mlp.up_proj.weight"] = tuned["decoder.layers.0.mlp.up_proj.weight"] + 1
    c = load_acestep(write_folder(tmp_path / "c", tuned)).info.identity
    assert a == b and a != c


# ---------------------------------------------------------------- errors name the file and the key


def test_missing_key(tmp_path, state):
    broken = dict(state)
    del broken["decoder.layers.1.cross_attn.k_norm.weight"]
    with pytest.raises(CheckpointError) as e:
        load_acestep(write_folder(tmp_path / "m", broken))
    assert str(tmp_path / "m") in str(e.value)
    assert "missing keys (1): decoder.layers.1.cross_attn.k_norm.weight" in str(e.value)


def test_unexpected_key(tmp_path, state):
    f = tmp_path / "x.safetensors"
    save_file({**{"diffusion_model." + k: v for k, v in state.items()},
               "diffusion_model.decoder.layers.0.extra.weight": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError,
                       match=r"x\.safetensors.*unexpected keys \(1\): "
                             r"diffusion_model\.decoder\.layers\.0\.extra\.weight"):
        load_acestep(f)


def test_wrong_shape(tmp_path, state):
    broken = dict(state)
    broken["decoder.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): decoder\.layers\.0\.mlp\.up_proj\.weight: "
                                              r"file \(3, 3\) vs model \(128, 64\)"):
        load_acestep(write_folder(tmp_path / "m", broken))


def test_truncated_file(tmp_path, state):
    f = tmp_path / "cut.safetensors"
    save_file(state, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        load_acestep(f)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(pickle.dumps({"state_dict": {"a": 1}}))
    with pytest.raises(CheckpointError, match=r"model\.ckpt: not a safetensors file"):
        load_acestep(f)


def test_unrelated_safetensors(tmp_path):
    f = tmp_path / "sdxl.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match=r"sdxl\.safetensors: no ACE-Step 1\.5 DiT found"):
        load_acestep(f)


def test_folder_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="not an ACE-Step model folder"):
        load_acestep(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_acestep(tmp_path / "nope.safetensors")


def test_broken_config_json(tmp_path, state):
    folder = write_folder(tmp_path / "m", state)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not a readable JSON config"):
        load_acestep(folder)


def test_silence_latent_is_loaded_weights_only_and_transposed(tmp_path, state):
    folder = write_folder(tmp_path / "m", state)
    torch.save(torch.arange(64 * 10, dtype=torch.float32).reshape(1, 64, 10), folder / "silence_latent.pt")
    lm = load_acestep(folder)
    assert lm.silence_latent.shape == (1, 10, 64)
    assert lm.silence_latent[0, 1, 0] == 1.0  # [1, 64, T] -> [1, T, 64]
