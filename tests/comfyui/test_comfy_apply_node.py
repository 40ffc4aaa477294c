"""Apply Adapter in-process: the ComfyUI model it patches (through ComfyUI's model patcher) moves away from the base
model by exactly what our core predicts for the same adapter, strength and per-group strengths.

Adapters are made with the core's own trainer injection (random weights, so the effect is large), for LoRA, DoRA
(PEFT row-wise, converted against the base weights) and LoKr; the ``comfyui-min`` DiT is loaded by ComfyUI and by
the core in fp32, and the DiT velocity is compared on fixed inputs.
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
