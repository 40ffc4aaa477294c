"""Exported adapters in diffusers' ACE-Step 1.5 pipeline (``AceStepPipeline.load_lora_weights``).

The tiny DiT is converted to ``AceStepTransformer1DModel``'s layout with the core's documented mapping (which loads
with no missing or unexpected key — checked here), the pipeline is built around it, and each exported adapter is
loaded through ``load_lora_weights``: no key is left out (diffusers warns about unexpected / missing LoRA keys;
every target gets a LoRA layer), and after ``fuse_lora`` every adapted weight equals the library's own merged
weight (PEFT ``merge_and_unload`` / the LyCORIS module's forward) within 1e-5 relative (fp32).
"""

from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from adapter_helpers import DIT, decoder, log_lines, rel_err, saved_adapter
from sidestep_core.adapters import read_adapter_weights
from sidestep_core.adapters.diffusers_format import diffusers_name, diffusers_state_dict, export_diffusers
from sidestep_core.adapters.merge import weighted_sum

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "AceStepPipeline"):
    pytest.skip("this diffusers has no ACE-Step pipeline (added in 0.42)", allow_module_level=True)

TOL = 1e-5


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


def transformer(dit):
    """The tiny DiT as diffusers' ``AceStepTransformer1DModel`` (fp32)."""
    from diffusers import AceStepTransformer1DModel

    config = json.loads((dit / "config.json").read_text())
    params = inspect.signature(AceStepTransformer1DModel.__init__).parameters
    model = AceStepTransformer1DModel(**{k: v for k, v in config.items() if k in params})
    state = {k: v.float() for k, v in diffusers_state_dict(load_file(str(dit / "model.safetensors"))).items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def pipeline(dit):
    from diffusers import AceStepPipeline

    names = [p for p in inspect.signature(AceStepPipeline.__init__).parameters if p != "self"]
    return AceStepPipeline(**{n: (transformer(dit) if n == "transformer" else None) for n in names
                              if inspect.signature(AceStepPipeline.__init__).parameters[n].default
                              is inspect.Parameter.empty})


def load_and_fuse(dit, path):
    """(pipeline's transformer after load_lora_weights + fuse_lora, warnings logged while loading)."""
    pipe = pipeline(dit)
    with log_lines("diffusers", logging.WARNING) as lines:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sidestep")
    return pipe, lines


def test_tiny_model_in_diffusers_layout_runs_like_the_core(dit):
    """The mapping is the model: same weights, same velocity on the same inputs."""
    dec = decoder(dit)
    model = transformer(dit)
    g = torch.Generator().manual_seed(0)
    frames = 16
    x = torch.randn(1, frames, 64, generator=g)
    ctx = torch.randn(1, frames, 128, generator=g)
    cond = torch.randn(1, 5, dec.condition_embedder.in_features, generator=g)
    t = torch.tensor([0.7])
    with torch.no_grad():
        ours = dec(x, t, t, cond, ctx)
        ours = ours[0] if isinstance(ours, tuple) else ours
        theirs = model(x, t, t, cond, ctx, return_dict=False)[0]
    assert rel_err(theirs, ours) < 1e-4


@pytest.mark.parametrize("case", ["lora", "lora_patterns", "dora", "loha", "lokr_lowrank", "lokr_both", "oft",
                                  "merged"])
def test_export_loads_in_diffusers_and_changes_the_weights_exactly(dit, tmp_path, case):
    if case == "merged":  # reference: the sources merged in turn by the core (itself checked against the libraries)
        from sidestep_core.adapters import merge_adapter

        sources = [(read_adapter_weights(saved_adapter(tmp_path, dit, c, seed=i)[0]), w)
                   for i, (c, w) in enumerate((("lora_patterns", 0.5), ("loha", 1.0), ("lokr_lowrank", -0.7)))]
        aw = weighted_sum(sources)
        dec = decoder(dit)
        for src, w in sources:
            merge_adapter(dec, src, w)
        ref = {n: dec.get_submodule(n).weight.detach().float() for n in aw.modules}
    else:
        folder, ref = saved_adapter(tmp_path, dit, case)
        aw = read_adapter_weights(folder)
    path, notes = export_diffusers(aw, tmp_path / "d.safetensors", base=decoder(dit))
    pipe, warnings = load_and_fuse(dit, path)
    assert [w for w in warnings if "lora" in w.lower() or "key" in w.lower()] == []
    model = pipe.transformer
    from peft.tuners.lora import LoraLayer

    for n in aw.modules:
        layer = model.get_submodule(diffusers_name(n))
        assert isinstance(layer, LoraLayer) and "sidestep" in layer.lora_A, n
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == len(aw.modules)
    pipe.fuse_lora(lora_scale=1.0)
    worst = max(rel_err(model.get_submodule(diffusers_name(n)).base_layer.weight, ref[n]) for n in aw.modules)
    assert worst < TOL, worst
    if case in ("oft",):
        assert any("base model given" in n for n in notes)


def test_fact_a_peft_folder_loads_in_diffusers_at_scale_one(dit, tmp_path):
    """Why there is a diffusers export at all: diffusers reads no adapter_config.json, so the upstream PEFT file
    (alpha 8, rank 4: scale 2) loads without complaint but runs at scale 1 — half the trained change."""
    folder, ref = saved_adapter(tmp_path, dit, "lora")
    aw = read_adapter_weights(folder)
    pipe, warnings = load_and_fuse(dit, folder / "adapter_model.safetensors")
    assert warnings == []
    pipe.fuse_lora(lora_scale=1.0)
    base = decoder(dit)
    for n, m in aw.modules.items():
        assert m.scale == 2.0
        got = pipe.transformer.get_submodule(diffusers_name(n)).base_layer.weight
        w = base.get_submodule(n).weight.detach().float()
        assert rel_err(got - w, 0.5 * (ref[n] - w)) < TOL


def test_names_round_trip_and_cli_export(dit, tmp_path, capsys):
    from sidestep_core.cli import main
    from sidestep_core.adapters.diffusers_format import read_diffusers, target_name

    for n in ("layers.3.self_attn.o_proj", "layers.0.cross_attn.q_norm", "proj_in.1", "condition_embedder",
              "layers.1.mlp.up_proj", "time_embed.linear_1"):
        assert target_name(diffusers_name(n)) == n
    assert diffusers_name("layers.3.self_attn.o_proj") == "layers.3.self_attn.to_out.0"
    folder, ref = saved_adapter(tmp_path, dit, "oft")
    assert main(["export", str(folder), "--format", "diffusers", "--plain"]) == 2  # OFT's delta needs the base
    assert "needs the base model" in capsys.readouterr().err
    folder, ref = saved_adapter(tmp_path, dit, "dora")
    code = main(["export", str(folder), "--format", "diffusers", "--checkpoint", str(dit), "--plain"])
    out = capsys.readouterr().out
    path = folder.resolve().parent / "dora_diffusers.safetensors"
    assert code == 0 and path.is_file() and "verified" in out
    back = read_diffusers(path)
    assert set(back.modules) == set(ref)


@pytest.mark.parametrize("dora", [False, True])
def test_a_lora_saved_by_diffusers_reads_and_applies_as_diffusers_loads_it(dit, tmp_path, dora):
    """Another tool's diffusers LoRA (PEFT on AceStepTransformer1DModel, saved by the pipeline's own
    save_lora_weights with its LoRA config: alpha 8 at rank 4, an alpha_pattern for to_q): read_adapter_weights finds
    it and the core applies it to our decoder exactly as diffusers' load_lora_weights + fuse_lora applies it."""
    from diffusers import AceStepPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from sidestep_core.adapters import detect_format, merge_adapter

    model = transformer(dit)
    conf = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_q": 2}, init_lora_weights=False, use_dora=dora,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(0)
    model.add_adapter(conf)
    AceStepPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                      transformer_lora_adapter_metadata=conf.to_dict(),
                                      weight_name="other.safetensors")
    path = tmp_path / "other.safetensors"
    assert detect_format(path)[0] == "diffusers"
    aw = read_adapter_weights(path)
    scales = {round(m.scale, 6) for n, m in aw.modules.items()}
    assert scales == {0.5, 2.0}  # to_q at 2 / 4, the rest at 8 / 4
    pipe, warnings = load_and_fuse(dit, path)
    pipe.fuse_lora(lora_scale=1.0)
    dec = decoder(dit)
    merge_adapter(dec, aw)
    fused = pipe.transformer
    worst = max(rel_err(dec.get_submodule(n).weight, fused.get_submodule(diffusers_name(n)).base_layer.weight)
                for n in aw.modules)
    assert worst < TOL, worst


def test_a_diffusers_lora_for_another_model_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from sidestep_core.adapters import AdapterShapeError

    path = tmp_path / "flux_style.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(AdapterShapeError, match="flux_style.safetensors: a diffusers LoRA for another model"):
        read_adapter_weights(path)
