"""Apply Adapter in-process: the ComfyUI model it patches (through ComfyUI's model patcher) moves away from the base
model by exactly what our core predicts for the same adapter, strength and per-group strengths.

Adapters are made with the core's own trainer injection (random weights, so the effect is large), for LoRA, DoRA
(PEFT row-wise, converted against the base weights) and LoKr; the ``comfyui-min`` DiT is loaded by ComfyUI and by
the core in fp32, and the DiT velocity is compared on fixed inputs.

An adapter made for a model of another shape (the core's ``tiny`` profile) is refused before anything is patched,
with the message ``sidestep export`` gives, from the graph and from ``models/loras`` files in each key style;
one ComfyUI applies only in part is reported in the node's text and log.
"""

from __future__ import annotations

import pytest
import torch

import comfy_harness as H

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

STRENGTH = 0.7
GROUPS = {"self_attn_strength": 1.0, "cross_attn_strength": 0.5, "mlp_strength": 2.0}
MARKERS = {"self_attn_strength": ".self_attn.", "cross_attn_strength": ".cross_attn.", "mlp_strength": ".mlp."}


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    from pack_loader import pack_module

    ext = pack_module("apply_adapter")
    values = pack_module("values")
    models = H.write_model_set()
    dit = models / "diffusion_models" / H.DIT_NAME
    patcher = comfy.sd.load_diffusion_model(str(dit), model_options={"dtype": torch.float32})
    loras = tmp_path_factory.mktemp("loras")
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    yield ext, values, patcher, dit, loras
    comfy.model_management.unload_all_models()


def make_adapter(dit, kind: str, folder):
    from sidestep_core.config import TrainConfig
    from sidestep_core.model import load_acestep
    from sidestep_core.training.adapters import inject_adapter

    decoder = load_acestep(dit, dtype=torch.float32, parts={"decoder"}).model.decoder
    cfg = TrainConfig(adapter=kind, rank=4, alpha=8.0, dropout=0.0, target_mlp=True, lokr_factor=4)
    torch.manual_seed(0)
    adapter = inject_adapter(decoder, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter.named_parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * 0.05)
    adapter.save(folder, {"sidestep_adapter": f'"{kind}"'})
    return folder


def decoder_out(decoder, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return decoder(inputs["xt"], inputs["t"], inputs["t"], inputs["enc"], inputs["ctx"]).float()


def comfy_out(comfy, patcher, inputs) -> torch.Tensor:
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    decoder = patcher.model.diffusion_model.decoder
    with torch.inference_mode():
        return decoder(inputs["xt"], inputs["t"], inputs["t"], None, inputs["enc"], None, inputs["ctx"]).float()


def core_prediction(dit, adapter_path, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Our decoder's output without and with the adapter, each group merged at its own strength."""
    from sidestep_core.adapters import AdapterWeights, merge_adapter, read_adapter_weights
    from sidestep_core.model import load_acestep

    decoder = load_acestep(dit, dtype=torch.float32, parts={"decoder"}).model.decoder
    base = decoder_out(decoder, inputs)
    aw = read_adapter_weights(adapter_path)
    for group, marker in MARKERS.items():
        part = {n: m for n, m in aw.modules.items() if marker in f".{n}."}
        if part:
            merge_adapter(decoder, AdapterWeights(part, aw.metadata, aw.source, aw.format),
                          STRENGTH * GROUPS[group])
    rest = {n: m for n, m in aw.modules.items() if not any(mk in f".{n}." for mk in MARKERS.values())}
    if rest:
        merge_adapter(decoder, AdapterWeights(rest, aw.metadata, aw.source, aw.format), STRENGTH)
    return base, decoder_out(decoder, inputs)


def fixed_inputs():
    g = torch.Generator().manual_seed(5)
    return {"xt": torch.randn(1, 301, 64, generator=g), "ctx": torch.randn(1, 301, 128, generator=g),
            "enc": torch.randn(1, 19, 2048, generator=g), "t": torch.tensor([0.6])}


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr"])
def test_apply_adapter_moves_the_model_as_the_core_predicts(comfy, setup, tmp_path, kind):
    ext, values, base_patcher, dit, loras = setup
    folder = make_adapter(dit, kind, tmp_path / kind)
    ref = values.AdapterRef(path=folder, run_dir=tmp_path, name=kind, kind=kind, steps=0, status="complete",
                            base_variant="turbo", base_identity="", checkpoint=dit)
    inputs = fixed_inputs()

    out = ext.ApplyAdapter.execute(base_patcher, strength=STRENGTH, adapter=ref, **GROUPS)
    patched = out.result[0]
    assert patched is not base_patcher and "applied" in out.ui.as_dict()["text"][0]
    comfy_base = comfy_out(comfy, base_patcher, inputs)
    comfy_patched = comfy_out(comfy, patched, inputs)
    core_base, core_patched = core_prediction(dit, folder, inputs)

    assert rel(comfy_base, core_base) < 1e-5
    comfy_delta, core_delta = comfy_patched - comfy_base, core_patched - core_base
    assert core_delta.abs().max() > 1e-2 * core_base.abs().max()  # the adapter really changes the output
    assert rel(comfy_delta, core_delta) < 1e-4, rel(comfy_delta, core_delta)  # measured: 2e-6 to 5e-6
    # The base patcher itself is untouched: loading it again gives the base output.
    assert torch.equal(comfy_out(comfy, base_patcher, inputs), comfy_base)


def test_apply_adapter_from_a_lora_file_matches_the_graph_adapter(comfy, setup, tmp_path):
    ext, values, base_patcher, dit, loras = setup
    from sidestep_core.adapters import export_comfyui, read_adapter_weights

    folder = make_adapter(dit, "lora", tmp_path / "lora")
    export_comfyui(read_adapter_weights(folder), loras / "from_file.safetensors")
    ref = values.AdapterRef(path=folder, run_dir=tmp_path, name="x", kind="lora", steps=0, status="complete",
                            base_variant="turbo", base_identity="", checkpoint=dit)
    inputs = fixed_inputs()
    from_graph = comfy_out(comfy, ext.ApplyAdapter.execute(base_patcher, strength=STRENGTH, adapter=ref,
                                                           **GROUPS).result[0], inputs)
    from_file = comfy_out(comfy, ext.ApplyAdapter.execute(base_patcher, lora_name="from_file.safetensors",
                                                          strength=STRENGTH, **GROUPS).result[0], inputs)
    assert rel(from_file, from_graph) < 1e-6

    # ComfyUI's own LoraLoaderModelOnly gives the same model at a single strength (groups all 1).
    stock = comfy.sd.load_lora_for_models(base_patcher, None, comfy.utils.load_torch_file(
        str(loras / "from_file.safetensors"), safe_load=True), STRENGTH, 0)[0]
    ours = ext.ApplyAdapter.execute(base_patcher, lora_name="from_file.safetensors", strength=STRENGTH).result[0]
    assert rel(comfy_out(comfy, ours, inputs), comfy_out(comfy, stock, inputs)) < 1e-6


def test_apply_adapter_needs_an_adapter(setup):
    ext, _, base_patcher, _, _ = setup
    with pytest.raises(ValueError, match="connect an adapter or choose a lora_name"):
        ext.ApplyAdapter.execute(base_patcher)


# ----------------------------------------------------------------------------------------------------------
# adapters made for another model (issue 10, defect 3)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_model_dit(tmp_path_factory):
    """The core's ``tiny`` profile (64 wide, 4 layers): a model of another shape than ``comfyui-min``."""
    from sidestep_core.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("other-model"), "original", "tiny", 0).dit


def export_error(adapter_path, dit) -> str:
    """What ``sidestep export`` says for this adapter against the ComfyUI test model (its ``error:`` line)."""
    import os
    import subprocess
    import sys

    out = adapter_path.parent / f"{adapter_path.name}-export.safetensors"
    done = subprocess.run([sys.executable, "-m", "sidestep_core", "export", str(adapter_path), "--checkpoint",
                           str(dit), "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode != 0 and not out.exists(), done.stdout + done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert lines, done.stderr
    return lines[-1][len("error: "):]


def assert_refused(ext, base_patcher, expected: str, **inputs):
    from sidestep_core.adapters import AdapterShapeError

    with pytest.raises(AdapterShapeError) as err:
        ext.ApplyAdapter.execute(base_patcher, strength=1.0, **inputs)
    assert str(err.value) == expected
    # which modules and which shapes: a missing layer and a mismatch with both shapes
    assert "made for another model" in expected and "the model does not have, first: layers.2." in expected
    assert "shape mismatch(es), first: layers.0." in expected and "adapter [" in expected and "vs model [" in expected


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_apply_refuses_a_connected_adapter_for_another_model(comfy, setup, other_model_dit, tmp_path, kind):
    ext, values, base_patcher, dit, _ = setup
    folder = make_adapter(other_model_dit, kind, tmp_path / kind)
    ref = values.AdapterRef(path=folder, run_dir=tmp_path, name=kind, kind=kind, steps=0, status="complete",
                            base_variant="turbo", base_identity="", checkpoint=other_model_dit)
    assert_refused(ext, base_patcher, export_error(folder, dit), adapter=ref)
    assert not base_patcher.patches  # nothing was patched


@pytest.mark.parametrize("key_style", ["comfy", "peft", "lycoris"])
def test_apply_refuses_a_lora_file_for_another_model(comfy, setup, other_model_dit, tmp_path, key_style):
    ext, _, base_patcher, dit, loras = setup
    from sidestep_core.adapters import export_comfyui, read_adapter_weights

    folder = make_adapter(other_model_dit, "lora", tmp_path / "lora")
    name = f"other_model_{key_style}.safetensors"
    export_comfyui(read_adapter_weights(folder), loras / name, key_style=key_style)
    assert_refused(ext, base_patcher, export_error(loras / name, dit), lora_name=name)


def test_apply_warns_when_only_part_of_an_adapter_applies(comfy, setup, tmp_path, caplog):
    """A PEFT-style file with a module outside the decoder: ComfyUI maps ``base_model.model.`` keys inside the
    decoder only, so it applies the decoder modules and leaves the rest out; the node says so."""
    ext, _, base_patcher, dit, loras = setup
    from safetensors.torch import load_file, save_file

    from sidestep_core.adapters import export_comfyui, read_adapter_weights

    folder = make_adapter(dit, "lora", tmp_path / "lora")
    path = loras / "partly.safetensors"
    export_comfyui(read_adapter_weights(folder), path, key_style="peft")
    sd = load_file(str(path))
    q = base_patcher.model.diffusion_model.encoder.lyric_encoder.layers[0].self_attn.q_proj.weight
    outside = "base_model.model.encoder.lyric_encoder.layers.0.self_attn.q_proj"
    sd[f"{outside}.lora_A.weight"] = torch.randn(4, q.shape[1]) * 0.01
    sd[f"{outside}.lora_B.weight"] = torch.randn(q.shape[0], 4) * 0.01
    save_file(sd, str(path))

    with caplog.at_level("WARNING"):
        out = ext.ApplyAdapter.execute(base_patcher, lora_name="partly.safetensors", strength=1.0)
    shown = out.ui.as_dict()["text"][0]
    assert "applied" in shown and "warning: only part of the adapter applies" in shown, shown
    assert "2 of " in shown and outside in shown, shown
    assert any("only part of the adapter applies" in r.getMessage() and r.name == "sidestep.nodes"
               for r in caplog.records)
    # the whole adapter fits, so nothing is said for a complete one
    export_comfyui(read_adapter_weights(folder), loras / "whole.safetensors", key_style="peft")
    whole = ext.ApplyAdapter.execute(base_patcher, lora_name="whole.safetensors", strength=1.0)
    assert "only part" not in whole.ui.as_dict()["text"][0]
