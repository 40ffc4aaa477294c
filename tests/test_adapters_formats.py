"""Reading adapters: PEFT folders, LyCORIS files and ComfyUI-format files into the common form, checked against
the merged weights PEFT and LyCORIS compute themselves; clear errors for files made for other models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from adapter_helpers import CASES, DIT, decoder, make_adapter, max_rel_err, reference_weights, saved_adapter
from sidestep_core.adapters import AdapterFormatError, AdapterShapeError, detect_format, merged_state, \
    read_adapter_weights
from sidestep_core.adapters import names as nm
from sidestep_core.adapters.formats import parse_state_dict


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_files_match_library_merge(tmp_path, dit, case):
    """Every adapter layout the trainer writes reads back to the weights PEFT / LyCORIS compute."""
    folder, ref = saved_adapter(tmp_path, dit, case)
    aw = read_adapter_weights(folder)
    kind = CASES[case][0]
    assert aw.adapter_type == kind
    assert aw.format == ("peft" if kind in ("lora", "dora") else "lycoris")
    assert sorted(aw.modules) == sorted(ref)
    ours = merged_state(decoder(dit), aw)
    assert max_rel_err(ours, ref) < 1e-5


def test_lora_patterns_and_rslora(tmp_path, dit):
    from peft import LoraConfig, get_peft_model

    dec = decoder(dit)
    conf = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "up_proj"],
                      rank_pattern={r"layers\.2\.self_attn\.q_proj": 2}, alpha_pattern={r"up_proj": 10})
    pm = get_peft_model(dec, conf)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    merged = pm.merge_and_unload()
    aw = read_adapter_weights(tmp_path / "peft")
    assert aw.modules["layers.2.self_attn.q_proj"].rank() == 2
    assert aw.modules["layers.0.mlp.up_proj"].scale == pytest.approx(10 / 2.0)  # rsLoRA: alpha / sqrt(r)
    ours = merged_state(decoder(dit), aw)
    ref = {n: merged.get_submodule(n).weight for n in aw.modules}
    assert max_rel_err(ours, ref) < 1e-5


def test_lycoris_merge_agrees_where_its_scale_is_one(tmp_path, dit):
    """LyCORIS's own merge_to agrees with ours (and its forward) for full-matrix LoKr and OFT. (LyCORIS 4.1's
    merge applies alpha/dim twice for low-rank LoKr/LoHa; its forward pass — what training optimises — is the
    reference used everywhere else.)"""
    for case in ("lokr_full", "oft"):
        kind, over = CASES[case]
        dec = decoder(dit)
        adapter = make_adapter(dec, kind, **over)
        adapter.save(tmp_path / case, {})
        adapter.network.merge_to(1.0)
        ref = {n: dec.get_submodule(n).weight.detach().clone() for n in adapter.targets}
        aw = read_adapter_weights(tmp_path / case)
        ours = merged_state(decoder(dit), aw)
        unit = [n for n, m in aw.modules.items() if m.scale == 1.0]
        assert len(unit) >= 8
        assert max_rel_err(ours, ref, unit) < 1e-5, case


def test_metadata_and_detection(tmp_path, dit):
    folder, _ = saved_adapter(tmp_path, dit, "lokr_full")
    fmt, path = detect_format(folder)
    assert (fmt, path.name) == ("lycoris", "lokr_weights.safetensors")
    aw = read_adapter_weights(path)  # the file itself works too
    assert aw.metadata["format"] == "lycoris"
    assert aw.meta_value("sidestep_adapter") == "lokr"
    assert "turbo" in aw.summary()
    # a training run's folder resolves to its final adapter
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    (run / "training_config.json").write_text("{}")
    assert detect_format(run)[1] == run / "final" / "lokr_weights.safetensors"


def _peft_lora_tensors(dit, kind="lora"):
    dec = decoder(dit)
    adapter = make_adapter(dec, kind)
    return adapter.state_dict(), adapter, dec


def test_sidestep_style_export_is_read_with_peft_maths(tmp_path, dit):
    """Side-Step's exporter: base_model.model keys, lora_down/up, per-module alpha, PEFT magnitude renamed to a 1-D
    dora_scale. ComfyUI cannot apply that dora_scale; we read it with PEFT's maths and say so."""
    sd, adapter, dec = _peft_lora_tensors(dit, "dora")
    conv = {}
    for k, v in sd.items():
        k2 = k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        k2 = k2.replace(".lora_magnitude_vector", ".dora_scale")
        conv[k2] = v
    for name in adapter.targets:
        conv[f"base_model.model.{name}.alpha"] = torch.tensor(8.0)
    save_file(conv, str(tmp_path / "ss_comfyui.safetensors"))
    aw = read_adapter_weights(tmp_path / "ss_comfyui.safetensors")
    assert aw.format == "comfyui" and aw.adapter_type == "dora"
    assert any("1-D dora_scale" in n for n in aw.notes)
    ref = reference_weights(adapter, dec)
    assert max_rel_err(merged_state(decoder(dit), aw), ref) < 1e-5


def test_peft_weights_without_config_get_scale_one(tmp_path, dit):
    sd, adapter, _ = _peft_lora_tensors(dit)
    save_file(sd, str(tmp_path / "loose.safetensors"))
    aw = read_adapter_weights(tmp_path / "loose.safetensors")
    assert all(m.scale == 1.0 for m in aw.modules.values())
    assert any("no alpha" in n for n in aw.notes)


def test_kohya_and_comfy_names(dit):
    up, down = torch.randn(64, 2), torch.randn(2, 64)
    sd = {
        "lora_unet_decoder_layers_1_self_attn_q_proj.lora_up.weight": up,
        "lora_unet_decoder_layers_1_self_attn_q_proj.lora_down.weight": down,
        "lora_unet_decoder_layers_1_self_attn_q_proj.alpha": torch.tensor(4.0),
        "diffusion_model.decoder.layers.0.mlp_norm.diff": torch.randn(64),
        "diffusion_model.decoder.condition_embedder.diff_b": torch.randn(64),
        "diffusion_model.encoder.lyric_encoder.layers.0.self_attn.k_proj.lora_up.weight": torch.randn(16, 2),
        "diffusion_model.encoder.lyric_encoder.layers.0.self_attn.k_proj.lora_down.weight": torch.randn(2, 32),
    }
    aw = parse_state_dict(sd, "comfyui", source="mem")
    assert set(aw.modules) == {"layers.1.self_attn.q_proj", "layers.0.mlp_norm", "condition_embedder"}
    assert aw.modules["layers.1.self_attn.q_proj"].scale == 2.0
    assert aw.modules["condition_embedder"].kind == "bias"
    assert set(aw.outside) == {"encoder.lyric_encoder.layers.0.self_attn.k_proj"}


@pytest.mark.parametrize("flat, root, expected", [
    ("layers_12_self_attn_q_proj", "decoder.", "decoder.layers.12.self_attn.q_proj"),
    ("layers_0_self_attn_norm", "decoder.", "decoder.layers.0.self_attn_norm"),
    ("time_embed_r_linear_1", "decoder.", "decoder.time_embed_r.linear_1"),
    ("proj_in_1", "decoder.", "decoder.proj_in.1"),
    ("encoder_lyric_encoder_layers_3_post_attention_layernorm", "",
     "encoder.lyric_encoder.layers.3.post_attention_layernorm"),
    ("down_blocks_0_attentions_0_proj_in", "", None),
])
def test_underscore_names(flat, root, expected):
    assert nm.from_underscores(flat, root) == expected


def test_file_for_another_model_lists_unknown_keys(tmp_path):
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{s}": torch.zeros(4, 4) for s in ("lora_up.weight",
                                                                                           "lora_down.weight")}
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 4)
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(AdapterShapeError) as err:
        read_adapter_weights(tmp_path / "sdxl.safetensors")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "sdxl.safetensors")) and "made for another model" in msg
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in msg


def test_shape_mismatch_lists_first_mismatches(tmp_path, dit):
    sd = {}
    for i in range(3):
        sd[f"base_model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 2048)
        sd[f"base_model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.zeros(2048, 4)
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    aw = read_adapter_weights(tmp_path)
    with pytest.raises(AdapterShapeError) as err:
        aw.check_decoder(decoder(dit))
    msg = str(err.value)
    assert "made for another model" in msg and "3 shape mismatch" in msg
    assert "layers.0.self_attn.q_proj: adapter [2048, 2048] vs model [64, 64]" in msg
    sd2 = {"base_model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
           "base_model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    aw2 = parse_state_dict(sd2, "comfyui", source="deep.safetensors")
    with pytest.raises(AdapterShapeError, match=re.escape("the model does not have, first: layers.9.self_attn")):
        aw2.check_decoder(decoder(dit))


def test_not_adapters(tmp_path):
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterFormatError, match="not an adapter file"):
        read_adapter_weights(tmp_path / "x.safetensors")
    (tmp_path / "t.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFormatError, match="pickled"):
        read_adapter_weights(tmp_path / "t.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        read_adapter_weights(tmp_path / "bad.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterFormatError, match="no adapter found"):
        read_adapter_weights(empty)
    peft = tmp_path / "peft_oft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    save_file({"base_model.model.layers.0.self_attn.q_proj.oft_R.weight": torch.zeros(2)},
              str(peft / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="PEFT OFT adapters are not supported"):
        read_adapter_weights(peft)
    save_file({"diffusion_model.decoder.layers.0.self_attn.q_proj.set_weight": torch.zeros(2)},
              str(tmp_path / "set.safetensors"))
    with pytest.raises(AdapterFormatError, match="full weight replacement"):
        read_adapter_weights(tmp_path / "set.safetensors")


_Q = "diffusion_model.decoder.layers.0.self_attn.q_proj"
_TO_Q = "transformer.layers.0.self_attn.to_q"
_NAN = torch.full((64, 4), float("nan"))
DAMAGED = {  # tensors (ComfyUI names; diffusers names for the last ones), metadata, the message
    "ranks differ": ({f"{_Q}.lora_up.weight": torch.zeros(64, 3), f"{_Q}.lora_down.weight": torch.zeros(4, 64)}, {},
                     "the lora factors do not fit together"),
    "1-D factor": ({f"{_Q}.lora_up.weight": torch.zeros(64, 4), f"{_Q}.lora_down.weight": torch.zeros(4)}, {},
                   "the lora factors do not fit together"),
    "rank 0": ({f"{_Q}.lora_up.weight": torch.zeros(64, 0), f"{_Q}.lora_down.weight": torch.zeros(0, 64)}, {},
               "is empty"),
    "NaN": ({f"{_Q}.lora_up.weight": _NAN, f"{_Q}.lora_down.weight": torch.zeros(4, 64)}, {},
            "up holds NaN or infinite values"),
    "two alphas": ({f"{_Q}.lora_up.weight": torch.zeros(64, 4), f"{_Q}.lora_down.weight": torch.zeros(4, 64),
                    f"{_Q}.alpha": torch.tensor([1.0, 2.0])}, {}, "alpha holds 2 values, not one"),
    "infinite alpha": ({f"{_Q}.lora_up.weight": torch.zeros(64, 4), f"{_Q}.lora_down.weight": torch.zeros(4, 64),
                        f"{_Q}.alpha": torch.tensor(float("inf"))}, {}, "alpha is inf"),
    "LoHa ranks differ": ({f"{_Q}.hada_w1_a": torch.zeros(64, 2), f"{_Q}.hada_w1_b": torch.zeros(2, 64),
                           f"{_Q}.hada_w2_a": torch.zeros(64, 3), f"{_Q}.hada_w2_b": torch.zeros(2, 64)}, {},
                          "the loha factors do not fit together"),
    "LoKr factor halves differ": ({f"{_Q}.lokr_w1_a": torch.zeros(8, 2), f"{_Q}.lokr_w1_b": torch.zeros(3, 8),
                                   f"{_Q}.lokr_w2": torch.zeros(8, 8)}, {}, "the lokr factors do not fit together"),
    "diffusers: lora_A alone": ({f"{_TO_Q}.lora_A.weight": torch.zeros(4, 64)}, {}, "has no lora_B beside it"),
    "diffusers: metadata not JSON": ({f"{_TO_Q}.lora_A.weight": torch.zeros(4, 64),
                                      f"{_TO_Q}.lora_B.weight": torch.zeros(64, 4)},
                                     {"lora_adapter_metadata": "{"}, "unreadable lora_adapter_metadata"),
    "diffusers: ranks differ": ({f"{_TO_Q}.lora_A.weight": torch.zeros(4, 64),
                                 f"{_TO_Q}.lora_B.weight": torch.zeros(64, 2)}, {}, "factors do not fit together"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_adapter_file_is_refused_in_one_line(tmp_path, dit, capsys, case):
    """Hand-edited, foreign or half-broken files: refused while reading, naming the file and the module, with
    exit 2 from the CLI — never a traceback from the maths later, never a NaN "verified" export."""
    from sidestep_core.cli import main

    tensors, meta, message = DAMAGED[case]
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), meta or None)
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        read_adapter_weights(path)
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "x.safetensors"), "--checkpoint", str(dit)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_dora_scale_forms(dit):
    base = {"diffusion_model.decoder.layers.0.self_attn.q_proj.lora_up.weight": torch.randn(64, 2),
            "diffusion_model.decoder.layers.0.self_attn.q_proj.lora_down.weight": torch.randn(2, 64)}
    key = "diffusion_model.decoder.layers.0.self_attn.q_proj.dora_scale"
    for shape, mode in (((64, 1), "row_base"), ((1, 64), "col_merged"), ((64,), "row_merged")):
        aw = parse_state_dict({**base, key: torch.ones(shape)}, "comfyui")
        assert aw.modules["layers.0.self_attn.q_proj"].dora_mode == mode
    lyco = {k.replace("diffusion_model.decoder.layers.0.self_attn.q_proj", "lycoris_layers_0_self_attn_q_proj"): v
            for k, v in base.items()}
    aw = parse_state_dict({**lyco, "lycoris_layers_0_self_attn_q_proj.dora_scale": torch.ones(64, 1)}, "lycoris")
    assert aw.modules["layers.0.self_attn.q_proj"].dora_mode == "row_merged"  # LyCORIS wd_on_out semantics
    with pytest.raises(AdapterShapeError, match="fits neither"):
        parse_state_dict({**base, key: torch.ones(3, 3)}, "comfyui")
