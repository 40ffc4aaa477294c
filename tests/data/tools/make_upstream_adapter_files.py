#!/usr/bin/env python3
"""Write the small adapter folders that ``make_upstream_adapter_goldens.py`` loads through upstream ACE-Step's own
loader (tests/data/upstream_adapters/). Our own code only: adapters made by the trainer's ``inject_adapter`` on the
tiny model (``sidestep make-tiny-checkpoint --profile tiny --seed 0``'s weights), every weight moved off its initial
value by seeded noise, saved as ``final/`` is saved; LoHA and OFT also as ``sidestep export --format peft`` writes
them (the folders upstream can load). Deterministic on one torch / PEFT / LyCORIS version; the test suite reads the
committed files and re-checks the exports.

    python tests/data/tools/make_upstream_adapter_files.py [--out tests/data/upstream_adapters]
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch

from sidestep_core.adapters import read_adapter_weights
from sidestep_core.adapters.upstream import export_peft
from sidestep_core.config import TrainConfig
from sidestep_core.model import AceStepModel
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state
from sidestep_core.training.adapters import inject_adapter, metadata_json

# A partial target set (self-attention of every layer, one cross-attention and one MLP projection): upstream's LoKr
# loader wraps more modules than the file holds, and those must stay neutral.
TARGETS = [f"layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
TARGETS += ["layers.1.cross_attn.o_proj", "layers.2.mlp.down_proj"]
# Full-rank PEFT exports (OFT, LoKr) are as large as the weights: fewer targets keep the files small.
OFT_TARGETS = ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.cross_attn.o_proj",
               "layers.2.mlp.down_proj"]

LOKR_LOWRANK = {"rank": 2, "alpha": 6.0, "lokr_decompose_both": True, "lokr_factor": 4}  # alpha matters here
CASES = {  # name: (adapter, TrainConfig overrides)
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "lokr": ("lokr", {}),
    "lokr_both": ("lokr", LOKR_LOWRANK),
    # per-module ranks / alphas (what --targets-from an estimate gives): upstream's one-rank config cannot say them
    "lokr_rank_pattern": ("lokr", {**LOKR_LOWRANK, "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 4}}),
    "lokr_alpha_pattern": ("lokr", {**LOKR_LOWRANK, "target_modules": OFT_TARGETS,
                                    "alpha_pattern": {r"layers\.0\.self_attn\.v_proj": 2.0}}),
    "loha": ("loha", {}),
    "oft": ("oft", {"oft_rescaled": True, "target_modules": OFT_TARGETS}),
}
PEFT_EXPORTS = ("loha", "oft", "lokr_alpha_pattern")


def tiny_decoder() -> torch.nn.Module:
    model = AceStepModel(get_profile("tiny").dit)
    model.load_state_dict(dit_state(get_profile("tiny"), 0))
    return model.decoder.eval()


def make(case: str, out: Path, seed: int) -> Path:
    kind, overrides = CASES[case]
    kw = dict(adapter=kind, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, oft_block_size=8)
    kw.update(overrides)
    decoder = tiny_decoder()
    torch.manual_seed(seed)
    adapter = inject_adapter(decoder, TrainConfig(**kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = out / case
    shutil.rmtree(folder, ignore_errors=True)
    adapter.save(folder, metadata_json({"sidestep_adapter": kind, "sidestep_adapter_options": adapter.options,
                                        "sidestep_targets": adapter.targets, "sidestep_base_variant": "turbo"}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "upstream_adapters"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        folder = make(case, out, args.seed + zlib.crc32(case.encode()) % 1000)
        if case in PEFT_EXPORTS:
            peft = out / f"{case}_peft"
            shutil.rmtree(peft, ignore_errors=True)
            export_peft(read_adapter_weights(folder), peft, base=tiny_decoder())
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print(json.dumps(sizes, indent=1), f"\ntotal {sum(sizes.values())} bytes")


if __name__ == "__main__":
    main()
