"""Applying adapters to the core model: merge / exact unmerge, unmerged hooks, strengths, precision, and errors."""

from __future__ import annotations

import pytest
import torch

from adapter_helpers import DIT, decoder, make_adapter, max_rel_err, reference_weights, saved_adapter
from sidestep_core.adapters import AdapterShapeError, apply_unmerged, merge_adapter, merged_state, \
    read_adapter_weights
from sidestep_core.adapters.formats import parse_state_dict


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


def _inputs(dec, frames=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, 64, generator=g)
    ctx = torch.randn(1, frames, 128, generator=g)
    cond = torch.randn(1, 5, dec.condition_embedder.in_features, generator=g)
    t = torch.tensor([0.7])
    return x, t, t, cond, ctx


@pytest.mark.parametrize("case", ["lora", "dora", "lokr_lowrank", "loha", "oft_rescaled"])
def test_merge_then_unmerge_is_exact(tmp_path, dit, case):
    folder, ref = saved_adapter(tmp_path, dit, case)
    aw = read_adapter_weights(folder)
    dec = decoder(dit)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    handle = merge_adapter(dec, aw, 1.0)
    merged = {n: dec.get_submodule(n).weight.detach().clone() for n in aw.modules}
    assert max_rel_err(merged, ref) < 1e-5
    handle.unmerge()
    for k, v in dec.state_dict().items():
        assert torch.equal(v, before[k]), k
    handle.unmerge()  # idempotent


@pytest.mark.parametrize("case", ["lora", "dora", "lokr_both", "oft"])
def test_unmerged_hooks_match_the_merged_model(tmp_path, dit, case):
    folder, _ = saved_adapter(tmp_path, dit, case)
    aw = read_adapter_weights(folder)
    dec = decoder(dit)
    inputs = _inputs(dec)
    with torch.no_grad():
        base_out = dec(*inputs)
        with apply_unmerged(dec, aw, 1.0) as applied:
            hooked = dec(*inputs)
            applied.set_strength(0.0)
            zero = dec(*inputs)
        after = dec(*inputs)
        handle = merge_adapter(dec, aw, 1.0)
        merged_out = dec(*inputs)
        handle.unmerge()
    assert torch.allclose(hooked, merged_out, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hooked, base_out, atol=1e-4)
    assert torch.allclose(zero, base_out, atol=1e-6)
    assert torch.equal(after, base_out)


def test_strength_interpolates(tmp_path, dit):
    folder, _ = saved_adapter(tmp_path, dit, "lora")
    aw = read_adapter_weights(folder)
    dec = decoder(dit)
    w0 = merged_state(dec, aw, 0.0)
    w1 = merged_state(dec, aw, 1.0)
    wh = merged_state(dec, aw, 0.5)
    for n in aw.modules:
        assert torch.allclose(w0[n], dec.get_submodule(n).weight)
        assert torch.allclose(wh[n], (w0[n] + w1[n]) / 2, atol=1e-6)
    # LoRA strength s is exactly W + s·ΔW, in the hooks too
    inputs = _inputs(dec)
    with torch.no_grad():
        h = merge_adapter(dec, aw, 0.5)
        ref = dec(*inputs)
        h.unmerge()
        with apply_unmerged(dec, aw, 0.5):
            out = dec(*inputs)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_model_keeps_its_dtype(tmp_path, dit):
    folder, _ = saved_adapter(tmp_path, dit, "loha")
    aw = read_adapter_weights(folder)
    dec = decoder(dit, torch.bfloat16)
    h = merge_adapter(dec, aw, 1.0)
    w = dec.get_submodule("layers.0.self_attn.q_proj").weight
    assert w.dtype == torch.bfloat16
    ref = merged_state(decoder(dit), aw)["layers.0.self_attn.q_proj"]
    assert torch.allclose(w.float(), ref, atol=1e-2)
    h.unmerge()


def test_whole_model_and_outside_targets(dit):
    from sidestep_core.model import load_acestep

    loaded = load_acestep(dit, dtype=torch.float32)
    enc_name = "encoder.lyric_encoder.layers.0.mlp.up_proj"
    w = loaded.model.get_submodule(enc_name).weight
    sd = {f"diffusion_model.{enc_name}.lora_up.weight": torch.ones(w.shape[0], 1) * 0.1,
          f"diffusion_model.{enc_name}.lora_down.weight": torch.ones(1, w.shape[1]) * 0.1,
          "diffusion_model.decoder.layers.0.mlp_norm.diff": torch.full((64,), 0.5),
          "diffusion_model.decoder.condition_embedder.diff_b": torch.full((64,), 0.25)}
    aw = parse_state_dict(sd, "comfyui", source="mem")
    before_w = w.detach().clone()
    before_b = loaded.model.decoder.condition_embedder.bias.detach().clone()
    norm = loaded.model.decoder.get_submodule("layers.0.mlp_norm").weight
    before_n = norm.detach().clone()
    h = merge_adapter(loaded.model, aw)
    assert h.skipped == []
    assert torch.allclose(w, before_w + 0.01)
    assert torch.allclose(norm, before_n + 0.5)
    assert torch.allclose(loaded.model.decoder.condition_embedder.bias, before_b + 0.25)
    h.unmerge()
    assert torch.equal(w, before_w) and torch.equal(norm, before_n)
    # the decoder alone cannot take the encoder target: it is reported, the rest applied
    h2 = merge_adapter(loaded.model.decoder, aw)
    assert h2.skipped == [enc_name]
    h2.unmerge()
    # unmerged: the norm (not a linear layer) is merged in place and restored on remove()
    with apply_unmerged(loaded.model, aw):
        assert torch.allclose(norm, before_n + 0.5)
    assert torch.equal(norm, before_n)


def test_adapter_for_another_model_is_refused(dit):
    sd = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 2048),
          "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(2048, 4)}
    aw = parse_state_dict(sd, "comfyui", source="big.safetensors")
    dec = decoder(dit)
    with pytest.raises(AdapterShapeError, match="big.safetensors: made for another model"):
        merge_adapter(dec, aw)
    with pytest.raises(AdapterShapeError):
        apply_unmerged(dec, aw)


def test_in_memory_trainer_adapter_matches(tmp_path, dit):
    """The common form built from the trainer's live state dict (no file) applies the same."""
    dec = decoder(dit)
    adapter = make_adapter(dec, "lokr", rank=2, alpha=8.0)
    aw = parse_state_dict(adapter.state_dict(), "lycoris", source="live")
    ref = reference_weights(adapter, dec)
    assert max_rel_err(merged_state(decoder(dit), aw), ref) < 1e-5


@pytest.mark.parametrize("case", ["lora_patterns", "dora", "lokr_full", "lokr_lowrank", "lokr_both", "loha", "oft",
                                  "oft_rescaled"])
def test_continue_training_from_a_file(tmp_path, dit, case):
    """trainer_settings + to_trainer_state_dict rebuild the trainer's adapter from a file (strict load), with the
    same effective weights — also from our ComfyUI export."""
    from sidestep_core.adapters import export_comfyui
    from sidestep_core.adapters.convert import to_trainer_state_dict, trainer_settings
    from sidestep_core.config import TrainConfig
    from sidestep_core.training.adapters import inject_adapter

    folder, ref = saved_adapter(tmp_path, dit, case)
    base = decoder(dit)
    exported, _ = export_comfyui(read_adapter_weights(folder), tmp_path / "c.safetensors", base=base)
    sources = [folder] + ([] if case == "oft_rescaled" else [exported])  # rescaled OFT exports as full deltas
    for source in sources:
        aw = read_adapter_weights(source)
        settings = trainer_settings(aw)
        cfg = TrainConfig.from_dict({**settings, "dropout": 0.0}).validate()
        dec = decoder(dit)
        adapter = inject_adapter(dec, cfg)
        adapter.load_state_dict(to_trainer_state_dict(aw, base=base), str(source))
        assert max_rel_err(reference_weights(adapter, dec), ref) < 1e-5, source
