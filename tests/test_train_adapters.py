"""Adapters: targets, the five types through PEFT / LyCORIS, file formats and metadata, strict loading, and the
maths ComfyUI applies to the saved LyCORIS tensors (re-implemented from comfy/weight_adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sidestep_core.config import TrainConfig
from sidestep_core.model import AceStepConfig, AceStepModel
from sidestep_core.model.dit import AceStepDiT
from sidestep_core.training.adapters import (
    AdapterMismatchError, find_adapter, inject_adapter, load_adapter_weights, resolve_targets,
)
from train_helpers import single_thread  # noqa: F401

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=8, text_hidden_dim=32, num_lyric_encoder_hidden_layers=1,
            num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=64)


def _decoder(seed=0):
    torch.manual_seed(seed)
    model = AceStepModel(AceStepConfig(**TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.decoder.requires_grad_(False)


def _cfg(**kw):
    base = dict(rank=4, alpha=8.0, dropout=0.0, oft_block_size=8)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_target_counts_on_the_2b_shape():
    with torch.device("meta"):
        dec = AceStepDiT(AceStepConfig())
    count = lambda **kw: len(resolve_targets(dec, TrainConfig(**kw)))  # noqa: E731
    assert count(attention="both") == 192
    assert count(attention="self") == 96 and count(attention="cross") == 96
    assert count(attention="both", target_mlp=True) == 264
    assert count(attention="none", target_mlp=True) == 72
    assert count(target_modules=["self_attn.q_proj", "layers.3.mlp.up_proj"]) == 25
    names = resolve_targets(dec, TrainConfig(attention="cross"))
    assert names[0] == "layers.0.cross_attn.q_proj" and all(".cross_attn." in n for n in names)
    with pytest.raises(ValueError, match="target_modules"):
        resolve_targets(dec, TrainConfig(target_modules=["qkv"]))


def _randomise(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


def _forward(dec, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ctx, cond = torch.randn(1, 12, 64, generator=g), torch.randn(1, 12, 128, generator=g), \
        torch.randn(1, 5, 64, generator=g)
    t = torch.tensor([0.6])
    return dec(hidden_states=x, timestep=t, timestep_r=t, encoder_hidden_states=cond, context_latents=ctx)


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha", "oft"])
def test_save_load_round_trip_and_formats(tmp_path, kind):
    dec = _decoder()
    base_out = _forward(dec)
    adapter = inject_adapter(dec, _cfg(adapter=kind))
    assert len(adapter.targets) == 32
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter.parameters())
    assert torch.allclose(_forward(dec), base_out, atol=1e-6)  # identity at initialisation
    _randomise(adapter)
    out = _forward(dec)
    assert not torch.allclose(out, base_out, atol=1e-4)
    files = adapter.save(tmp_path / "a", {"sidestep_adapter": kind, "sidestep_steps": "7"})
    found_kind, weights = find_adapter(tmp_path / "a")
    assert found_kind == kind and weights in files
    with safe_open(str(weights), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert meta["sidestep_adapter"] == kind and meta["sidestep_steps"] == "7"
    if kind in ("lora", "dora"):
        assert all(k.startswith("base_model.model.layers.") for k in keys)
        assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
        assert conf["use_dora"] == (kind == "dora") and conf["base_model_name_or_path"] == ""
        assert sorted(conf["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # PEFT shrinks the list
        if kind == "dora":  # PEFT's magnitude is row-wise [out], not ComfyUI's column-wise dora_scale [1, in]
            assert shapes["base_model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"] == (32,)
    else:
        assert meta["format"] == "lycoris" and all(k.startswith("lycoris_layers_") for k in keys)
        suffix = {"lokr": "lokr_w1", "loha": "hada_w1_a", "oft": "oft_blocks"}[kind]
        assert f"lycoris_layers_0_self_attn_q_proj.{suffix}" in keys
        if kind == "oft":
            assert shapes["lycoris_layers_0_self_attn_q_proj.oft_blocks"] == (8, 8, 8)
            assert shapes["lycoris_layers_0_self_attn_k_proj.oft_blocks"] == (8, 4, 4)  # 32 = 8 blocks of 4

    if kind in ("lora", "dora"):  # the folder is a stock PEFT adapter (official ACE-Step tooling loads it)
        from peft import PeftModel

        peft_dec = _decoder()
        PeftModel.from_pretrained(peft_dec, str(tmp_path / "a"))
        assert torch.allclose(_forward(peft_dec), out, atol=1e-6)

    fresh_dec = _decoder()
    fresh = inject_adapter(fresh_dec, _cfg(adapter=kind))
    load_adapter_weights(fresh, tmp_path / "a")
    assert torch.allclose(_forward(fresh_dec), out, atol=1e-6)


def test_mismatched_adapter_fails_loudly(tmp_path):
    a = inject_adapter(_decoder(), _cfg(adapter="lora", rank=4))
    a.save(tmp_path / "r4", {})
    with pytest.raises(AdapterMismatchError, match="shape mismatch"):
        load_adapter_weights(inject_adapter(_decoder(), _cfg(adapter="lora", rank=8)), tmp_path / "r4")
    with pytest.raises(AdapterMismatchError, match="missing"):
        load_adapter_weights(inject_adapter(_decoder(), _cfg(adapter="lora", target_mlp=True)), tmp_path / "r4")
    with pytest.raises(AdapterMismatchError, match="lora adapter"):
        load_adapter_weights(inject_adapter(_decoder(), _cfg(adapter="loha")), tmp_path / "r4")


def test_rank_pattern_for_peft_and_lycoris():
    pattern = {r"layers\.0\.self_attn\.q_proj": 2, "cross_attn.v_proj": 6}
    lora = inject_adapter(_decoder(), _cfg(adapter="lora", rank_pattern=pattern))
    sd = lora.state_dict()
    assert sd["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert sd["base_model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    assert sd["base_model.model.layers.2.cross_attn.v_proj.lora_A.weight"].shape[0] == 6
    loha = inject_adapter(_decoder(), _cfg(adapter="loha", rank_pattern=pattern, alpha_pattern={"q_proj": 1.0}))
    sd = loha.state_dict()
    assert sd["lycoris_layers_0_self_attn_q_proj.hada_w1_b"].shape[0] == 2
    assert sd["lycoris_layers_1_self_attn_q_proj.hada_w1_b"].shape[0] == 4
    assert sd["lycoris_layers_2_cross_attn_v_proj.hada_w1_b"].shape[0] == 6
    assert float(sd["lycoris_layers_1_self_attn_q_proj.alpha"]) == 1.0
    assert float(sd["lycoris_layers_1_self_attn_k_proj.alpha"]) == 8.0


# ----- what ComfyUI computes from the saved tensors (comfy/weight_adapter/{oft,loha,lokr}.py) -----


def _comfy_weight(kind, w, sd, prefix):
    get = lambda s: sd.get(f"{prefix}.{s}")  # noqa: E731
    alpha = get("alpha")
    if kind == "oft":
        blocks = get("oft_blocks")
        n, b, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        a = float(alpha) if alpha is not None else 0.0
        if a > 0 and torch.norm(q) + 1e-8 > a:
            q = q * a / (torch.norm(q) + 1e-8)
        eye = torch.eye(b)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        diff = torch.einsum("k n m, k n ... -> k m ...", r - eye, w.view(n, b, -1)).reshape(w.shape)
        return w + diff
    if kind == "loha":
        w1 = get("hada_w1_a") @ get("hada_w1_b")
        w2 = get("hada_w2_a") @ get("hada_w2_b")
        scale = float(alpha) / get("hada_w1_b").shape[0]
        return w + scale * w1 * w2
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    dim = get("lokr_w2_b").shape[0] if get("lokr_w2") is None else (
        get("lokr_w1_b").shape[0] if get("lokr_w1") is None else None)
    scale = float(alpha) / dim if (alpha is not None and dim is not None) else 1.0
    return w + scale * torch.kron(w1, w2).reshape(w.shape)


@pytest.mark.parametrize("kind, extra", [("oft", {}), ("loha", {}), ("lokr", {}),
                                         ("lokr", {"lokr_decompose_both": True, "lokr_factor": 4, "rank": 2})])
def test_lycoris_files_mean_the_same_in_comfyui(kind, extra):
    dec = _decoder()
    adapter = inject_adapter(dec, _cfg(adapter=kind, **extra))
    _randomise(adapter)
    sd = adapter.state_dict()
    lin = dec.layers[1].self_attn.k_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = lin(x)
        w = _comfy_weight(kind, lin.weight.detach().float(), sd, "lycoris_layers_1_self_attn_k_proj")
    assert torch.allclose(got, x @ w.T, atol=1e-5), (got - x @ w.T).abs().max()
