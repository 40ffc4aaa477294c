"""The planner LM's adapter in a real ComfyUI: the exported file loads through ``comfy.sd.load_lora_for_models`` onto
the ACE-Step 1.5 text encoder's LM (DualCLIPLoader type ``ace``) with no key left out, and ComfyUI's patched
weights equal the PEFT adapter merged into the same LM.

ComfyUI builds the 1.7B LM with fixed sizes, so the LM here has the 1.7B's layer shapes but only two layers (and a
small vocabulary): a file holds what it holds, and the layers it lacks stay unloaded, which the LoRA never touches.
"""

from __future__ import annotations

import re

import pytest
import torch

import comfy_harness as H
from adapter_helpers import log_lines

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

BAD_LINE = re.compile(r"lora key not loaded|ERROR lora|NOT LOADED|WEIGHT NOT MERGED", re.I)


def lm_of_the_1_7b_shape(layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    conf = Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=1024, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, rope_theta=1e6)
    lm = Qwen3ForCausalLM(conf).eval()
    with torch.no_grad():  # weights a bf16 file holds exactly, as the released LM is stored (ComfyUI keeps bf16)
        for p in lm.parameters():
            p.copy_(p.bfloat16().float())
    return lm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base LM state in ComfyUI's file layout, the LM adapter folder, the merged weights) for a random LoRA."""
    from sidestep_core.planner.lm_adapter import inject_lm_lora

    lm = lm_of_the_1_7b_shape()
    # ComfyUI's embedding table has the released 217,204 rows: leave it out of the file (never adapted)
    base = {k: v.detach().clone() for k, v in lm.state_dict().items()
            if k.startswith(("model.layers.", "model.norm"))}
    adapter = inject_lm_lora(lm, rank=4, alpha=8.0, dropout=0.0, mlp=True)
    with torch.no_grad():
        for name, p in adapter.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # PEFT starts B at zero: make the delta visible
    folder = adapter.save(tmp_path_factory.mktemp("lm_adapter") / "lm", {"sidestep_status": "complete"})
    merged = {k: v.detach().clone() for k, v in adapter.peft_model.merge_and_unload().state_dict().items()}
    return base, folder, merged, adapter.targets


@pytest.fixture(scope="module")
def clip(comfy, trained):
    base, *_ = trained
    te = comfy.utils.load_torch_file(str(H.write_model_set() / "text_encoders" / H.TE_NAME), safe_load=True)
    lm_file = {k: v.bfloat16() for k, v in base.items()}
    c = comfy.sd.load_text_encoder_state_dicts([te, lm_file], clip_type=comfy.sd.CLIPType.ACE)
    yield c
    del c
    comfy.model_management.unload_all_models()


def test_lm_export_loads_onto_comfyuis_lm_exactly(comfy, clip, trained, tmp_path):
    from sidestep_core.planner.lm_adapter import export_lm_comfyui

    base, folder, merged, targets = trained
    path = export_lm_comfyui(folder, tmp_path / "my_style_lm.safetensors")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(k.startswith("text_encoders.qwen3_2b.transformer.model.layers.") for k in sd)
    with log_lines() as lines:
        _, patched = comfy.sd.load_lora_for_models(None, clip, sd, 0.0, 1.0)
    assert [ln for ln in lines if BAD_LINE.search(ln)] == []
    keys = {f"qwen3_2b.transformer.{t}.weight" for t in targets}
    assert set(patched.patcher.patches) == keys and len(keys) == 2 * 7
    comfy_sd = clip.cond_stage_model.state_dict()
    for t in targets:
        key = f"qwen3_2b.transformer.{t}.weight"
        assert torch.equal(comfy_sd[key].float(), base[f"{t}.weight"])  # the base ComfyUI holds is ours
        got = comfy.lora.calculate_weight(patched.patcher.patches[key], comfy_sd[key].float().clone(), key)
        want = merged[f"{t}.weight"]
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), t


@pytest.fixture(scope="module")
def apply_node(comfy):
    from pack_loader import pack_module

    return pack_module("apply_adapter"), pack_module("values")


def _ref(values, folder, tmp_path):
    return values.AdapterRef(path=folder, run_dir=tmp_path, name="run", kind="lora", steps=1, status="complete",
                             base_variant="turbo", base_identity="", checkpoint=tmp_path)


def test_apply_adapter_patches_the_clips_lm_through_comfyuis_patcher(comfy, clip, trained, apply_node, tmp_path):
    """A run that trained the planner LM only: the MODEL passes unchanged, the CLIP's LM gets the adapter, at
    lm_strength, exactly as merging it would give."""
    import shutil

    ext, values = apply_node
    base, folder, merged, targets = trained
    final = tmp_path / "final"
    shutil.copytree(folder, final / "lm")
    model = object()  # never touched: there is no DiT adapter in this run
    out = ext.ApplyAdapter.execute(model, adapter=_ref(values, final, tmp_path), clip=clip, lm_strength=0.5)
    same_model, patched = out.result
    assert same_model is model and patched is not clip
    lines = out.ui.as_dict()["text"]
    assert "MODEL unchanged" in lines[0] and any("planner LM: applied 14 modules" in ln for ln in lines)
    comfy_sd = clip.cond_stage_model.state_dict()
    for t in targets:
        key = f"qwen3_2b.transformer.{t}.weight"
        got = comfy.lora.calculate_weight(patched.patcher.patches[key], comfy_sd[key].float().clone(), key)
        want = base[f"{t}.weight"] + 0.5 * (merged[f"{t}.weight"] - base[f"{t}.weight"])
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), t
    assert clip.patcher.patches == {}  # the input CLIP is not changed


def test_apply_adapter_refuses_an_lm_adapter_of_another_size(comfy, clip, apply_node, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sidestep_core.planner.lm_adapter import inject_lm_lora

    ext, values = apply_node
    small = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256))
    inject_lm_lora(small, rank=2, alpha=2.0, dropout=0.0, mlp=False).save(tmp_path / "final" / "lm", {})
    with pytest.raises(ValueError, match=r"trained on a planner LM of width 64, 2 layers, but the LM given has "
                                         r"width 2048, 28 layers"):
        ext.ApplyAdapter.execute(object(), adapter=_ref(values, tmp_path / "final", tmp_path), clip=clip)
