"""Export to ComfyUI's format: our own round trip (export → read → same merged weights) for every adapter layout
and key style, the key grammar ComfyUI reads, metadata, and the cases that need the base model.

(The same files are checked against ComfyUI itself in tests/comfyui/ when COMFYUI_DIR is set.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from adapter_helpers import CASES, DIT, decoder, max_rel_err, saved_adapter
from sidestep_core.adapters import export_comfyui, merged_state, read_adapter_weights, to_comfyui_state_dict
from sidestep_core.adapters.comfy_export import ExportError, needs_base
from sidestep_core.adapters.formats import default_output_path
from sidestep_core.adapters.formats import parse_state_dict

# What ComfyUI 0.27 reads for an ACE-Step 1.5 linear layer (comfy/lora.py load_lora + weight_adapter/*.py).
COMFY_PREFIX = re.compile(r"^(diffusion_model\.decoder\.layers\.\d+\.|base_model\.model\.layers\.\d+\.|"
                          r"lycoris_layers_\d+_)")
COMFY_SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                  "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                  "oft_blocks", "diff", "diff_b")


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


@pytest.fixture(scope="module")
def base(dit):
    return decoder(dit)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, dit):
    """case -> (adapter folder, library reference weights), made once per module."""
    cache = {}
    root = tmp_path_factory.mktemp("adapters")

    def get(case):
        if case not in cache:
            cache[case] = saved_adapter(root, dit, case)
        return cache[case]

    return get


@pytest.mark.parametrize("style", ["comfy", "peft", "lycoris"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, saved, base, case, style):
    folder, ref = saved(case)
    aw = read_adapter_weights(folder)
    out, notes = export_comfyui(aw, tmp_path / "out.safetensors", base=base, base_identity="abc",
                                key_style=style)
    back = read_adapter_weights(out)
    assert back.format == "comfyui"
    assert sorted(back.modules) == sorted(aw.modules)
    ours = merged_state(base, back)
    assert max_rel_err(ours, ref) < 1e-5
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    for k in keys:
        assert COMFY_PREFIX.match(k), k
        suffix = k.split(".", 1)[1] if style == "lycoris" else re.sub(r"^.*?_proj\.", "", k)
        assert suffix in COMFY_SUFFIXES, k
    assert meta["sidestep_export"] == "comfyui" and meta["sidestep_export_key_style"] == style
    kind = CASES[case][0]
    assert json.loads(meta["sidestep_adapter"]) == kind
    # every LoRA-type module carries its own alpha, so strength 1.0 is the trained strength
    per_module = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    if kind in ("lora", "dora", "loha"):
        assert all(f"{m}.alpha" in keys for m in per_module)
    if kind == "dora":
        assert meta["sidestep_dora_base_identity"] == "abc"
        assert "exact only on the base model" in meta["sidestep_dora_semantics"]
    if case == "oft_rescaled":
        assert any("full deltas" in n for n in notes)
        assert all(not k.endswith("oft_blocks") for k in keys)


def test_dora_scale_is_a_column_per_output_row(saved, base):
    folder, _ = saved("dora")
    sd, _ = to_comfyui_state_dict(read_adapter_weights(folder), base=base)
    scales = {k: v for k, v in sd.items() if k.endswith(".dora_scale")}
    assert scales and all(v.dim() == 2 and v.shape[1] == 1 for v in scales.values())
    assert all(v.dtype == torch.float32 for v in scales.values())


def test_dora_needs_the_base_model(saved):
    folder, _ = saved("dora")
    aw = read_adapter_weights(folder)
    assert needs_base(aw)
    with pytest.raises(ExportError, match="needs the base model"):
        to_comfyui_state_dict(aw)
    folder2, _ = saved("oft_rescaled")
    with pytest.raises(ExportError, match="rescaled OFT"):
        to_comfyui_state_dict(read_adapter_weights(folder2))


def test_alpha_is_written_from_the_peft_config(tmp_path, dit, base):
    """The classic half-strength PEFT export: alpha lives in adapter_config.json; we write alpha = scale · rank."""
    folder, _ = saved_adapter(tmp_path, dit, "lora_patterns")
    sd, _ = to_comfyui_state_dict(read_adapter_weights(folder), base=base)
    q = "diffusion_model.decoder.layers.0.self_attn.q_proj"
    assert sd[f"{q}.lora_down.weight"].shape[0] == 8 and float(sd[f"{q}.alpha"]) == 8.0  # rank 8, alpha 8
    up = "diffusion_model.decoder.layers.1.mlp.up_proj"
    assert float(sd[f"{up}.alpha"]) == 3.0
    other = "diffusion_model.decoder.layers.2.cross_attn.v_proj"
    assert float(sd[f"{other}.alpha"]) == 8.0 and sd[f"{other}.lora_down.weight"].shape[0] == 4


def test_lokr_scale_folds_into_full_factors(dit, base):
    """ComfyUI ignores alpha when both Kronecker factors are full; a scale other than 1 goes into lokr_w1."""
    w1, w2 = torch.randn(8, 8), torch.randn(8, 8)
    sd = {"lycoris_layers_0_self_attn_q_proj.lokr_w1": w1, "lycoris_layers_0_self_attn_q_proj.lokr_w2": w2}
    aw = parse_state_dict(sd, "lycoris", source="mem")
    aw.modules["layers.0.self_attn.q_proj"].scale = 0.5
    out, notes = to_comfyui_state_dict(aw)
    assert torch.allclose(out["diffusion_model.decoder.layers.0.self_attn.q_proj.lokr_w1"], w1 * 0.5)
    assert "diffusion_model.decoder.layers.0.self_attn.q_proj.alpha" not in out
    assert notes


def test_conv_lokr_is_written_as_a_full_delta(base):
    """ComfyUI 0.27's loader builds kron(w1, w2) for a 3-D (Conv1d) lokr_w2 differently from how LyCORIS and
    ComfyUI's own trainer do, so such modules are exported as exact deltas."""
    w1, w2 = torch.randn(4, 4), torch.randn(16, 48, 2)  # proj_in.1: Conv1d(192 -> 64, k=2)
    aw = parse_state_dict({"diffusion_model.decoder.proj_in.1.lokr_w1": w1,
                           "diffusion_model.decoder.proj_in.1.lokr_w2": w2}, "comfyui", source="mem")
    aw.check_decoder(base)
    sd, notes = to_comfyui_state_dict(aw)
    diff = sd["diffusion_model.decoder.proj_in.1.diff"]
    assert diff.shape == (64, 192, 2)
    assert torch.allclose(diff, torch.kron(w1[:, :, None], w2))
    assert any("Conv1d LoKr" in n for n in notes)


def test_dtype_option_and_default_path(tmp_path, saved):
    folder, _ = saved("lora")
    aw = read_adapter_weights(folder)
    sd, _ = to_comfyui_state_dict(aw, dtype=torch.bfloat16)
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in sd.items() if k.endswith(".alpha")} == {torch.float32}
    c = "_comfyui.safetensors"
    assert default_output_path(folder, c) == folder.resolve().parent / "lora_comfyui.safetensors"
    assert default_output_path(folder / "adapter_model.safetensors", c).name == "lora_comfyui.safetensors"
    assert default_output_path(folder, "_peft") == folder.resolve().parent / "lora_peft"
    (folder / "ema").mkdir()
    assert default_output_path(folder / "ema", c) == folder.resolve().parent / "lora_ema_comfyui.safetensors"
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    assert default_output_path(f, c) == tmp_path / "x_comfyui.safetensors"


def test_trainlora_style_file_round_trip(base, tiny_original):
    """A ComfyUI TrainLoraNode-style file (whole model: decoder projections, norms as diff, biases as diff_b,
    encoder modules) survives export → read unchanged."""
    from sidestep_core.model import load_acestep

    model = load_acestep(tiny_original / DIT, dtype=torch.float32).model
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("decoder.layers.0.self_attn.q_proj", "decoder.condition_embedder",
                 "encoder.lyric_encoder.layers.0.mlp.up_proj"):
        w = model.get_submodule(name).weight
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.1
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.1
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(1.0)
    sd["diffusion_model.decoder.condition_embedder.diff_b"] = torch.randn(64, generator=g)
    sd["diffusion_model.decoder.layers.0.mlp_norm.diff"] = torch.randn(64, generator=g)
    aw = parse_state_dict(sd, "comfyui", source="trainlora")
    out, _ = to_comfyui_state_dict(aw)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
