"""Our adapter files against ComfyUI itself (runs only with COMFYUI_DIR set; see conftest.py).

On the ``comfyui-min`` tiny model, loaded by ``comfy.sd.load_diffusion_model``:

- every exported adapter type (LoRA, DoRA, LoKr, LoHa, OFT — every layout the trainer makes) in every key style
  loads through ``comfy.sd.load_lora_for_models`` with no "lora key not loaded" / "ERROR lora" / "NOT LOADED" line,
  and ComfyUI's patched weights at strength 1.0 equal our merged weights within 1e-4 relative;
- the facts of ../shared/docs/comfyui.md §4 that the export works around: PEFT files without alpha run at scale 1,
  PEFT DoRA magnitudes and 1-D dora_scale are not applied, [out, 1] dora_scale is divided by the base weight's row
  norm, OFT ``rescale`` is ignored, OFT strength acts twice, LoKr on Conv1d weights is rebuilt differently from
  how ComfyUI's own trainer builds it, and files from ComfyUI's trainer read back exactly.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from adapter_helpers import CASES, log_lines, make_adapter, rel_err
from sidestep_core.adapters import export_comfyui, merged_state, read_adapter_weights, to_comfyui_state_dict
from sidestep_core.adapters.delta import merged_weight
from sidestep_core.adapters.formats import parse_state_dict

TOL = 1e-4
BAD_LINE = re.compile(r"lora key not loaded|ERROR lora|NOT LOADED|WEIGHT NOT MERGED", re.I)


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(comfy, tmp_path_factory):
    """The comfyui-min DiT as a ComfyUI diffusion-model file (bf16, no key prefix, like the released split file)."""
    import json

    from sidestep_core.tiny.profiles import get_profile
    from sidestep_core.tiny.writer import dit_state

    prof = get_profile("comfyui-min")
    path = tmp_path_factory.mktemp("comfyui_min") / "acestep_v1.5_turbo.safetensors"
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in dit_state(prof, 0).items()}
    save_file(state, str(path), metadata={"config": json.dumps(prof.dit.to_dict())})
    return path


@pytest.fixture(scope="module")
def comfy_model(comfy, model_file):
    mp = comfy.sd.load_diffusion_model(str(model_file), model_options={"dtype": torch.float32})
    assert type(mp.model).__name__ == "ACEStep15"
    return mp


@pytest.fixture(scope="module")
def comfy_base(comfy_model):
    return {k: v.detach().float().clone() for k, v in comfy_model.model.state_dict().items()}


def core(model_file, parts=("decoder",)):
    from sidestep_core.model import load_acestep

    return load_acestep(model_file, dtype=torch.float32, parts=set(parts) if parts else None).model


def load_in_comfy(comfy, mp, sd, strength=1.0):
    """``comfy.sd.load_lora_for_models`` as LoraLoaderModelOnly calls it; returns (patched model, log lines)."""
    with log_lines() as lines:
        patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, strength, 0)
    return patched, lines


def comfy_weight(comfy, patched, base, key):
    """ComfyUI's patched weight for one key (fp32), exactly as ModelPatcher computes it."""
    return comfy.lora.calculate_weight(patched.patches[key], base[key].clone(), key)


def bad_lines(lines):
    return [ln for ln in lines if BAD_LINE.search(ln)]


def file_sd(comfy, path):
    return comfy.utils.load_torch_file(str(path), safe_load=True)


# ----------------------------------------------------------------------------------------------------------
# exports: exact in ComfyUI for every type and key style
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_file):
    """case -> (AdapterWeights read from the trainer's files, our merged weights), made once per case."""
    cache = {}
    root = tmp_path_factory.mktemp("adapters")

    def get(case):
        if case not in cache:
            kind, over = CASES[case]
            dec = core(model_file).decoder
            adapter = make_adapter(dec, kind, **{**over, **({"oft_block_size": 32} if kind == "oft" else {})})
            adapter.save(root / case, {"sidestep_adapter": f'"{kind}"'})
            aw = read_adapter_weights(root / case)
            cache[case] = (aw, merged_state(core(model_file).decoder, aw), root / case)
        return cache[case]

    return get


@pytest.mark.parametrize("style", ["comfy", "peft", "lycoris"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_cleanly_and_exactly(comfy, comfy_model, comfy_base, model_file, exported, tmp_path, case,
                                          style):
    aw, ours, _ = exported(case)
    path, _ = export_comfyui(aw, tmp_path / f"{case}.safetensors", base=core(model_file), key_style=style)
    patched, lines = load_in_comfy(comfy, comfy_model, file_sd(comfy, path))
    assert bad_lines(lines) == []
    keys = {f"diffusion_model.decoder.{n}.weight" for n in aw.modules}
    assert set(patched.patches) == keys
    worst = max(rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), w)
                for n, w in ours.items())
    assert worst < TOL


def test_patch_model_applies_and_restores(comfy, comfy_model, comfy_base, model_file, exported, tmp_path):
    """The full ModelPatcher path (patch_model / unpatch_model) gives the same weights."""
    aw, ours, _ = exported("dora")
    path, _ = export_comfyui(aw, tmp_path / "dora.safetensors", base=core(model_file))
    patched, _ = load_in_comfy(comfy, comfy_model, file_sd(comfy, path))
    patched.patch_model()
    try:
        sd = patched.model.state_dict()
        worst = max(rel_err(sd[f"diffusion_model.decoder.{n}.weight"], w) for n, w in ours.items())
    finally:
        patched.unpatch_model()
    assert worst < TOL
    after = comfy_model.model.state_dict()
    assert all(torch.equal(after[k].float(), comfy_base[k]) for k in list(comfy_base)[:50])


@pytest.mark.parametrize("case", ["lora", "dora", "loha"])
def test_strength_semantics(comfy, comfy_model, comfy_base, model_file, exported, tmp_path, case):
    """At strength s ComfyUI gives W + s·(W'−W) for LoRA / LoHa and for DoRA — our definition of strength."""
    aw, _, _ = exported(case)
    path, _ = export_comfyui(aw, tmp_path / "s.safetensors", base=core(model_file))
    patched, _ = load_in_comfy(comfy, comfy_model, file_sd(comfy, path), strength=0.6)
    dec = core(model_file).decoder
    for n, m in aw.modules.items():
        key = f"diffusion_model.decoder.{n}.weight"
        ours = merged_weight(m, dec.get_submodule(n).weight, 0.6)
        assert rel_err(comfy_weight(comfy, patched, comfy_base, key), ours) < TOL, n


# ----------------------------------------------------------------------------------------------------------
# facts about ComfyUI's formats that the export works around
# ----------------------------------------------------------------------------------------------------------


def test_fact_peft_file_without_alpha_runs_at_scale_one(comfy, comfy_model, comfy_base, exported):
    """comfyui.md §4.7: PEFT keys load (the base_model.model alias), but alpha lives in adapter_config.json, so
    ComfyUI applies up·down at scale 1.0 — half strength for r=4, alpha=8."""
    aw, ours, folder = exported("lora")
    patched, lines = load_in_comfy(comfy, comfy_model, file_sd(comfy, folder / "adapter_model.safetensors"))
    assert bad_lines(lines) == []
    n = "layers.0.self_attn.q_proj"
    m = aw.modules[n]
    assert m.scale == 2.0
    got = comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight")
    half = comfy_base[f"diffusion_model.decoder.{n}.weight"] + m.tensors["up"].float() @ m.tensors["down"].float()
    assert rel_err(got, half) < TOL
    assert rel_err(got, ours[n]) > 1e-3


def test_fact_peft_dora_magnitude_is_not_loaded(comfy, comfy_model, comfy_base, exported):
    """comfyui.md §4.2: ``lora_magnitude_vector`` is not a key ComfyUI reads; the layer gets plain LoRA."""
    aw, ours, folder = exported("dora")
    patched, lines = load_in_comfy(comfy, comfy_model, file_sd(comfy, folder / "adapter_model.safetensors"))
    unloaded = [ln for ln in lines if "lora key not loaded" in ln]
    assert len(unloaded) == len(aw.modules) and all("lora_magnitude_vector" in ln for ln in unloaded)
    n = "layers.1.mlp.down_proj"
    assert rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), ours[n]) > 1e-3


def test_fact_1d_dora_scale_is_not_applied(comfy, comfy_model, comfy_base, exported):
    """comfyui.md §4.4 / sidestep.md §4.3: Side-Step's exporter renames the PEFT magnitude [out] to dora_scale.
    When the weights are patched ComfyUI logs ``ERROR lora <key> …`` and keeps the base weight of a non-square
    layer; on a square layer the [out] vector broadcasts along the input axis and the weight comes out wrong
    without any message."""
    aw, ours, _ = exported("dora")
    sd = {}
    for n, m in aw.modules.items():
        x = f"base_model.model.{n}"
        sd[f"{x}.lora_up.weight"] = m.tensors["up"]
        sd[f"{x}.lora_down.weight"] = m.tensors["down"]
        sd[f"{x}.alpha"] = torch.tensor(m.scale * m.rank())
        sd[f"{x}.dora_scale"] = m.dora.reshape(-1)
    patched, lines = load_in_comfy(comfy, comfy_model, sd)
    assert bad_lines(lines) == []  # nothing is reported at load time ...
    n = "layers.0.cross_attn.o_proj"
    key = f"diffusion_model.decoder.{n}.weight"
    with log_lines() as lines:
        got = comfy_weight(comfy, patched, comfy_base, key)
    assert any(ln.startswith(f"ERROR lora {key}") for ln in lines)  # ... but when the weight is patched
    assert torch.equal(got, comfy_base[key])
    # a square layer: no error, wrong weight
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g)
    up, down = torch.randn(32, 4, generator=g) * 0.1, torch.randn(4, 32, generator=g) * 0.1
    mag = torch.rand(32, generator=g) + 0.5
    adapter = comfy.weight_adapter.LoRAAdapter(set(), (up, down, 4.0, None, mag, None))
    square = adapter.calculate_weight(w.clone(), "k", 1.0, 1.0, None, lambda a: a)
    peft = (w + up @ down) * (mag[:, None] / (w + up @ down).norm(dim=1, keepdim=True))
    assert rel_err(square, peft) > 1e-2 and rel_err(square, w) > 1e-2
    # our reader takes it as PEFT's magnitude; re-exported, ComfyUI applies it exactly
    back = parse_state_dict(sd, "comfyui")
    assert back.modules[n].dora_mode == "row_merged"


@pytest.mark.parametrize("shape", ["row", "col"])
def test_fact_dora_scale_semantics(comfy, comfy_model, comfy_base, model_file, shape):
    """comfyui.md §4.4: [out, 1] is divided by the base weight's row norm, [1, in] by the merged weight's column
    norm; our reading of ComfyUI-format files reproduces both."""
    dec = core(model_file).decoder
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"):
        w = dec.get_submodule(n).weight
        x = f"diffusion_model.decoder.{n}"
        sd[f"{x}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.05
        sd[f"{x}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.05
        sd[f"{x}.alpha"] = torch.tensor(8.0)
        d = torch.rand(w.shape[0] if shape == "row" else w.shape[1], generator=g) + 0.5
        sd[f"{x}.dora_scale"] = d.reshape(-1, 1) if shape == "row" else d.reshape(1, -1)
    patched, lines = load_in_comfy(comfy, comfy_model, sd)
    assert bad_lines(lines) == []
    aw = parse_state_dict(sd, "comfyui")
    ours = merged_state(dec, aw)
    for n in ours:
        assert rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), ours[n]) < TOL


def test_fact_lycoris_files_load_directly(comfy, comfy_model, comfy_base, exported):
    """comfyui.md §4.1: the trainer's LyCORIS files (lycoris_ alias, since ComfyUI 0.16) load as they are and are
    exact, except OFT with rescale / a constraint: ComfyUI loads ``rescale`` without a warning and ignores it."""
    for case in ("lokr_full", "lokr_lowrank", "lokr_both", "loha", "oft"):
        aw, ours, folder = exported(case)
        f = next(folder.glob("*_weights.safetensors"))
        patched, lines = load_in_comfy(comfy, comfy_model, file_sd(comfy, f))
        assert bad_lines(lines) == [], case
        worst = max(rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), w)
                    for n, w in ours.items())
        assert worst < TOL, case
    aw, ours, folder = exported("oft_rescaled")
    patched, lines = load_in_comfy(comfy, comfy_model, file_sd(comfy, folder / "oft_weights.safetensors"))
    assert bad_lines(lines) == []
    worst = max(rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), w)
                for n, w in ours.items())
    assert worst > 1e-3


def test_fact_oft_strength_acts_twice(comfy, comfy_model, comfy_base, model_file, exported, tmp_path):
    """ComfyUI 0.27's OFTAdapter scales (R − I) by the strength and the result again: W + s²·(W'−W)."""
    aw, _, _ = exported("oft")
    path, _ = export_comfyui(aw, tmp_path / "oft.safetensors")
    patched, _ = load_in_comfy(comfy, comfy_model, file_sd(comfy, path), strength=0.5)
    dec = core(model_file).decoder
    n = "layers.0.self_attn.v_proj"
    expected = merged_weight(aw.modules[n], dec.get_submodule(n).weight, 0.25)
    assert rel_err(comfy_weight(comfy, patched, comfy_base, f"diffusion_model.decoder.{n}.weight"), expected) < TOL


# ----------------------------------------------------------------------------------------------------------
# ComfyUI's own trainer format (TrainLoraNode / SaveLoRA)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_trainlora_files(comfy, comfy_model, comfy_base, model_file, algorithm):
    """The state dict TrainLoraNode saves (built with its own adapter set-up on the whole model: every linear and
    convolution, norms as .diff, biases as .diff_b) reads back to ComfyUI's weights — except LoKr on the Conv1d /
    ConvTranspose1d layers, which ComfyUI's loader rebuilds differently from its trainer; our re-export fixes that."""
    from comfy_extras import nodes_train

    mp = comfy_model.clone()
    params, _ = nodes_train._setup_lora_adapters(mp, {}, algorithm, torch.float32, 4)
    g = torch.Generator().manual_seed(1)
    sd = {k: (v.detach().clone() if k.endswith(".alpha") else torch.randn(v.shape, generator=g) * 0.02)
          for k, v in params.items()}
    aw = parse_state_dict(sd, "comfyui", source=f"TrainLoraNode-{algorithm}")
    assert aw.outside, "TrainLoraNode adapts the whole model"
    model = core(model_file, parts=None)
    from sidestep_core.adapters import merge_adapter

    handle = merge_adapter(model, aw)
    assert handle.skipped == []
    ours = {f"diffusion_model.{k}": v for k, v in model.state_dict().items()}

    patched, lines = load_in_comfy(comfy, comfy_model, sd)
    assert bad_lines(lines) == []
    off = {k for k in patched.patches if rel_err(comfy_weight(comfy, patched, comfy_base, k), ours[k]) >= TOL}
    if algorithm == "LoKr":
        assert off <= {"diffusion_model.decoder.proj_in.1.weight", "diffusion_model.decoder.proj_out.1.weight"}
    else:
        assert off == set()
    again, _ = to_comfyui_state_dict(aw)
    patched2, lines2 = load_in_comfy(comfy, comfy_model, again)
    assert bad_lines(lines2) == []
    assert set(patched2.patches) == set(patched.patches)
    assert all(rel_err(comfy_weight(comfy, patched2, comfy_base, k), ours[k]) < TOL for k in patched2.patches)
