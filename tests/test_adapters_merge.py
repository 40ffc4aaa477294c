"""Merging adapters: the weighted sum as one adapter, and baking into a copy of the base model — each compared with
applying the source adapters one after the other with the core (``merge_adapter``, fp32).

Tolerances: fp32 throughout, so the merged weights agree to 1e-5 relative (the sum is exact maths; only the order
of fp32 additions differs); a bf16 bake is bit-identical to the same fp32 chain rounded once to bf16.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_helpers import DIT, decoder, max_rel_err, saved_adapter
from sidestep_core.adapters import export_comfyui, merge_adapter, read_adapter_weights
from sidestep_core.adapters.bake import bake
from sidestep_core.adapters.merge import MergeError, low_rank_factors, weighted_sum

TOL = 1e-5


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, dit):
    root = tmp_path_factory.mktemp("merge_sources")
    cache = {}

    def get(case, seed=1):
        if (case, seed) not in cache:
            folder, _ = saved_adapter(root / str(seed), dit, case, seed=seed)
            cache[case, seed] = read_adapter_weights(folder)
        return cache[case, seed]

    return get


def chained(dit, sources):
    """Decoder weights after merging each (adapter, strength) in turn with the core."""
    dec = decoder(dit)
    for aw, s in sources:
        merge_adapter(dec, aw, s)
    return {k: v.detach().clone() for k, v in dec.state_dict().items()}


@pytest.mark.parametrize("cases", [("lora", "lora_patterns"), ("lora", "loha"), ("lora", "lokr_lowrank"),
                                   ("loha", "lokr_both"), ("lokr_full", "lora")])
def test_weighted_sum_equals_the_sources_one_after_the_other(dit, adapters, cases):
    a, b = adapters(cases[0], 1), adapters(cases[1], 2)
    sources = [(a, 0.7), (b, -0.4)]
    merged = weighted_sum(sources)
    want = chained(dit, sources)
    got = chained(dit, [(merged, 1.0)])
    assert max_rel_err(got, want) < TOL
    assert set(merged.modules) == set(a.modules) | set(b.modules)


def test_lora_of_different_ranks_is_concatenated_not_approximated(adapters):
    a, b = adapters("lora", 1), adapters("lora_patterns", 2)
    merged = weighted_sum([(a, 1.0), (b, 0.5)])
    name = "layers.0.self_attn.q_proj"  # rank 4 in a, 8 in b (rank_pattern)
    assert (a.modules[name].rank(), b.modules[name].rank()) == (4, 8)
    m = merged.modules[name]
    assert m.kind == "lora" and m.rank() == 12 and m.scale == 1.0
    want = a.modules[name].scale * a.modules[name].tensors["up"] @ a.modules[name].tensors["down"] \
        + 0.5 * b.modules[name].scale * b.modules[name].tensors["up"] @ b.modules[name].tensors["down"]
    assert torch.allclose(m.tensors["up"] @ m.tensors["down"], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["loha", "lokr_lowrank", "lokr_both", "lokr_full"])
def test_low_rank_form_of_each_kind_is_its_delta(adapters, case):
    from sidestep_core.adapters.delta import additive_delta

    for name, m in adapters(case).modules.items():
        factors = low_rank_factors(m)
        assert factors is not None, name
        up, down = factors
        want = additive_delta(m, torch.Size(m.weight_shape()))
        assert torch.allclose(up @ down, want, rtol=1e-5, atol=1e-7 * float(want.abs().max())), name


def test_a_sum_of_full_rank_is_written_as_full_deltas(dit, adapters):
    a = adapters("lokr_full")  # full Kronecker factors where they are small: ranks up to the whole input width
    merged = weighted_sum([(a, 1.0), (adapters("lora"), 1.0)])
    assert "diff" in {m.kind for m in merged.modules.values()}
    assert merged.notes and "full deltas" in merged.notes[0]
    assert max_rel_err(chained(dit, [(merged, 1.0)]), chained(dit, [(a, 1.0), (adapters("lora"), 1.0)])) < TOL


@pytest.mark.parametrize("case", ["dora", "oft"])
def test_dora_and_oft_are_refused_with_the_way_out(adapters, case):
    with pytest.raises(MergeError, match="bake"):
        weighted_sum([(adapters("lora"), 1.0), (adapters(case), 1.0)])


def test_merged_adapter_survives_the_comfyui_export(dit, adapters, tmp_path):
    sources = [(adapters("lora"), 0.6), (adapters("loha", 2), 0.9)]
    merged = weighted_sum(sources)
    path, _ = export_comfyui(merged, tmp_path / "m.safetensors")
    back = read_adapter_weights(path)
    assert json.loads(back.metadata["sidestep_merge"])[1]["weight"] == 0.9
    assert max_rel_err(chained(dit, [(back, 1.0)]), chained(dit, sources)) < TOL


# ----------------------------------------------------------------------------------------------------------
# baking
# ----------------------------------------------------------------------------------------------------------


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_bake_equals_the_sources_applied_in_turn(dit, adapters, tmp_path):
    """Every adapter type, including DoRA and a rescaled OFT, on the original bf16 folder: the file keeps the names
    and dtypes, and each patched tensor is the fp32 chain of the core rounded once to bf16 (bit-identical)."""
    sources = [(adapters("dora"), 1.0), (adapters("lora", 2), 0.5), (adapters("oft_rescaled", 3), 0.8),
               (adapters("lokr_both", 4), -0.3), (adapters("loha", 5), 1.2)]
    result = bake(dit, sources, tmp_path / "baked.safetensors")
    assert result.patched == len(set().union(*(aw.modules for aw, _ in sources)))
    assert [p.name for p in tmp_path.iterdir()] == ["baked.safetensors"]  # no temporary file left
    out, meta = _tensors(result.path)
    base, _ = _tensors(dit / "model.safetensors")
    assert set(out) == set(base)
    assert all(out[k].dtype == base[k].dtype == torch.bfloat16 and out[k].shape == base[k].shape for k in base)
    recorded = json.loads(meta["sidestep_baked"])[2]
    assert (recorded["strength"], recorded["type"]) == (0.8, "oft")
    want = chained(dit, sources)
    changed = 0
    for k, v in want.items():
        assert torch.equal(out[f"decoder.{k}"], v.to(torch.bfloat16)), k
        changed += not torch.equal(out[f"decoder.{k}"], base[f"decoder.{k}"])
    assert changed >= result.patched * 0.9
    assert all(torch.equal(out[k], base[k]) for k in base if not k.startswith("decoder."))


def test_bake_of_an_fp32_file_reads_back_exactly(dit, adapters, tmp_path):
    from sidestep_core.model import load_acestep

    base, _ = _tensors(dit / "model.safetensors")
    fp32 = tmp_path / "base_fp32.safetensors"
    save_file({k: v.float() for k, v in base.items()}, str(fp32),
              metadata={"config": (dit / "config.json").read_text()})
    sources = [(adapters("lora"), 1.0), (adapters("dora", 2), 0.5)]
    result = bake(fp32, sources, tmp_path / "baked.safetensors")
    got = load_acestep(result.path, parts={"decoder"}).model.decoder.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    assert max_rel_err(got, chained(dit, sources)) < 1e-6


def test_bake_refuses_its_own_base_and_foreign_adapters(dit, adapters, tmp_path, tiny_original):
    from sidestep_core.adapters import AdapterShapeError
    from sidestep_core.adapters.weights import ModuleWeights

    with pytest.raises(ValueError, match="replace its own base"):
        bake(dit / "model.safetensors", [(adapters("lora"), 1.0)], dit / "model.safetensors")
    foreign = read_adapter_weights(export_comfyui(adapters("lora"), tmp_path / "a.safetensors")[0])
    foreign.modules["layers.0.self_attn.q_proj"] = ModuleWeights(
        "lora", {"up": torch.zeros(7, 2), "down": torch.zeros(2, 5)})
    with pytest.raises(AdapterShapeError, match="made for another model"):
        bake(dit, [(foreign, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------


def test_cli_merge_and_bake(dit, tmp_path, capsys):
    from sidestep_core.cli import main

    a, _ = saved_adapter(tmp_path, dit, "lora", seed=1)
    b, _ = saved_adapter(tmp_path, dit, "loha", seed=2)
    d, _ = saved_adapter(tmp_path, dit, "dora", seed=3)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "--weights", "0.5,1.5", "--out", str(out), "--plain"]) == 0
    stdout = capsys.readouterr().out
    assert "verified" in stdout and f"wrote {out}" in stdout
    sources = [(read_adapter_weights(a), 0.5), (read_adapter_weights(b), 1.5)]
    assert max_rel_err(chained(dit, [(read_adapter_weights(out), 1.0)]), chained(dit, sources)) < TOL

    small = tmp_path / "small.safetensors"
    assert main(["merge", str(a), str(b), "--weights", "0.5,1.5", "--rank", "4", "--out", str(small)]) == 0
    stdout = capsys.readouterr().out
    assert "truncated SVD: relative error" in stdout and "vs the re-ranked sum" in stdout
    assert {m.rank() for m in read_adapter_weights(small).modules.values()} == {4}
    assert main(["merge", str(a), "--rank", "4", "--bake", str(dit), "--out", str(small)]) == 2

    assert main(["merge", str(a), str(d), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "bake" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--weights", "1", "--out", str(out)]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err
    assert main(["merge", str(a), "--out", str(out), "--no-overwrite"]) == 2

    baked = tmp_path / "baked.safetensors"
    assert main(["merge", str(d), str(a), "--weights", "1,-0.5", "--bake", str(dit), "--out", str(baked)]) == 0
    assert "UNETLoader" in capsys.readouterr().out
    got, _ = _tensors(baked)
    want = chained(dit, [(read_adapter_weights(d), 1.0), (read_adapter_weights(a), -0.5)])
    assert all(torch.equal(got[f"decoder.{k}"], v.to(torch.bfloat16)) for k, v in want.items())


def test_rerank_is_the_best_rank_k_and_states_its_error(adapters):
    from sidestep_core.adapters.delta import additive_delta
    from sidestep_core.adapters.merge import rerank

    merged = weighted_sum([(adapters("lora", 1), 1.0), (adapters("lora_patterns", 2), 0.5)])
    cut, errors = rerank(merged, 4)
    assert errors and json.loads(cut.metadata["sidestep_merge_rank_error"])["max"] == max(errors.values())
    for name, m in merged.modules.items():
        shape = torch.Size(m.weight_shape())
        full = additive_delta(m, shape).double()
        approx = additive_delta(cut.modules[name], shape).double()
        assert cut.modules[name].rank() <= 4
        s = torch.linalg.svdvals(full)
        best = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart–Young
        got = float((full - approx).norm() / full.norm())
        assert abs(got - best) < 1e-5 and abs(errors.get(name, 0.0) - best) < 1e-5, name
    same, none = rerank(merged, 100)
    assert none == {} and same.modules["layers.0.self_attn.q_proj"].rank() == 12


def test_bake_interrupted_midway_leaves_the_old_file_and_no_temporary(dit, adapters, tmp_path, monkeypatch):
    import sidestep_core.adapters.bake as bake_module

    out = tmp_path / "baked.safetensors"
    out.write_bytes(b"previous")
    calls = []

    def failing(m, w, s):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return w

    monkeypatch.setattr(bake_module, "merged_weight", failing)
    with pytest.raises(OSError, match="No space"):
        bake(dit, [(adapters("lora"), 1.0)], out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["baked.safetensors"]
