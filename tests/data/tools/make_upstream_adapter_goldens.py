#!/usr/bin/env python3
"""Load our adapter folders through upstream ACE-Step 1.5's own adapter loader and record the adapted decoder's
output (golden tensors for tests/test_adapters_upstream.py).

Our own driver, not upstream code: it imports, from an upstream checkout given with --upstream-root, the turbo
modeling file and the LoRA manager mixin of upstream's handler (``LoraManagerMixin``: ``load_lora`` →
``add_lora``, which wraps ``model.decoder`` with ``PeftModel.from_pretrained`` for a PEFT folder, or builds a LyCORIS
LoKr network from the ``lokr_config`` metadata of a ``lokr_weights.safetensors``), hosts it on a minimal object
with the attributes the mixin documents, and calls ``model.decoder`` exactly as the model-parity goldens do.

For every folder under --adapters it records upstream's answer (``load_lora``'s message, the warnings and log
lines it produced) and, when it loaded, the decoder velocity. A folder upstream refuses is recorded as refused.

Usage (in the virtualenv of make_upstream_goldens.py, plus peft, lycoris-lora and loguru):

    sidestep make-tiny-checkpoint /tmp/tiny_orig --layout original --profile tiny --seed 0
    python tests/data/tools/make_upstream_adapter_goldens.py --upstream-root /path/to/ACE-Step-1.5 \
        --checkpoint /tmp/tiny_orig/acestep-v15-turbo --adapters tests/data/upstream_adapters \
        --out tests/data/upstream_adapter_golden_tiny.safetensors
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import os
import sys
import types
import warnings
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_upstream_goldens as mug  # noqa: E402  (our own helpers: config, strict model build, provenance)

LORA_MANAGER = "acestep.core.generation.handler.lora_manager"
LIFECYCLE = "acestep.core.generation.handler.lora.lifecycle"


def tree_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + mug.sha256_file(str(p)).encode() + b"\0")
    return h.hexdigest()


def decoder_inputs(config) -> "OrderedDict[str, torch.Tensor]":
    g = mug.gen(8101)
    B, T = 2, 24
    return OrderedDict(
        hidden_states=mug.randn(g, B, T, config.audio_acoustic_hidden_dim),
        context_latents=mug.randn(g, B, T, config.in_channels - config.audio_acoustic_hidden_dim),
        encoder_hidden_states=mug.randn(g, B, 9, mug.cond_dim(config)),
        timestep=torch.tensor([0.8, 0.3]),
        timestep_r=torch.tensor([0.8, 0.3]),
    )


@torch.no_grad()
def velocity(decoder, inp) -> torch.Tensor:
    return decoder(hidden_states=inp["hidden_states"], timestep=inp["timestep"], timestep_r=inp["timestep_r"],
                   attention_mask=None, encoder_hidden_states=inp["encoder_hidden_states"],
                   encoder_attention_mask=None, context_latents=inp["context_latents"], use_cache=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-root", default=mug.DEFAULT_UPSTREAM_ROOT)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--adapters", required=True, help="folder holding one adapter folder per case")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from loguru import logger
    from safetensors.torch import load_file

    cfg_mod, turbo, _base = mug.import_upstream(args.upstream_root)
    try:
        import torchaudio  # noqa: F401
    except ImportError:  # imported on the way to upstream's LoKRConfig (audio preprocessing), never called here
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    mixin = importlib.import_module(LORA_MANAGER).LoraManagerMixin
    lifecycle = importlib.import_module(LIFECYCLE)

    class Host(mixin):
        """The attributes LoraManagerMixin expects of its host (its docstring), nothing else."""

        def __init__(self, model):
            self.model, self.device, self.dtype, self.quantization = model, "cpu", torch.float32, None
            self._base_decoder, self.lora_loaded, self.use_lora, self.lora_scale = None, False, False, 1.0

    ckpt = mug.find_checkpoint_dir(args.checkpoint)
    config, raw_cfg = mug.load_config(cfg_mod, ckpt)
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    model0 = mug.build_model(turbo, config, sd, "sdpa", "turbo")
    inp = decoder_inputs(config)
    flat = OrderedDict((f"in.{k}", v.contiguous()) for k, v in inp.items())
    flat["base.velocity"] = velocity(model0.decoder, inp).contiguous()

    rel = lambda m: os.path.relpath(m.__file__, args.upstream_root)  # noqa: E731
    cases = {}
    for folder in sorted(p for p in Path(args.adapters).iterdir() if p.is_dir()):
        model = copy.deepcopy(model0)
        host = Host(model)
        log: list[str] = []
        sink = logger.add(lambda m: log.append(m.record["level"].name + ": " + m.record["message"]),
                          level="WARNING")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            message = host.load_lora(str(folder))
        logger.remove(sink)
        loaded = message.startswith("\u2705")
        info = {
            "message": message,
            "loaded": loaded,
            "adapter_type": getattr(host, "_adapter_type", None),
            "decoder_class": type(model.decoder).__name__,
            "warnings": sorted({str(w.message) for w in caught}),
            "log": log,
            "files_sha256": tree_sha256(folder),
        }
        if loaded:
            v = velocity(model.decoder, inp)
            info["max_abs_change_vs_base"] = float((v - flat["base.velocity"]).abs().max())
            assert info["max_abs_change_vs_base"] > 1e-4, f"{folder.name}: loading changed nothing"
            flat[f"{folder.name}.velocity"] = v.contiguous()
        cases[folder.name] = info
        print(f"[{folder.name}] {message} {info.get('max_abs_change_vs_base', '')} "
              f"warnings={len(info['warnings'])} log={len(log)}")

    meta = OrderedDict(
        upstream_repo=mug.UPSTREAM_REPO,
        upstream_commit=mug.UPSTREAM_COMMIT,
        modeling_file=rel(turbo),
        modeling_file_sha256=mug.sha256_file(turbo.__file__),
        loader_file=rel(lifecycle),
        loader_file_sha256=mug.sha256_file(lifecycle.__file__),
        loader_call="LoraManagerMixin.load_lora(folder) on a host with model, device=cpu, dtype=float32, "
                    "quantization=None, _base_decoder=None, lora_loaded=use_lora=False, lora_scale=1.0",
        decoder_call="model.decoder(hidden_states, timestep, timestep_r, attention_mask=None, "
                     "encoder_hidden_states, encoder_attention_mask=None, context_latents, use_cache=False)[0]",
        attn_implementation="sdpa",
        dtype="float32",
        checkpoint_model_safetensors_sha256=mug.sha256_file(os.path.join(ckpt, "model.safetensors")),
        config_json=json.dumps(raw_cfg, sort_keys=True),
        cases=json.dumps(cases, sort_keys=True),
        lokr_config_key="lokr_config",
        lokr_config_fields=json.dumps(list(lifecycle.LoKRConfig.__dataclass_fields__)),
        generator="make_upstream_adapter_goldens.py (own code); inputs torch.Generator(cpu).manual_seed(8101) randn",
    )
    for k, v in mug.versions().items():
        meta[f"version_{k}"] = v
    for pkg in ("peft", "lycoris-lora", "loguru"):
        meta[f"version_{pkg}"] = version(pkg)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    mug.save_deterministic(flat, args.out, {k: str(v) for k, v in meta.items()})
    print(f"wrote {args.out}: {len(flat)} tensors")


if __name__ == "__main__":
    main()
