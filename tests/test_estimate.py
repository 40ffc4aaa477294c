"""Gradient estimation on the tiny model: determinism, a zeroed module ranks as expected, group-by-group
gradients, and suggested settings the trainer accepts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_helpers import DIT
from sidestep_core.estimate import EstimateSettings, estimate, load_targets, select_modules, timestep_range
from train_helpers import make_cache

FAST = dict(batches=2, runs=2, device="cpu", precision="fp32", gradient_checkpointing=False, crop_seconds=0)


@pytest.fixture(scope="module")
def dit(tiny_original):
    return tiny_original / DIT


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("est_cache"), frames=(32, 40, 24), cond_len=(5, 7, 6))


@pytest.fixture(scope="module")
def result(dit, dataset):
    return estimate(dit, dataset, seed=3, **FAST)


def test_deterministic_for_a_seed(dit, dataset, result):
    again = estimate(dit, dataset, seed=3, **FAST)
    assert [(r["module"], r["score"], r["spread"]) for r in again.data["modules"]] == \
           [(r["module"], r["score"], r["spread"]) for r in result.data["modules"]]
    assert again.train_settings == result.train_settings
    other = estimate(dit, dataset, seed=4, **FAST)
    assert [r["score"] for r in other.data["modules"]] != [r["score"] for r in result.data["modules"]]


def test_result_shape(result):
    data = result.data
    rows = data["modules"]
    assert len(rows) == 4 * 11  # 4 layers × (4 self + 4 cross + 3 mlp)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert all(len(r["runs"]) == 2 and r["spread"] >= 0 for r in rows)
    assert data["checkpoint"]["variant"] == "turbo" and data["dataset"]["clips"] == 3
    chosen = set(result.targets)
    assert 22 <= len(chosen) <= 26  # half, plus enough of every group
    assert {r["group"] for r in rows if r["module"] in chosen} == {"self_attn", "cross_attn", "mlp"}
    assert all((r["suggested_rank"] is not None) == (r["module"] in chosen) for r in rows)
    json.dumps(data)  # JSON-ready
    assert "layers.0" in result.text


def test_zeroed_value_projection_silences_its_attention(tmp_path, dit, dataset):
    """With layers.1.self_attn.v_proj zeroed, that attention outputs zeros whatever q and k are: q, k and o of the
    same attention get exactly zero gradient and rank last."""
    folder = tmp_path / DIT
    shutil.copytree(dit, folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["decoder.layers.1.self_attn.v_proj.weight"] = torch.zeros_like(sd["decoder.layers.1.self_attn.v_proj.weight"])
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    rows = estimate(folder, dataset, seed=3, **FAST).data["modules"]
    silent = {f"layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "o_proj")}
    assert {r["module"] for r in rows[-3:]} == silent
    assert all(r["score"] == 0.0 for r in rows[-3:])
    assert all(r["score"] > 0 for r in rows[:-3])
    assert next(r for r in rows if r["module"] == "layers.1.self_attn.v_proj")["score"] > 0


def test_only_one_group_has_gradients_at_a_time(monkeypatch, dit, dataset):
    import sidestep_core.model as model_pkg

    real = model_pkg.load_acestep
    seen = {}

    def capture(*a, **k):
        seen["loaded"] = real(*a, **k)
        return seen["loaded"]

    monkeypatch.setattr(model_pkg, "load_acestep", capture)
    live = []

    def progress(ev):
        if ev["event"] == "step":
            dec = seen["loaded"].model.decoder
            live.append((ev["group"], sum(p.requires_grad for p in dec.parameters()),
                         sum(p.grad is not None for p in dec.parameters())))

    estimate(dit, dataset, progress=progress, batches=1, runs=1, device="cpu", precision="fp32", crop_seconds=0)
    assert {g: n for g, n, _ in live} == {"self_attn": 16, "cross_attn": 16, "mlp": 12}
    assert all(grads == 0 for _, _, grads in live)  # gradients are folded into the sums and freed per batch
    dec = seen["loaded"].model.decoder
    assert not any(p.requires_grad for p in dec.parameters())


def test_suggestions_feed_the_trainer(tmp_path, dit, result):
    from sidestep_core.config import TrainConfig
    from sidestep_core.model import load_acestep
    from sidestep_core.training.adapters import inject_adapter, resolve_targets

    path = result.save(tmp_path / "est.json")
    settings = load_targets(path)
    cfg = TrainConfig.from_dict({**settings, "adapter": "lora", "dropout": 0.0}).validate()
    dec = load_acestep(dit, dtype=torch.float32, parts={"decoder"}).model.decoder
    assert resolve_targets(dec, cfg) == [m for m in _module_order(dec) if m in set(result.targets)]
    adapter = inject_adapter(dec, cfg)
    sd = adapter.state_dict()
    for module, rank in ((m, result.data["modules"][0]["suggested_rank"]) for m in [result.targets[0]]):
        assert sd[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
    # a plain mapping works too; bad files are refused with their path
    (tmp_path / "plain.json").write_text(json.dumps({"target_modules": ["layers.0.self_attn.q_proj"]}))
    assert load_targets(tmp_path / "plain.json") == {"target_modules": ["layers.0.self_attn.q_proj"]}
    (tmp_path / "bad.json").write_text(json.dumps({"modules": []}))
    with pytest.raises(ValueError, match="bad.json: holds no target_modules"):
        load_targets(tmp_path / "bad.json")


def _module_order(dec):
    return [n for n, _ in dec.named_modules()]


def test_settings_validation():
    assert timestep_range("texture") == (0.0, 0.4) and timestep_range("0.2,0.3") == (0.2, 0.3)
    assert timestep_range("balanced") is None
    for bad in (dict(focus="sharp"), dict(focus="0.5,0.2"), dict(batches=0), dict(rank_min=64, rank_max=8),
                dict(groups=("ffn",)), dict(precision="fp8"), dict(top_k=0)):
        with pytest.raises(ValueError):
            EstimateSettings(**bad).validate()
    with pytest.raises(TypeError, match="unknown setting"):
        estimate("x", "y", batchez=3)


def test_select_modules_keeps_every_group():
    rows = [{"module": f"m{i}", "group": "self_attn", "score": 10.0 - i} for i in range(8)]
    rows += [{"module": "x", "group": "mlp", "score": 0.1}, {"module": "y", "group": "cross_attn", "score": 0.0}]
    chosen = select_modules(rows, None)
    assert "x" in chosen and "y" in chosen and len(chosen) == 7
    assert select_modules(rows, 2) == ["m0", "m1"]
