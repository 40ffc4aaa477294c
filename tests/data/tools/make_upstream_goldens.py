#!/usr/bin/env python3
"""Produce golden reference tensors from the public upstream ACE-Step 1.5 model code.

Upstream: github.com/wbs2788/ACE-Step-1.5 @ 68ef61d2043ba2a9b97126018a437c578b42b15f
This script is NOT part of the upstream code; it imports the upstream modules from a checkout given with
--upstream-root and drives them. It is not used by the test suite (which only reads its output).

Usage (in a virtualenv with transformers==4.57.6, vector-quantize-pytorch==1.27.21, einops):

  # deterministic module goldens (decoder / condition encoder / tokenizer+detokenizer)
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --checkpoint DIR --out goldens.safetensors

  # full-sampler goldens (turbo generate_audio + base generate_audio with APG)
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --checkpoint DIR --sampler --out sampler.safetensors

  # XL modeling files (tiny-xl checkpoint), every case including the padded lyric batch
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --checkpoint DIR --variant xl_turbo \
      --cases dec_T37,dec_T40,dec_T37_r,enc,enc1,enc_lpad,tok --out xl.safetensors --check-sliding

  # linear RoPE scaling written into the config (the checkpoint's config.json is left as it is)
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --checkpoint DIR --cases dec_T40,enc,tok \
      --rope-scaling '{"rope_type": "linear", "factor": 2.0}' --out rope.safetensors

  # self test on a random tiny model (no external checkpoint needed)
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --make-random-tiny /tmp/rt --seed 123
  python make_upstream_goldens.py --upstream-root ACE-Step-1.5 --checkpoint /tmp/rt --out /tmp/rt/g.safetensors \\
      --check-sliding

DIR must hold config.json + model.safetensors (or shards + model.safetensors.index.json) in the upstream key layout
(decoder.*, encoder.*, tokenizer.*, detokenizer.*, null_condition_emb).
Everything runs in float32 on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from collections import OrderedDict

import torch

UPSTREAM_REPO = "https://github.com/wbs2788/ACE-Step-1.5"
UPSTREAM_COMMIT = "68ef61d2043ba2a9b97126018a437c578b42b15f"
DEFAULT_UPSTREAM_ROOT = os.environ.get("ACESTEP_UPSTREAM_ROOT", "ACE-Step-1.5")
TURBO_MOD = "acestep.models.turbo.modeling_acestep_v15_turbo"
BASE_MOD = "acestep.models.base.modeling_acestep_v15_base"
# Module goldens can come from any variant's modeling file; XL files exist from upstream commit 79f34f3 on.
MODELING = {
    "turbo": TURBO_MOD,
    "base": BASE_MOD,
    "sft": "acestep.models.sft.modeling_acestep_v15_base",
    "xl_turbo": "acestep.models.xl_turbo.modeling_acestep_v15_xl_turbo",
    "xl_base": "acestep.models.xl_base.modeling_acestep_v15_xl_base",
    "xl_sft": "acestep.models.xl_sft.modeling_acestep_v15_xl_base",
}
# Files whose module outputs must equal the chosen one's (they differ only in generate_audio), and files that
# are recorded for comparison only (the 2B files on XL weights: their timbre encoder reads the first frame).
SAME_AS = {
    "turbo": ("base", "sft"), "base": ("turbo", "sft"), "sft": ("turbo", "base"),
    "xl_turbo": ("xl_base", "xl_sft"), "xl_base": ("xl_turbo", "xl_sft"), "xl_sft": ("xl_turbo", "xl_base"),
}
RECORD_ONLY = {"xl_turbo": ("turbo",), "xl_base": ("base",), "xl_sft": ("sft",)}
DEFAULT_CASES = "dec_T37,dec_T40,dec_T37_r,enc,enc1,tok"
CONFIG_MOD = "acestep.models.common.configuration_acestep_v15"

MASK_NOTE = (
    "input masks (*.in.*mask*, refer_audio_order_mask, is_covers) are int64 with 1=valid/0=pad; "
    "enc.out.encoder_attention_mask is bool exactly as upstream pack_sequences returns it; "
    "tok.out.indices is int32 exactly as vector-quantize-pytorch returns it (shape [B, T/pool, num_quantizers])"
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_upstream(root: str):
    if root not in sys.path:
        sys.path.insert(0, root)
    cfg_mod = importlib.import_module(CONFIG_MOD)
    turbo = importlib.import_module(TURBO_MOD)
    base = importlib.import_module(BASE_MOD)
    # both modeling files must use the same AceStepConfig class
    assert turbo.AceStepConfig is cfg_mod.AceStepConfig is base.AceStepConfig
    return cfg_mod, turbo, base


def import_modeling(root: str, variant: str):
    mod = importlib.import_module(MODELING[variant])
    cfg_mod = importlib.import_module(CONFIG_MOD)
    assert mod.AceStepConfig is cfg_mod.AceStepConfig, f"{variant}: config class is not the common one"
    return mod


def state_sha256(sd) -> str:
    """Content hash of a state dict (sorted names, fp32 bytes): lets the tests check they regenerate these weights."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].to(torch.float32).contiguous()
        h.update(k.encode() + str(list(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()


def versions() -> dict:
    from importlib.metadata import version

    out = {"torch": torch.__version__}
    for pkg in ("transformers", "vector-quantize-pytorch", "einops", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # pragma: no cover
            out[pkg] = "unknown"
    out["python"] = sys.version.split()[0]
    return out


def find_checkpoint_dir(path: str) -> str:
    """Return `path` if it holds config.json + weights, else search below it."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            os.path.isfile(os.path.join(path, w)) for w in weights):
        return path
    hits = []
    for dirpath, _dirs, files in os.walk(path):
        if "config.json" in files and any(w in files for w in weights):
            hits.append(dirpath)
    if not hits:
        raise SystemExit(f"no folder with config.json + model.safetensors under {path}")
    # keep only folders whose config.json declares the AceStep model type (skips the text encoder)
    ace = []
    for h in sorted(hits):
        try:
            with open(os.path.join(h, "config.json")) as f:
                if json.load(f).get("model_type") == "acestep":
                    ace.append(h)
        except Exception:
            pass
    if len(ace) != 1:
        raise SystemExit(f"need exactly one AceStep (model_type=acestep) folder under {path}, found {ace or hits}")
    print(f"[make_goldens] using checkpoint folder {ace[0]}", file=sys.stderr)
    return ace[0]


def weight_files(ckpt_dir: str) -> list:
    """model.safetensors, or the shards named by model.safetensors.index.json (sorted)."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return [os.path.join(ckpt_dir, "model.safetensors")]
    with open(index) as f:
        return [os.path.join(ckpt_dir, n) for n in sorted(set(json.load(f)["weight_map"].values()))]


def set_attn_impl(model: torch.nn.Module, impl: str) -> None:
    """Set the attention implementation on every (possibly distinct) config object in the tree."""
    seen = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl
            seen.add(id(cfg))
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            assert cfg._attn_implementation == impl, (type(m).__name__, cfg._attn_implementation)


def load_config(cfg_mod, ckpt_dir: str, rope_scaling=None):
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        raw = json.load(f)
    if rope_scaling is not None:
        raw["rope_scaling"] = rope_scaling
    config = cfg_mod.AceStepConfig.from_dict(json.loads(json.dumps(raw)))  # from_dict mutates its input
    return config, raw


def build_model(modeling, config, state_dict, attn_impl: str, label: str):
    torch.set_default_dtype(torch.float32)
    config._attn_implementation = attn_impl
    model = modeling.AceStepConditionGenerationModel(config)
    model = model.to(torch.float32)
    set_attn_impl(model, attn_impl)

    # explicit strict check with a readable report
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_bad = sorted(
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_bad:
        lines = [f"[{label}] checkpoint does NOT load strictly into upstream AceStepConditionGenerationModel:"]
        lines += [f"  missing in checkpoint : {k} {tuple(own[k].shape)}" for k in missing]
        lines += [f"  unexpected in checkpoint: {k} {tuple(state_dict[k].shape)}" for k in unexpected]
        lines += [f"  shape mismatch: {k} checkpoint={a} upstream={b}" for k, a, b in shape_bad]
        raise SystemExit("\n".join(lines))
    sd32 = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}
    res = model.load_state_dict(sd32, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    model.eval()
    return model


def save_deterministic(tensors, path, metadata):
    """safetensors.save_file writes the metadata map in hash order (bytes differ run to run);
    re-emit the JSON header with sorted keys so identical tensors give an identical file."""
    import struct
    from safetensors.torch import load_file, save

    blob = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def length_mask(lengths, total):
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)


def cond_dim(config) -> int:
    return getattr(config, "encoder_hidden_size", None) or config.hidden_size


# --------------------------------------------------------------------------------------
# deterministic module goldens
# --------------------------------------------------------------------------------------
def make_inputs(config) -> "OrderedDict[str, dict]":
    """All inputs, keyed by case name.  Each case has its own generator seed."""
    H = cond_dim(config)
    B = 2
    cases = OrderedDict()
    t = torch.tensor([0.83, 0.27], dtype=torch.float32)
    for name, T, r, seed in (
        ("dec_T37", 37, t.clone(), 1037),
        ("dec_T40", 40, t.clone(), 1040),
        ("dec_T37_r", 37, torch.tensor([0.5, 0.1], dtype=torch.float32), 2037),
    ):
        g = gen(seed)
        cases[name] = {
            "hidden_states": randn(g, B, T, config.audio_acoustic_hidden_dim),
            "context_latents": randn(g, B, T, config.in_channels - config.audio_acoustic_hidden_dim),
            "encoder_hidden_states": randn(g, B, 23, H),
            "timestep": t.clone(),
            "timestep_r": r,
        }
    g = gen(3001)
    cases["enc"] = {
        "text_hidden_states": randn(g, 2, 12, config.text_hidden_dim),
        "text_attention_mask": length_mask([12, 7], 12),
        "lyric_hidden_states": randn(g, 2, 15, config.text_hidden_dim),
        "lyric_attention_mask": length_mask([15, 9], 15),
        "refer_audio_acoustic_hidden_states_packed": randn(g, 3, 10, config.timbre_hidden_dim),
        "refer_audio_order_mask": torch.tensor([0, 0, 1], dtype=torch.int64),
    }
    g = gen(3002)
    cases["enc1"] = {
        "text_hidden_states": randn(g, 2, 12, config.text_hidden_dim),
        "text_attention_mask": length_mask([12, 7], 12),
        "lyric_hidden_states": randn(g, 2, 15, config.text_hidden_dim),
        "lyric_attention_mask": length_mask([15, 9], 15),
        "refer_audio_acoustic_hidden_states_packed": randn(g, 2, 10, config.timbre_hidden_dim),
        "refer_audio_order_mask": torch.tensor([0, 1], dtype=torch.int64),
    }
    # Padded lyric batch: sample 1 has 4 real tokens of 30, so from position 4 + sliding_window on its queries
    # see no real key in the sliding layers (upstream's additive finfo.min mask then averages all keys).
    g = gen(3003)
    cases["enc_lpad"] = {
        "text_hidden_states": randn(g, 2, 12, config.text_hidden_dim),
        "text_attention_mask": length_mask([12, 7], 12),
        "lyric_hidden_states": randn(g, 2, 30, config.text_hidden_dim),
        "lyric_attention_mask": length_mask([30, 4], 30),
        "refer_audio_acoustic_hidden_states_packed": randn(g, 2, 10, config.timbre_hidden_dim),
        "refer_audio_order_mask": torch.tensor([0, 1], dtype=torch.int64),
    }
    g = gen(4001)
    cases["tok"] = {"x": randn(g, 2, 20, config.audio_acoustic_hidden_dim)}
    return cases


@torch.no_grad()
def run_cases(model, cases) -> "OrderedDict[str, dict]":
    outs = OrderedDict()
    for name, inp in cases.items():
        if name.startswith("dec"):
            o = model.decoder(
                hidden_states=inp["hidden_states"],
                timestep=inp["timestep"],
                timestep_r=inp["timestep_r"],
                attention_mask=None,
                encoder_hidden_states=inp["encoder_hidden_states"],
                encoder_attention_mask=None,
                context_latents=inp["context_latents"],
                use_cache=False,
            )
            outs[name] = {"velocity": o[0]}
        elif name.startswith("enc"):
            ehs, emask = model.encoder(**inp)
            outs[name] = {"encoder_hidden_states": ehs, "encoder_attention_mask": emask}
        elif name == "tok":
            q, idx = model.tokenizer.tokenize(inp["x"])
            det = model.detokenize(q)
            outs[name] = {"quantized": q, "indices": idx, "detokenized": det}
    return outs


def max_abs_diff(a: "OrderedDict[str, dict]", b: "OrderedDict[str, dict]") -> dict:
    res = {}
    for case in a:

        for k in a[case]:
            x, y = a[case][k], b[case][k]
            if x.is_floating_point():
                res[f"{case}.{k}"] = float((x - y).abs().max())
            else:
                res[f"{case}.{k}"] = float((x != y).sum())  # number of differing entries
    return res


@torch.no_grad()
def sliding_window_effect(model, cases) -> dict:
    """Compare against the same model with the sliding window widened to 'full attention'."""
    cfgs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    saved = {k: c.sliding_window for k, c in cfgs.items()}
    ref = run_cases(model, cases)
    try:
        for c in cfgs.values():
            c.sliding_window = 10**9
        wide = run_cases(model, cases)
    finally:
        for k, c in cfgs.items():
            c.sliding_window = saved[k]
    return max_abs_diff(ref, wide)


def flatten(cases, outs) -> "OrderedDict[str, torch.Tensor]":
    flat = OrderedDict()
    for name, inp in cases.items():
        for k, v in inp.items():
            flat[f"{name}.in.{k}"] = v.contiguous()
        for k, v in outs[name].items():
            flat[f"{name}.out.{k}"] = v.contiguous()
    return flat


# --------------------------------------------------------------------------------------
# sampler goldens (generate_audio)
# --------------------------------------------------------------------------------------
def make_sampler_inputs(config, B=2, T=37, seed=5001):
    g = gen(seed)
    D = config.audio_acoustic_hidden_dim
    inp = OrderedDict()
    inp["text_hidden_states"] = randn(g, B, 12, config.text_hidden_dim)
    inp["text_attention_mask"] = length_mask([12, 7], 12)
    inp["lyric_hidden_states"] = randn(g, B, 15, config.text_hidden_dim)
    inp["lyric_attention_mask"] = length_mask([15, 9], 15)
    inp["refer_audio_acoustic_hidden_states_packed"] = randn(g, B, 10, config.timbre_hidden_dim)
    inp["refer_audio_order_mask"] = torch.arange(B, dtype=torch.int64)
    inp["src_latents"] = randn(g, B, T, D)
    inp["chunk_masks"] = torch.ones(B, T, D, dtype=torch.float32)
    # sample 0: text2music (src_latents used as-is), sample 1: cover (src replaced by
    # tokenize->detokenize LM hints of src_latents) -> exercises both branches
    inp["is_covers"] = torch.tensor([0, 1][:B], dtype=torch.int64)
    # T=37 is not a multiple of pool_window_size=5, so tokenize() pads with silence_latent[:1, :pad]
    inp["silence_latent"] = randn(g, 1, T + config.pool_window_size, D)
    return inp


class DecoderRecorder:
    """Forward hook on model.decoder recording (timestep, x_in, velocity) of every call."""

    def __init__(self, decoder):
        self.calls = []
        self.h = decoder.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, _mod, _args, kwargs, out):
        self.calls.append(
            {
                "timestep": kwargs["timestep"].detach().clone(),
                "x": kwargs["hidden_states"].detach().clone(),
                "v": out[0].detach().clone(),
            }
        )

    def remove(self):
        self.h.remove()


@torch.no_grad()
def run_sampler(model, inp, noise_seed, label, **gen_kwargs):
    captured = {}
    orig_prepare_noise = model.prepare_noise

    def prepare_noise_spy(context_latents, seed=None):
        n = orig_prepare_noise(context_latents, seed)
        captured["noise"] = n.detach().clone()
        captured["context_latents"] = context_latents.detach().clone()
        return n

    model.prepare_noise = prepare_noise_spy
    orig_prepare_condition = model.prepare_condition

    def prepare_condition_spy(*a, **k):
        r = orig_prepare_condition(*a, **k)
        captured.setdefault("prepare_condition", r)
        return r

    model.prepare_condition = prepare_condition_spy
    rec = DecoderRecorder(model.decoder)
    try:
        out = model.generate_audio(**inp, seed=noise_seed, **gen_kwargs)
    finally:
        rec.remove()
        del model.prepare_noise
        del model.prepare_condition
    # the noise is reproducible outside generate_audio from the seed alone
    again = model.prepare_noise(captured["context_latents"], noise_seed)
    assert torch.equal(again, captured["noise"]), "prepare_noise not reproducible"
    ehs, emask, ctx = captured["prepare_condition"]
    flat = OrderedDict()
    flat[f"{label}.noise"] = captured["noise"]
    flat[f"{label}.cond.encoder_hidden_states"] = ehs
    flat[f"{label}.cond.encoder_attention_mask"] = emask
    flat[f"{label}.cond.context_latents"] = ctx
    flat[f"{label}.timesteps"] = torch.stack([c["timestep"][0] for c in rec.calls])
    for i, c in enumerate(rec.calls):
        flat[f"{label}.step{i}.decoder_in"] = c["x"]
        flat[f"{label}.step{i}.decoder_out"] = c["v"]
    flat[f"{label}.out.target_latents"] = out["target_latents"]
    return flat, len(rec.calls)


def reference_turbo(flat, shift=3.0, n=8):
    """Independent re-implementation of the turbo loop (see SAMPLER_NOTES.md) driven by the
    recorded decoder outputs; returns (final latents, max |recorded decoder input - ours|)."""
    u = [1.0 - i / n for i in range(n)]
    sched = torch.tensor([shift * x / (1 + (shift - 1) * x) for x in u], dtype=torch.float32)
    assert torch.allclose(sched, flat["turbo.timesteps"], atol=0, rtol=0) or \
        float((sched - flat["turbo.timesteps"]).abs().max()) < 1e-7
    sched = flat["turbo.timesteps"]
    xt = flat["turbo.noise"].clone()
    worst_in = 0.0
    for i in range(len(sched)):
        worst_in = max(worst_in, float((flat[f"turbo.step{i}.decoder_in"] - xt).abs().max()))
        v = flat[f"turbo.step{i}.decoder_out"]
        t = sched[i].item()
        if i == len(sched) - 1:
            xt = xt - v * (t * torch.ones(xt.shape[0]))[:, None, None]
        else:
            dt = t - sched[i + 1].item()          # python float (double) of fp32 values
            xt = xt - v * (dt * torch.ones(xt.shape[0]))[:, None, None]   # rounded to fp32
    return xt, worst_in


def reference_base(flat, steps=4, shift=2.0, scale=3.0, momentum=-0.75, norm_threshold=2.5,
                   label="base", cfg_start=0.0, cfg_end=1.0):
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    t = shift * t / (1 + (shift - 1) * t)
    assert torch.equal(t[:-1], flat[f"{label}.timesteps"])
    xt = flat[f"{label}.noise"].clone()
    run = 0
    worst_in = 0.0
    for i in range(steps):
        x_in = flat[f"{label}.step{i}.decoder_in"]
        worst_in = max(worst_in, float((x_in - torch.cat([xt, xt])).abs().max()))
        cond, unc = flat[f"{label}.step{i}.decoder_out"].chunk(2)
        if not (cfg_start <= t[i] <= cfg_end):           # outside the cfg interval: plain cond,
            v = cond                                      # momentum buffer untouched
            xt = xt - v * ((t[i] - t[i + 1]) * torch.ones(xt.shape[0]))[:, None, None]
            continue
        diff = cond - unc
        run = diff + momentum * run                      # MomentumBuffer.update
        diff = run
        nrm = diff.norm(p=2, dim=1, keepdim=True)        # norm over the TIME axis (dims=[1])
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / nrm)
        d64, c64 = diff.double(), cond.double()
        c64 = c64 / c64.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
        par = (d64 * c64).sum(dim=1, keepdim=True) * c64
        orth = (d64 - par).float()
        v = cond + (scale - 1) * orth                     # eta = 0
        dt = t[i] - t[i + 1]                              # 0-dim fp32 tensor arithmetic
        xt = xt - v * (dt * torch.ones(xt.shape[0]))[:, None, None]
    return xt, worst_in


@torch.no_grad()
def decoder_no_cache_check(model, flat, label, n_steps, cfg_double):
    ehs = flat[f"{label}.cond.encoder_hidden_states"]
    ctx = flat[f"{label}.cond.context_latents"]
    if cfg_double:
        ehs = torch.cat([ehs, model.null_condition_emb.expand_as(ehs)])
        ctx = torch.cat([ctx, ctx])
    worst = 0.0
    for i in range(n_steps):
        x = flat[f"{label}.step{i}.decoder_in"]
        tt = flat[f"{label}.timesteps"][i] * torch.ones(x.shape[0])
        v = model.decoder(hidden_states=x, timestep=tt, timestep_r=tt, attention_mask=None,
                          encoder_hidden_states=ehs, encoder_attention_mask=None,
                          context_latents=ctx, use_cache=False)[0]
        worst = max(worst, float((v - flat[f"{label}.step{i}.decoder_out"]).abs().max()))
    return worst


# --------------------------------------------------------------------------------------
# random tiny checkpoint for self tests
# --------------------------------------------------------------------------------------
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    text_hidden_dim=32,
    timbre_hidden_dim=64,
    audio_acoustic_hidden_dim=64,
    in_channels=192,
    patch_size=2,
    sliding_window=8,
    num_lyric_encoder_hidden_layers=2,
    num_timbre_encoder_hidden_layers=2,
    num_attention_pooler_hidden_layers=1,
    pool_window_size=5,
    fsq_dim=64,
)


def make_random_tiny(root, out_dir, seed):
    from safetensors.torch import save_file

    cfg_mod, turbo, _base = import_upstream(root)
    torch.manual_seed(seed)
    config = cfg_mod.AceStepConfig(**TINY)
    model = turbo.AceStepConditionGenerationModel(config).float().eval()
    # post_init gives weights std 0.02 and unit norms; perturb every tensor a bit so that
    # norms / biases / scale-shift tables are not trivially 1/0 (exercises more code paths)
    with torch.no_grad():
        for _n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"))
    config.save_pretrained(out_dir)
    print(f"wrote random tiny checkpoint to {out_dir} ({len(sd)} tensors)")


# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="folder with config.json + model.safetensors (searched recursively)")
    ap.add_argument("--out", help="output .safetensors")
    ap.add_argument("--upstream-root", default=DEFAULT_UPSTREAM_ROOT)
    ap.add_argument("--variant", choices=sorted(MODELING), default="turbo",
                    help="modeling file used for the module goldens (default turbo)")
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help=f"comma-separated module cases (default {DEFAULT_CASES}; also enc_lpad)")
    ap.add_argument("--rope-scaling", type=json.loads, default=None, metavar="JSON",
                    help="set config.rope_scaling to this JSON object before building the model")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--sampler", action="store_true", help="produce generate_audio goldens instead")
    ap.add_argument("--check-sliding", action="store_true",
                    help="also verify the sliding window changes the outputs (needs patch tokens > window)")
    ap.add_argument("--make-random-tiny", metavar="DIR", help="write a random tiny upstream checkpoint and exit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.make_random_tiny:
        make_random_tiny(args.upstream_root, args.make_random_tiny, args.seed)
        return
    if not (args.checkpoint and args.out):
        ap.error("--checkpoint and --out are required")

    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    cfg_mod, turbo, base = import_upstream(args.upstream_root)
    ckpt_dir = find_checkpoint_dir(args.checkpoint)
    wpaths = weight_files(ckpt_dir)
    config, raw_cfg = load_config(cfg_mod, ckpt_dir, args.rope_scaling)
    sd = {k: v for p in wpaths for k, v in load_file(p).items()}
    ck_dtypes = sorted({str(v.dtype) for v in sd.values()})
    ck_sha = ",".join(f"{os.path.basename(p)}:{sha256_file(p)}" if len(wpaths) > 1 else sha256_file(p)
                      for p in wpaths)
    cfg_sha = sha256_file(os.path.join(ckpt_dir, "config.json"))
    rel = lambda m: os.path.relpath(m.__file__, args.upstream_root)  # noqa: E731

    meta = OrderedDict(
        upstream_repo=UPSTREAM_REPO,
        upstream_commit=UPSTREAM_COMMIT,
        config_file=rel(cfg_mod),
        config_file_sha256=sha256_file(cfg_mod.__file__),
        attn_implementation=args.attn,
        dtype="float32",
        device="cpu",
        checkpoint_dir=os.path.abspath(ckpt_dir),
        checkpoint_model_safetensors_sha256=ck_sha,
        checkpoint_config_json_sha256=cfg_sha,
        checkpoint_dtypes=",".join(ck_dtypes),
        checkpoint_state_sha256=state_sha256(sd),
        config_json=json.dumps(raw_cfg, sort_keys=True),
        mask_dtypes=MASK_NOTE,
        generator="make_goldens.py (own code); inputs from torch.Generator(cpu).manual_seed(<per-case seed>) randn",
    )
    for k, v in versions().items():
        meta[f"version_{k}"] = v

    if args.rope_scaling is not None:
        meta["rope_scaling_override"] = json.dumps(args.rope_scaling, sort_keys=True)

    if not args.sampler:
        mod = import_modeling(args.upstream_root, args.variant)
        meta["modeling_file"] = rel(mod)
        meta["modeling_file_sha256"] = sha256_file(mod.__file__)
        model = build_model(mod, config, sd, args.attn, args.variant)
        wanted = args.cases.split(",")
        all_cases = make_inputs(config)
        unknown = sorted(set(wanted) - set(all_cases))
        if unknown:
            ap.error(f"unknown cases {unknown}; choose from {list(all_cases)}")
        cases = OrderedDict((k, v) for k, v in all_cases.items() if k in wanted)
        outs = run_cases(model, cases)

        other = "eager" if args.attn == "sdpa" else "sdpa"
        set_attn_impl(model, other)
        outs_other = run_cases(model, cases)
        set_attn_impl(model, args.attn)
        d_attn = max_abs_diff(outs, outs_other)
        # relative to the tensor's own scale (max |x|, at least 1): fp32 has ~6e-8 relative
        # resolution, so outputs of magnitude ~5 differ by a few ulp (~2e-6) between kernels
        d_rel = {k: v / max(1.0, float(outs[k.split(".")[0]][k.split(".", 1)[1]].abs().max()))
                 if outs[k.split(".")[0]][k.split(".", 1)[1]].is_floating_point() else v
                 for k, v in d_attn.items()}
        worst, worst_rel = max(d_attn.values()), max(d_rel.values())
        print(f"[check] {args.attn} vs {other}: max abs diff {worst:.3e}, max diff relative to "
              f"max(1,max|x|) {worst_rel:.3e} ({'OK' if worst_rel <= 1e-6 else 'ABOVE 1e-6'})")
        for k in d_attn:
            print(f"          {k:40s} abs {d_attn[k]:.3e}  rel {d_rel[k]:.3e}")
        assert worst_rel <= 1e-6, f"{args.attn} vs {other} differ: {d_attn}"
        meta[f"check_{args.attn}_vs_{other}_max_abs_diff"] = json.dumps(d_attn)
        meta[f"check_{args.attn}_vs_{other}_max_rel_diff"] = json.dumps(d_rel)

        # the other modeling files of the same family must give the same module outputs
        for other_variant in SAME_AS[args.variant]:
            other_mod = import_modeling(args.upstream_root, other_variant)
            model_o = build_model(other_mod, config, sd, args.attn, other_variant)
            d_var = max_abs_diff(outs, run_cases(model_o, cases))
            print(f"[check] {args.variant} vs {other_variant} modeling file: max abs diff {max(d_var.values()):.3e}")
            assert max(d_var.values()) <= 1e-6, f"{other_variant} differs: {d_var}"
            meta[f"check_{args.variant}_vs_{other_variant}_modeling_max_abs_diff"] = json.dumps(d_var)
            meta[f"check_{other_variant}_modeling_file_sha256"] = sha256_file(other_mod.__file__)
            del model_o
        # recorded only: how far a modeling file of the other family is from these outputs on these weights
        for other_variant in RECORD_ONLY.get(args.variant, ()):
            other_mod = import_modeling(args.upstream_root, other_variant)
            model_o = build_model(other_mod, config, sd, args.attn, other_variant)
            d_var = max_abs_diff(outs, run_cases(model_o, cases))
            for k, v in d_var.items():
                print(f"[info] {args.variant} vs {other_variant} modeling file: {k}: {v:.3e}")
            meta[f"info_{args.variant}_vs_{other_variant}_modeling_max_abs_diff"] = json.dumps(d_var)
            del model_o

        if args.check_sliding:
            d_sw = sliding_window_effect(model, cases)
            for k, v in d_sw.items():
                print(f"[check] sliding window {config.sliding_window} vs full attention: {k}: {v:.3e}")
            for k in ("dec_T37.velocity", "dec_T40.velocity", "dec_T37_r.velocity",
                      "enc.encoder_hidden_states", "enc1.encoder_hidden_states", "enc_lpad.encoder_hidden_states"):
                if k in d_sw:
                    assert d_sw[k] > 1e-4, f"sliding window has no effect on {k}"
            meta["check_sliding_window_vs_full_max_abs_diff"] = json.dumps(d_sw)

        described = {
            "dec_T37": "decoder, B=2 T=37 (odd; padded to 38 then cropped), t=r=[0.83,0.27]",
            "dec_T40": "decoder, B=2 T=40, t=r=[0.83,0.27]",
            "dec_T37_r": "decoder, B=2 T=37, t=[0.83,0.27], r=[0.5,0.1] (t-r != 0)",
            "call": "model.decoder(hidden_states, timestep, timestep_r, attention_mask=None, "
                    "encoder_hidden_states, encoder_attention_mask=None, context_latents, use_cache=False)[0]",
            "enc": "model.encoder(text 12/7 valid, lyric 15/9 valid, 3 refs packed, order [0,0,1])",
            "enc1": "model.encoder(text 12/7 valid, lyric 15/9 valid, 2 refs packed, order [0,1])",
            "enc_lpad": "model.encoder(text 12/7 valid, lyric 30/4 valid, 2 refs packed, order [0,1]); "
                        "sample 1's lyric queries from 4+sliding_window on have no real key in sliding layers",
            "tok": "model.tokenizer.tokenize(x) -> (quantized, indices); model.detokenize(quantized)",
        }
        meta["cases"] = json.dumps({k: v for k, v in described.items() if k in cases or k == "call"})
        flat = flatten(cases, outs)
    else:
        meta["modeling_file_turbo"] = rel(turbo)
        meta["modeling_file_turbo_sha256"] = sha256_file(turbo.__file__)
        meta["modeling_file_base"] = rel(base)
        meta["modeling_file_base_sha256"] = sha256_file(base.__file__)
        inp = make_sampler_inputs(config)
        flat = OrderedDict((f"sampler.in.{k}", v) for k, v in inp.items())
        noise_seed = 1234

        m_turbo = build_model(turbo, config, sd, args.attn, "turbo")
        tk = dict(shift=3.0, infer_method="ode")
        f_t, n_t = run_sampler(m_turbo, inp, noise_seed, "turbo", **tk)
        flat.update(f_t)

        m_base = build_model(base, config, sd, args.attn, "base")
        bk = dict(infer_steps=4, diffusion_guidance_scale=3.0, shift=2.0, infer_method="ode",
                  use_progress_bar=False, use_adg=False, cfg_interval_start=0.0, cfg_interval_end=1.0)
        f_b, n_b = run_sampler(m_base, inp, noise_seed, "base", **bk)
        flat.update(f_b)

        # extra: cfg interval [0, 0.7] -> the first two steps (t=1.0, 0.857) are unguided
        bk_int = dict(bk, cfg_interval_end=0.7)
        f_bi, n_bi = run_sampler(m_base, inp, noise_seed, "base_cfgint", **bk_int)
        flat.update(f_bi)
        xbi_ref, din_bi = reference_base(f_bi, steps=4, shift=2.0, scale=3.0, label="base_cfgint",
                                         cfg_start=0.0, cfg_end=0.7)
        r_bi = float((xbi_ref - f_bi["base_cfgint.out.target_latents"]).abs().max())
        print(f"[check] re-implemented base loop with cfg interval: {r_bi:.3e} (inputs {din_bi:.3e})")
        assert max(r_bi, din_bi) <= 1e-6
        meta["sampler_base_cfgint_call"] = json.dumps({"same as base but": {"cfg_interval_end": 0.7}})

        # APG unit golden: 3 successive apg_forward calls sharing one MomentumBuffer, with
        # magnitudes large enough that the norm_threshold=2.5 clamp is active for some columns
        apg_mod = importlib.import_module("acestep.models.common.apg_guidance")
        g = gen(6001)
        buf = apg_mod.MomentumBuffer()
        for i in range(3):
            pc = randn(g, 2, 37, 64)
            pu = pc + randn(g, 2, 37, 64) * (0.2 + 0.3 * i)
            flat[f"apg.call{i}.in.pred_cond"] = pc
            flat[f"apg.call{i}.in.pred_uncond"] = pu
            flat[f"apg.call{i}.out.guided"] = apg_mod.apg_forward(pc, pu, 3.0, buf, dims=[1])
            flat[f"apg.call{i}.out.momentum_running_average"] = buf.running_average.clone()
        meta["apg_unit"] = ("apg_forward(pred_cond, pred_uncond, guidance_scale=3.0, momentum_buffer=<one "
                            "MomentumBuffer(momentum=-0.75) shared by call0..2>, eta=0.0, norm_threshold=2.5, "
                            "dims=[1])")

        # the two runs share the same noise (same seed, same context shape)
        assert torch.equal(f_t["turbo.noise"], f_b["base.noise"])

        # independent re-implementation of both loops from the recorded decoder outputs
        xt_ref, din_t = reference_turbo(f_t)
        xb_ref, din_b = reference_base(f_b, steps=bk["infer_steps"], shift=bk["shift"],
                                       scale=bk["diffusion_guidance_scale"])
        r_t = float((xt_ref - f_t["turbo.out.target_latents"]).abs().max())
        r_b = float((xb_ref - f_b["base.out.target_latents"]).abs().max())
        print(f"[check] re-implemented loops vs generate_audio: turbo {r_t:.3e} (inputs {din_t:.3e}), "
              f"base {r_b:.3e} (inputs {din_b:.3e})")
        assert max(r_t, r_b, din_t, din_b) <= 1e-6
        meta["check_reimplemented_loop_max_abs_diff"] = json.dumps(
            {"turbo": r_t, "base": r_b, "turbo_step_inputs": din_t, "base_step_inputs": din_b})
        # the KV-cached decoder calls inside generate_audio equal plain use_cache=False calls
        nc_t = decoder_no_cache_check(m_turbo, f_t, "turbo", n_t, False)
        nc_b = decoder_no_cache_check(m_base, f_b, "base", n_b, True)
        print(f"[check] cached vs use_cache=False decoder: turbo {nc_t:.3e}, base {nc_b:.3e}")
        assert max(nc_t, nc_b) <= 1e-6
        meta["check_cache_vs_nocache_max_abs_diff"] = json.dumps({"turbo": nc_t, "base": nc_b})

        # eager must agree as well
        set_attn_impl(m_turbo, "eager" if args.attn == "sdpa" else "sdpa")
        f_t2, _ = run_sampler(m_turbo, inp, noise_seed, "turbo", **tk)
        set_attn_impl(m_base, "eager" if args.attn == "sdpa" else "sdpa")
        f_b2, _ = run_sampler(m_base, inp, noise_seed, "base", **bk)
        dt = float((f_t2["turbo.out.target_latents"] - f_t["turbo.out.target_latents"]).abs().max())
        db = float((f_b2["base.out.target_latents"] - f_b["base.out.target_latents"]).abs().max())
        print(f"[check] sampler attention-impl swap: turbo {dt:.3e}, base {db:.3e}")
        assert dt <= 1e-5 and db <= 1e-5
        meta["check_sampler_attn_swap_max_abs_diff"] = json.dumps({"turbo": dt, "base": db})

        meta["mask_dtypes"] = ("sampler.in.*mask*, refer_audio_order_mask, is_covers are int64 (1=valid); "
                               "<label>.cond.encoder_attention_mask is bool as upstream pack_sequences returns it")
        meta["sampler_noise_seed"] = str(noise_seed)
        meta["sampler_turbo_call"] = json.dumps(
            {"fn": "turbo AceStepConditionGenerationModel.generate_audio", "seed": noise_seed, **tk,
             "defaults_used": "fix_nfe=8 (unused), use_cache=True, audio_cover_strength=1.0, "
                              "timesteps=None, cover_noise_strength=0, sampler_mode=euler",
             "decoder_calls": n_t})
        meta["sampler_base_call"] = json.dumps(
            {"fn": "base AceStepConditionGenerationModel.generate_audio", "seed": noise_seed, **bk,
             "defaults_used": "use_cache=True, audio_cover_strength=1.0, cover_noise_strength=0, "
                              "sampler_mode=euler, APG momentum=-0.75 eta=0 norm_threshold=2.5 dims=[1]",
             "decoder_calls": n_b})
        meta["sampler_notes"] = (
            "<label>.noise = model.prepare_noise(context_latents, seed) (torch.Generator(cpu).manual_seed(seed), "
            "randn [B,T,64] fp32), captured from inside generate_audio; <label>.timesteps[i] = t fed to decoder "
            "at step i; base steps run the decoder on the CFG-doubled batch [cond; null] (2B rows); "
            "<label>.cond.* = first prepare_condition() result (before CFG doubling)."
        )

    flat = OrderedDict((k, v.contiguous()) for k, v in flat.items())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_deterministic(flat, args.out, {k: str(v) for k, v in meta.items()})
    print(f"wrote {args.out}: {len(flat)} tensors")
    for k, v in flat.items():
        print(f"  {k:60s} {str(v.dtype):15s} {list(v.shape)}")


if __name__ == "__main__":
    main()
