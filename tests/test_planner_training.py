"""Training the planner LM's LoRA on the tiny model: alone and in the same run as the DiT adapter, a bit-exact
resume of the joint run, save on stop, fp32 adapters, clear errors, and the exports (ComfyUI file, PEFT folder)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sidestep_core.config import TrainConfig
from sidestep_core.planner.lm_adapter import LMAdapterMismatchError, read_lm_adapter
from sidestep_core.training import AdapterMismatchError, train
from sidestep_core.training.adapters import find_adapter
from train_helpers import fast_config, single_thread, stop_after  # noqa: F401

CAPTIONS = ("tst, bright synth pop with a female voice", "tst, slow piano ballad", "tst, punchy drums and bass")


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """A preprocessed cache whose clips carry what preprocessing resolves: caption, lyrics and metadata."""
    from sidestep_core.data import cache

    root = tmp_path_factory.mktemp("lm_ds") / "cache"
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    samples = []
    for i, (t, length) in enumerate(((40, 6), (56, 9), (48, 7))):
        pos = torch.arange(t, dtype=torch.float32)[:, None]
        lat = torch.sin(pos * torch.linspace(0.05, 0.6, 64)[None, :] * (1 + i)) * 1.5
        ctx = torch.cat([torch.randn(1, 64, generator=g).expand(t, 64) * 0.1, torch.ones(t, 64)], dim=-1)
        key = cache.content_key(test=f"lm-{i}")
        record = {"key": key, "id": f"clip{i:02d}", "file": cache.sample_filename(key), "frames": t,
                  "duration": t / 25, "custom_tag": "tst", "caption": CAPTIONS[i],
                  "lyrics": "[verse]\nla la la" if i != 1 else "[Instrumental]", "bpm": str(90 + 10 * i),
                  "keyscale": "C major", "timesignature": "4", "language": "en"}
        cache.write_tensors(root / record["file"], {
            "target_latents": lat, "context_latents": ctx,
            "encoder_hidden_states": torch.randn(length, 64, generator=g),
            "encoder_attention_mask": torch.ones(length, dtype=torch.bool),
        }, record)
        samples.append(record)
    cache.write_manifest(root, {"format": cache.FORMAT, "format_version": cache.FORMAT_VERSION,
                                "num_samples": len(samples), "samples": samples, "prompt_style": "comfyui"})
    return root


def lm_config(ckpt, **kw) -> TrainConfig:
    base = dict(train_models="both", lm=str(ckpt.planner), lm_rank=4, lm_alpha=8.0, lm_dropout=0.1,
                lm_learning_rate=5e-3, dropout=0.1, cfg_ratio=0.5, batch_size=2, gradient_accumulation=2,
                crop_seconds=1.2, scheduler="cosine", warmup_steps=2, max_steps=6, learning_rate=5e-3)
    base.update(kw)
    return fast_config(**base)


def _csv(out, column):
    with open(out / "loss.csv", newline="") as fh:
        return [float(r[column]) for r in csv.DictReader(fh)]


def _lm_tensors(folder):
    return load_file(str(folder / "lm" / "adapter_model.safetensors"))


def test_joint_run_resumes_bit_exactly(tiny_with_lm, songs, tmp_path):
    """fp32 CPU: 6 steps in one go == 3 steps, a stop, then --resume auto — for both adapters, bit for bit.
    LoRA dropout on both, CFG dropout, crops, accumulation and a warmup+cosine schedule are all on."""
    cfg = lm_config(tiny_with_lm)
    full = train(cfg, tiny_with_lm.dit, songs, tmp_path / "full")
    assert full.status == "complete" and full.step == 6

    part = train(cfg, tiny_with_lm.dit, songs, tmp_path / "split", should_stop=stop_after(3))
    assert part.status == "stopped" and part.step == 3
    step3 = tmp_path / "split" / "checkpoints" / "step_3"
    assert (step3 / "lm" / "adapter_model.safetensors").is_file()  # saved on stop: both adapters
    assert (tmp_path / "split" / "final" / "lm" / "adapter_config.json").is_file()
    rest = train(cfg.replace(resume="auto"), tiny_with_lm.dit, songs, tmp_path / "split")
    assert rest.status == "complete" and rest.step == 6
    assert part.losses + rest.losses == full.losses
    assert _csv(tmp_path / "split", "lm_loss") == _csv(tmp_path / "full", "lm_loss")
    a, b = _lm_tensors(tmp_path / "full" / "final"), _lm_tensors(tmp_path / "split" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dit_a = load_file(str(find_adapter(tmp_path / "full" / "final")[1]))
    dit_b = load_file(str(find_adapter(tmp_path / "split" / "final")[1]))
    assert all(torch.equal(dit_a[k], dit_b[k]) for k in dit_a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the LM adapter did train


def test_lm_alone_learns_the_codes_without_the_dit(tiny_with_lm, songs, tmp_path):
    out = tmp_path / "lm"
    cfg = lm_config(tiny_with_lm, train_models="lm", lm_dropout=0.0, lm_learning_rate=3e-2, max_steps=30,
                    scheduler="constant", warmup_steps=0, batch_size=1, gradient_accumulation=1, val_split=0.34,
                    save_every=15)
    result = train(cfg, tiny_with_lm.dit, songs, out)
    assert result.status == "complete"
    losses = _csv(out, "loss")
    assert losses == _csv(out, "lm_loss")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert sorted(p.name for p in (out / "final").iterdir()) == ["lm"]  # no DiT adapter
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    saved = read_lm_adapter(out / "final" / "lm")
    assert all(t.dtype == torch.float32 for t in saved.tensors.values())
    assert saved.metadata["sidestep_status"] == "complete" and saved.shape["hidden_size"] == 32
    conf = json.loads((out / "training_config.json").read_text())
    assert conf["adapter"] is None and conf["lm_adapter"]["options"]["rank"] == 4
    again = train(cfg.replace(resume="auto", max_steps=32), tiny_with_lm.dit, songs, out)
    assert again.step == 32


def test_a_run_that_cannot_fit_the_lm_stops_before_loading(tiny_with_lm, songs, tmp_path, monkeypatch):
    """``train``'s check before loading counts the planner LM: a device with room for the DiT's plan but not the
    joint one refuses before loading anything (the plan's line is all the run said), naming the LM's share; an
    LM-only run is checked too; with room for both the run trains and its plan line names the LM. The device's
    free memory is a budget here: a CPU reports none."""
    from sidestep_core.device import plan as P

    cfg = lm_config(tiny_with_lm, max_steps=1)
    planned = lm_config(tiny_with_lm, checkpoint=str(tiny_with_lm.dit), dataset=str(songs))
    joint = P.settle(planned, torch.device("cpu")).plan
    dit = P.settle(planned.replace(train_models="dit"), torch.device("cpu")).plan
    assert dit.needed < joint.needed

    events: list[dict] = []

    def run(cfg, free, out):
        monkeypatch.setattr(P, "free_memory", lambda device: free)
        events.clear()
        return train(cfg, tiny_with_lm.dit, songs, tmp_path / out, progress=events.append)

    with pytest.raises(ValueError, match=r"memory: .*the planner LM's share"):
        run(cfg, (dit.needed + joint.needed) // 2, "refused")
    assert [e["event"] for e in events] == ["log"]
    assert events[0]["message"].startswith("memory plan: bf16 base + planner LM: ")
    with pytest.raises(ValueError, match=r"memory: training the planner LM needs about"):
        run(cfg.replace(train_models="lm"), joint.lm.peak - 1, "lm_refused")
    assert [e["event"] for e in events] == ["log"]
    assert events[0]["message"].startswith("memory plan: planner LM: ")
    assert run(cfg, joint.needed, "fits").status == "complete"
    said = [e["message"] for e in events if e["event"] == "log"]
    assert said[0].startswith("memory plan: bf16 base + planner LM: ")
    assert any(m.startswith("training the hidden-32 planner LM") for m in said)  # what loading it says


def test_adapters_stay_fp32_with_a_bf16_base(tiny_with_lm, songs, tmp_path):
    cfg = lm_config(tiny_with_lm, precision="bf16", max_steps=2)
    train(cfg, tiny_with_lm.dit, songs, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "final" / "lm" / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_the_loss_can_cover_the_metadata(tiny_with_lm, songs, tmp_path):
    from sidestep_core.planner.training import IGNORE, build_planner_training
    from sidestep_core.training.data import open_dataset
    from sidestep_core.training.optim import new_schedule

    ds = open_dataset(songs)
    counts = {}
    for loss in ("codes", "codes_and_metadata"):
        cfg = lm_config(tiny_with_lm, lm_loss=loss, checkpoint=str(tiny_with_lm.dit))
        part = build_planner_training(cfg, ds, torch.device("cpu"), None, new_schedule(cfg, 6), seed=0,
                                      say=lambda _: None)
        counts[loss] = [sum(label != IGNORE for label in s.labels) for s in part.sequences]
    frames = [40, 56, 48]
    assert counts["codes"] == [math.ceil(t / 5) + 1 for t in frames]  # the codes and <|im_end|>
    assert all(m > c for m, c in zip(counts["codes_and_metadata"], counts["codes"]))


def test_no_lm_given_is_a_clear_error(tiny_with_lm, songs, tmp_path):
    with pytest.raises(ValueError, match=r"lm: train_models both trains the planner LM, but no LM is given.*"
                                         r"qwen_1.7b_ace15"):
        train(lm_config(tiny_with_lm, lm=""), tiny_with_lm.dit, songs, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    TrainConfig(train_models="both").validate()  # presets hold no LM path: only a run needs one


def test_resuming_with_other_models_or_another_lm_fails_loudly(tiny_with_lm, songs, tmp_path):
    out = tmp_path / "run"
    train(lm_config(tiny_with_lm, max_steps=2), tiny_with_lm.dit, songs, out)
    with pytest.raises(AdapterMismatchError, match="also trains the planner LM; resume with train_models both"):
        train(fast_config(max_steps=4, resume="auto"), tiny_with_lm.dit, songs, out)
    with pytest.raises(LMAdapterMismatchError, match="LM settings"):
        train(lm_config(tiny_with_lm, max_steps=4, lm_rank=8, resume="auto"), tiny_with_lm.dit, songs, out)


def test_resuming_on_another_lm_file_of_the_same_size_is_refused(tiny_with_lm, songs, tmp_path):
    """The run state records the LM's content identity (as the DiT's: headers, sizes, sampled bytes); an LM of the
    same name, size and shape but other weights cannot continue the run."""
    from sidestep_core.planner.loading import planner_identity
    from sidestep_core.planner.tiny import make_tiny_planner

    other = make_tiny_planner(tmp_path / "other", "original", seed=1)
    assert other.name == tiny_with_lm.planner.name
    assert (other / "model.safetensors").stat().st_size == (tiny_with_lm.planner / "model.safetensors").stat().st_size
    assert planner_identity(other) != planner_identity(tiny_with_lm.planner)
    out = tmp_path / "run"
    train(lm_config(tiny_with_lm, train_models="lm", max_steps=1), tiny_with_lm.dit, songs, out)
    state = json.loads((out / "checkpoints" / "step_1" / "training_state.json").read_text())
    assert state["state"]["lm"]["identity"] == planner_identity(tiny_with_lm.planner)
    with pytest.raises(LMAdapterMismatchError, match=r"another planner LM of the same size.*resume with the LM file "
                                                      r"the run started with"):
        train(lm_config(tiny_with_lm, train_models="lm", max_steps=2, lm=str(other), resume="auto"),
              tiny_with_lm.dit, songs, out)
    again = train(lm_config(tiny_with_lm, train_models="lm", max_steps=2, resume="auto"), tiny_with_lm.dit, songs, out)
    assert again.status == "complete" and again.step == 2


def test_an_lm_adapter_refuses_an_lm_of_another_size(tiny_with_lm, songs, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sidestep_core.planner.lm_adapter import inject_lm_lora

    out = tmp_path / "run"
    train(lm_config(tiny_with_lm, train_models="lm", max_steps=1), tiny_with_lm.dit, songs, out)
    bigger = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          vocab_size=256))
    adapter = inject_lm_lora(bigger, rank=4, alpha=8.0, dropout=0.0, mlp=False)
    with pytest.raises(LMAdapterMismatchError, match=r"trained on a planner LM of width 32, 2 layers, but the LM "
                                                      r"given has width 64, 2 layers"):
        adapter.load(out / "final" / "lm")


def test_export_writes_the_lm_adapter_for_comfyui_and_upstream(tiny_with_lm, songs, tmp_path):
    from sidestep_core.cli import main
    from sidestep_core.planner.lm_adapter import to_comfyui_lm_state_dict

    out = tmp_path / "run"
    train(lm_config(tiny_with_lm, max_steps=1), tiny_with_lm.dit, songs, out)
    # ComfyUI holds only the 1.7B and 4B LMs: the tiny LM's adapter cannot go there, and says so
    assert main(["export", str(out), "--out", str(tmp_path / "x.safetensors"), "--plain"]) != 0
    assert (tmp_path / "x.safetensors").is_file()  # the DiT adapter was written before the LM's refusal
    with pytest.raises(ValueError, match="ComfyUI runs only the 1.7B"):
        to_comfyui_lm_state_dict(read_lm_adapter(out / "final" / "lm"))
    assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "peft"), "--plain"]) == 0
    lm_peft = tmp_path / "peft_lm"
    assert (lm_peft / "adapter_config.json").is_file()
    from peft import PeftModel

    from sidestep_core.planner import load_planner

    planner = load_planner(tiny_with_lm.planner)
    model = PeftModel.from_pretrained(planner.model, str(lm_peft))  # what upstream does with an LM adapter
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_one_command_trains_both_from_the_preset(tiny_with_lm, songs, tmp_path):
    from train_helpers import run_cli

    out = tmp_path / "cli"
    rc = run_cli("--preset", "dit_and_lm", "--checkpoint", str(tiny_with_lm.dit), "--dataset", str(songs),
                 "--out", str(out), "--lm", str(tiny_with_lm.planner), "--rank", "4", "--lm-rank", "4",
                 "--max-steps", "2", "--crop-seconds", "0", "--precision", "fp32", "--estimate-steps", "0",
                 "--device", "cpu", "--plain")
    assert rc == 0
    assert find_adapter(out / "final")[0] == "lora" and (out / "final" / "lm" / "adapter_config.json").is_file()
    assert json.loads((out / "training_config.json").read_text())["config"]["train_models"] == "both"
    assert list((out / "runs").glob("events.out.tfevents.*"))  # one TensorBoard log for both
