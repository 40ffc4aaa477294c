"""Our adapter files in upstream ACE-Step 1.5's own loader (tests/data/README.md says how the goldens were made).

The golden holds what upstream's ``load_lora`` answered for each folder of tests/data/upstream_adapters/ and, where
it loaded, the adapted decoder's output; here the pack applies the adapter as trained (the raw ``final/`` folder,
also for the LoHA / OFT cases whose PEFT export is what upstream loaded) to the same tiny model and must agree.
With ``ACESTEP_UPSTREAM_ROOT`` set, the same is done live on adapters written by the current code.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapter_helpers import CASES, DIT, decoder, make_adapter, max_rel_err, reference_weights, saved_adapter
from sidestep_core.adapters import apply_unmerged, merged_state, read_adapter_weights
from sidestep_core.adapters.upstream import LOKR_CONFIG_KEY, export_peft

from goldens import DATA, assert_close, read_golden, tiny_model

ADAPTERS = DATA / "upstream_adapters"
TOOLS = DATA / "tools"
GOLDEN = "upstream_adapter_golden_tiny.safetensors"
LOADS = {"lora": "lora", "dora": "dora", "lokr": "lokr", "lokr_both": "lokr_both", "loha_peft": "loha",
         "oft_peft": "oft", "lokr_alpha_pattern_peft": "lokr_alpha_pattern"}  # folder upstream loaded -> trained one
REFUSED = ("loha", "oft")  # LyCORIS LoHA / OFT files: upstream has no loader for them


@pytest.fixture(scope="module")
def golden():
    tensors, meta = read_golden(GOLDEN)
    return tensors, meta, json.loads(meta["cases"])


def tree_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def pack_velocity(adapter: Path, inputs: dict) -> torch.Tensor:
    model = tiny_model()
    apply_unmerged(model.decoder, read_adapter_weights(adapter))
    return model.decoder(hidden_states=inputs["in.hidden_states"], timestep=inputs["in.timestep"],
                         timestep_r=inputs["in.timestep_r"], encoder_hidden_states=inputs["in.encoder_hidden_states"],
                         context_latents=inputs["in.context_latents"])


def test_golden_covers_the_committed_files(golden):
    _, _, cases = golden
    assert sorted(cases) == sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir())
    for name, info in cases.items():
        assert info["files_sha256"] == tree_sha256(ADAPTERS / name), f"{name}: files changed since the golden"


@pytest.mark.parametrize("folder", sorted(LOADS))
def test_upstream_output_equals_ours(golden, folder):
    tensors, _, cases = golden
    info = cases[folder]
    assert info["loaded"], info["message"]
    assert not info["warnings"], info["warnings"]
    assert all("missing" not in line.lower() and "unexpected" not in line.lower() for line in info["log"])
    ours = pack_velocity(ADAPTERS / LOADS[folder], tensors)
    assert_close(ours, tensors[f"{folder}.velocity"], what=folder)
    assert (ours - tensors["base.velocity"]).abs().max() > 1e-3  # the adapter does change the output


def test_base_output_equals_ours(golden):
    tensors, _, _ = golden
    model = tiny_model()
    with torch.no_grad():
        v = model.decoder(hidden_states=tensors["in.hidden_states"], timestep=tensors["in.timestep"],
                          timestep_r=tensors["in.timestep_r"],
                          encoder_hidden_states=tensors["in.encoder_hidden_states"],
                          context_latents=tensors["in.context_latents"])
    assert_close(v, tensors["base.velocity"], what="no adapter")


@pytest.mark.parametrize("folder", REFUSED)
def test_upstream_refuses_lycoris_loha_and_oft(golden, folder):
    info = golden[2][folder]
    assert not info["loaded"] and "Invalid adapter" in info["message"]


def test_upstream_cannot_hold_per_module_lokr_ranks_or_alphas(golden):
    """Upstream builds every LoKr module from one rank and alpha: a per-module rank is refused, a per-module alpha
    loads with the global one (LyCORIS fixes the scale when the module is built) — the PEFT export is right."""
    tensors, _, cases = golden
    assert not cases["lokr_rank_pattern"]["loaded"] and "size mismatch" in cases["lokr_rank_pattern"]["message"]
    assert cases["lokr_alpha_pattern"]["loaded"]
    ours = pack_velocity(ADAPTERS / "lokr_alpha_pattern", tensors)
    assert (ours - tensors["lokr_alpha_pattern.velocity"]).abs().max() > 1e-3


def test_lokr_files_carry_upstreams_config(golden):
    _, meta, _ = golden
    fields = json.loads(meta["lokr_config_fields"])
    assert meta["lokr_config_key"] == LOKR_CONFIG_KEY
    for case in ("lokr", "lokr_both", "lokr_rank_pattern", "lokr_alpha_pattern"):
        with safe_open(str(ADAPTERS / case / "lokr_weights.safetensors"), "pt") as f:
            conf = json.loads(f.metadata()[LOKR_CONFIG_KEY])
            keys = {k.split(".")[0] for k in f.keys()}
        assert list(conf) == fields
        assert keys == {"lycoris_" + t.replace(".", "_") for t in conf["target_modules"]}


def test_saved_lokr_carries_upstreams_config(golden, tmp_path, tiny_original):
    """What the trainer writes now (final/ and every checkpoint go through Adapter.save)."""
    adapter = make_adapter(decoder(tiny_original / DIT), "lokr", rank=2, alpha=6.0, lokr_decompose_both=True,
                           lokr_factor=4)
    (path,) = adapter.save(tmp_path, {})
    with safe_open(str(path), "pt") as f:
        conf = json.loads(f.metadata()[LOKR_CONFIG_KEY])
    assert list(conf) == json.loads(golden[1]["lokr_config_fields"])
    assert (conf["linear_dim"], conf["linear_alpha"], conf["factor"], conf["decompose_both"]) == (2, 6.0, 4, True)
    assert conf["target_modules"] == adapter.targets


@pytest.mark.parametrize("case", ["loha", "oft", "lokr_alpha_pattern"])
def test_peft_export_is_reproduced(tmp_path, case):
    """The committed PEFT folders are what the current export writes (so the golden speaks for it)."""
    export_peft(read_adapter_weights(ADAPTERS / case), tmp_path, base=tiny_model().decoder)
    committed = ADAPTERS / f"{case}_peft"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(committed / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.allclose(a.get_tensor(k), b.get_tensor(k), rtol=1e-6, atol=1e-7), k
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = json.loads((committed / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "target_modules", "rank_pattern", "alpha_pattern", "lora_alpha", "alpha",
                "use_dora"):
        assert ours.get(key) == theirs.get(key), key


UPSTREAM_ROOT = os.environ.get("ACESTEP_UPSTREAM_ROOT", "")


@pytest.mark.skipif(not UPSTREAM_ROOT, reason="ACESTEP_UPSTREAM_ROOT is not set: the live check runs upstream "
                    "ACE-Step 1.5's loader from a checkout (ACESTEP_UPSTREAM_PYTHON: a Python with its requirements, "
                    "transformers<4.58, peft, lycoris-lora, loguru)")
def test_live_upstream_loads_what_the_current_code_writes(tmp_path):
    python = os.environ.get("ACESTEP_UPSTREAM_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    adapters, ckpt, out = tmp_path / "adapters", tmp_path / "tiny", tmp_path / "golden.safetensors"
    subprocess.run([sys.executable, str(TOOLS / "make_upstream_adapter_files.py"), "--out", str(adapters)],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "sidestep_core", "make-tiny-checkpoint", str(ckpt), "--layout", "original",
                    "--profile", "tiny", "--seed", "0"], check=True, env=env, capture_output=True)
    run = subprocess.run([python, str(TOOLS / "make_upstream_adapter_goldens.py"), "--upstream-root", UPSTREAM_ROOT,
                          "--checkpoint", str(ckpt), "--adapters", str(adapters), "--out", str(out)],
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cases = json.loads(f.metadata()["cases"])
    for folder, trained in LOADS.items():
        assert cases[folder]["loaded"], cases[folder]["message"]
        assert_close(pack_velocity(adapters / trained, tensors), tensors[f"{folder}.velocity"], what=folder)
    for folder in (*REFUSED, "lokr_rank_pattern"):
        assert not cases[folder]["loaded"]


# ---------------------------------------------------------------------------------------------------------------
# The PEFT export against PEFT itself, for every layout the trainer writes (no upstream checkout needed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_loads_in_peft_with_the_trained_weights(tmp_path, tiny_original, case):
    from peft import PeftModel

    dit = tiny_original / DIT
    folder, ref = saved_adapter(tmp_path, dit, case)
    out, _ = export_peft(read_adapter_weights(folder), tmp_path / "peft", base=decoder(dit))
    back = read_adapter_weights(out)
    assert back.format == "peft"
    merged = PeftModel.from_pretrained(decoder(dit), str(out)).merge_and_unload()
    theirs = {n: merged.get_submodule(n).weight.detach() for n in ref}
    assert max_rel_err(theirs, ref) < 1e-5
    assert max_rel_err(merged_state(decoder(dit), back), ref) < 1e-5


def test_peft_oft_cannot_hold_a_diag_oft(tiny_original):
    """PEFT's OFT turns the layer's input (W·B), LyCORIS diag-OFT its output (B'·W): the input-side matrix that would
    reproduce an output-side rotation, W⁻¹·W', is dense rather than block-diagonal."""
    dit = tiny_original / DIT
    dec = decoder(dit)
    name = "layers.0.self_attn.q_proj"  # square, so W⁻¹ exists
    w = dec.get_submodule(name).weight.detach().double()
    adapter = make_adapter(dec, "oft", target_modules=[name])
    ref = reference_weights(adapter, dec)[name].double()
    needed = torch.linalg.solve(w, ref)
    b = 8  # the block size make_adapter uses
    mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.float64)] * (w.shape[1] // b)).bool()
    off = needed.masked_fill(mask, 0).norm() / needed.norm()
    assert off > 0.01, off


def test_cli_export_peft(tmp_path, tiny_original, capsys):
    from sidestep_core.cli import main

    dit = tiny_original / DIT
    folder, _ = saved_adapter(tmp_path, dit, "oft")
    assert main(["export", str(folder), "--format", "peft", "--plain"]) == 2  # OFT needs the base model
    assert "pass --checkpoint" in capsys.readouterr().err
    assert main(["export", str(folder), "--format", "peft", "--checkpoint", str(dit), "--plain"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and (tmp_path / "oft_peft" / "adapter_config.json").is_file()
