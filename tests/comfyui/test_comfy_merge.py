"""Merged and baked adapters against ComfyUI itself (runs only with COMFYUI_DIR set; see conftest.py).

On the ``comfyui-min`` tiny model in fp32 (so the comparisons are not drowned in bf16 rounding):

- a weighted sum written by the core, loaded with ``comfy.sd.load_lora_for_models`` (what LoraLoaderModelOnly
  calls) at strength 1, patches every weight as the source files loaded one after the other at their weights do
  (1e-5 relative; only the order of fp32 additions differs);
- a baked model file, loaded with ``comfy.sd.load_diffusion_model`` (what UNETLoader calls), equals the base model
  with the exported sources applied in turn by ComfyUI's model patcher (``patch_model``) — every adapter type,
  DoRA first (ComfyUI's ``dora_scale`` is converted against the base weights), OFT at strength 1 (ComfyUI applies
  an OFT strength twice, comfyui.md §4); in bf16 the two are at most one bf16 step apart (plus 1e-6 of the
  weight's scale where fp32 sums cancel to almost 0);
- the Merge Adapters node writes both into ComfyUI's model folders.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from adapter_helpers import make_adapter, rel_err
from sidestep_core.adapters import export_comfyui, read_adapter_weights
from sidestep_core.adapters.bake import bake
from sidestep_core.adapters.merge import weighted_sum

pytestmark = [pytest.mark.comfyui]

TOL = 1e-5
DEC = "diffusion_model.decoder."


def _base_file(folder, dtype):
    from sidestep_core.tiny.profiles import get_profile
    from sidestep_core.tiny.writer import dit_state

    prof = get_profile("comfyui-min")
    path = folder / f"acestep_v1.5_turbo_{str(dtype).split('.')[-1]}.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in dit_state(prof, 0).items()}, str(path),
              metadata={"config": json.dumps(prof.dit.to_dict())})
    return path


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """fp32 and bf16 base files and the sources: (case -> (core adapter, exported ComfyUI file))."""
    from sidestep_core.model import load_acestep

    root = tmp_path_factory.mktemp("merge")
    base32, base16 = _base_file(root, torch.float32), _base_file(root, torch.bfloat16)
    core = load_acestep(base32, dtype=torch.float32, parts={"decoder"}).model
    cases = {"lora": ("lora", {}), "lora_r8": ("lora", {"rank": 8, "alpha": 4.0}), "loha": ("loha", {}),
             "lokr": ("lokr", {"rank": 2, "alpha": 8.0}), "dora": ("dora", {}),
             "oft": ("oft", {"oft_block_size": 32})}
    sources = {}
    for i, (case, (kind, over)) in enumerate(cases.items()):
        dec = load_acestep(base32, dtype=torch.float32, parts={"decoder"}).model.decoder
        make_adapter(dec, kind, seed=10 + i, **over).save(root / case, {"sidestep_adapter": f'"{kind}"'})
        aw = read_adapter_weights(root / case)
        path, _ = export_comfyui(aw, root / f"{case}.safetensors", base=core)
        sources[case] = (aw, path)
    return root, base32, base16, sources


def _load_file(comfy, path):
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def chain(comfy, patcher, loras):
    """``patcher`` with each (file, strength) loaded after the other, as a chain of LoraLoaderModelOnly nodes."""
    for path, strength in loras:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, _load_file(comfy, path), strength, 0)
    return patcher


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    """The model's weights after ComfyUI's patcher has applied its patches (then restored)."""
    patcher.patch_model()
    try:
        return {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("pair", [("lora", "lora_r8"), ("lora", "loha"), ("lokr", "lora_r8")])
def test_merged_lora_in_comfyui_equals_the_sources_one_after_the_other(comfy, files, tmp_path, pair):
    _, base32, _, sources = files
    weights = (0.8, -0.6)
    merged = weighted_sum([(sources[c][0], w) for c, w in zip(pair, weights)])
    path, _ = export_comfyui(merged, tmp_path / "merged.safetensors")
    base = comfy.sd.load_diffusion_model(str(base32), model_options={"dtype": torch.float32})
    one = chain(comfy, base, [(path, 1.0)])
    two = chain(comfy, base, [(sources[c][1], w) for c, w in zip(pair, weights)])
    keys = {f"{DEC}{n}.weight" for c in pair for n in sources[c][0].modules}
    assert set(one.patches) == set(two.patches) == keys
    before = {k: v.detach().float().clone() for k, v in base.model.state_dict().items()}
    got, want = patched_weights(one), patched_weights(two)
    worst = max(rel_err(got[k] - before[k], want[k] - before[k]) for k in keys)  # the weight changes
    assert worst < TOL, worst
    assert all(torch.equal(got[k], want[k]) for k in got if k not in keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_baked_file_in_unetloader_equals_comfyuis_patcher(comfy, files, tmp_path, dtype):
    _, base32, base16, sources = files
    base_file = base32 if dtype == torch.float32 else base16
    order = [("dora", 0.8), ("lora", 0.5), ("loha", -0.7), ("lokr", 1.0), ("oft", 1.0), ("lora_r8", 1.3)]
    result = bake(base_file, [(sources[c][0], s) for c, s in order], tmp_path / "baked.safetensors")
    opts = {"dtype": dtype}
    baked = comfy.sd.load_diffusion_model(str(result.path), model_options=opts)
    assert type(baked.model).__name__ == "ACEStep15"
    got = {k: v.detach().float() for k, v in baked.model.state_dict().items()}
    base = comfy.sd.load_diffusion_model(str(base_file), model_options=opts)
    files_for = {c: p for c, (_, p) in sources.items()}
    if dtype != torch.float32:  # ComfyUI's dora_scale is relative to the base weights: convert against these
        from sidestep_core.model import load_acestep

        core = load_acestep(base_file, dtype=torch.float32, parts={"decoder"}).model
        files_for["dora"], _ = export_comfyui(sources["dora"][0], tmp_path / "dora_bf16.safetensors", base=core)
    want = patched_weights(chain(comfy, base, [(files_for[c], s) for c, s in order]))
    assert set(got) == set(want)
    keys = {f"{DEC}{n}.weight" for c, _ in order for n in sources[c][0].modules}
    assert result.patched == len(keys)
    if dtype == torch.float32:
        worst = max(rel_err(got[k], want[k]) for k in keys)
        assert worst < TOL, worst
    else:  # both round an fp32 result to bf16 once; fp32 op order may flip the last bit
        for k in keys:  # one bf16 step, plus fp32 rounding of the sums where they cancel to almost 0
            step = want[k].abs() * 2.0 ** -7 + 1e-6 * want[k].abs().max()
            assert bool(((got[k] - want[k]).abs() <= step).all()), k
    assert all(torch.equal(got[k], want[k]) for k in got if k not in keys)


# ----------------------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(comfy, files, tmp_path_factory):
    import folder_paths

    from pack_loader import pack_module

    loras = tmp_path_factory.mktemp("loras")
    dms = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", str(dms), is_default=True)
    root, *_, sources = files
    for case in ("lora", "loha", "dora"):
        (loras / f"{case}.safetensors").write_bytes(sources[case][1].read_bytes())
    return pack_module("merge_adapters").MergeAdapters, pack_module("values"), loras, dms


def test_node_sum_writes_the_weighted_sum_to_loras(comfy, files, node):
    cls, _, loras, _ = node
    _, base32, _, sources = files
    out = cls.execute(mode="sum", lora_1="lora.safetensors", weight_1=0.7, lora_2="loha.safetensors",
                      weight_2=-0.2, lora_3="none", weight_3=1.0, name="mix")
    path = out.result[0]
    assert path == str(loras / "mix.safetensors")
    base = comfy.sd.load_diffusion_model(str(base32), model_options={"dtype": torch.float32})
    got = patched_weights(chain(comfy, base, [(path, 1.0)]))
    want = patched_weights(chain(comfy, base, [(sources["lora"][1], 0.7), (sources["loha"][1], -0.2)]))
    assert max(rel_err(got[k], want[k]) for k in want) < TOL
    cut = cls.execute(mode="sum", lora_1="lora.safetensors", lora_2="loha.safetensors", rank=2, name="mix2")
    assert "truncated SVD: relative error max" in cut.ui.as_dict()["text"][0]


def test_node_runs_again_when_a_source_or_its_output_changes(comfy, files, node):
    cls, _, loras, _ = node
    values = dict(mode="sum", lora_1="lora.safetensors", weight_1=1.0, lora_2="none", name="again")
    before = cls.fingerprint_inputs(**values)
    cls.execute(**values)
    written = cls.fingerprint_inputs(**values)
    assert written != before  # the output now exists
    (loras / "again.safetensors").unlink()
    assert cls.fingerprint_inputs(**values) == before
    src = loras / "lora.safetensors"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1_000_000))
    assert cls.fingerprint_inputs(**values) != before


def test_node_bake_uses_the_trained_adapters_base_and_refuses_dora_sums(comfy, files, node, tmp_path):
    cls, values, _, dms = node
    root, base32, _, sources = files
    ref = values.AdapterRef(path=root / "dora", run_dir=root, name="dora", kind="dora", steps=0,
                            status="complete", base_variant="turbo", base_identity="", checkpoint=base32)
    with pytest.raises(ValueError, match="bake"):
        cls.execute(mode="sum", adapter=ref, lora_1="lora.safetensors", name="no")
    out = cls.execute(mode="bake", adapter=ref, adapter_weight=0.9, lora_1="lora.safetensors", weight_1=0.4,
                      name="baked")
    assert out.result[0] == str(dms / "baked.safetensors")
    baked = comfy.sd.load_diffusion_model(out.result[0], model_options={"dtype": torch.float32})
    got = {k: v.float() for k, v in baked.model.state_dict().items()}
    base = comfy.sd.load_diffusion_model(str(base32), model_options={"dtype": torch.float32})
    want = patched_weights(chain(comfy, base, [(sources["dora"][1], 0.9), (sources["lora"][1], 0.4)]))
    assert max(rel_err(got[k], want[k]) for k in want) < TOL
    with pytest.raises(ValueError, match="needs the base model"):
        cls.execute(mode="bake", lora_1="lora.safetensors", name="nobase")
