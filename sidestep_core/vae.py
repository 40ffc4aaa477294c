"""The ACE-Step 1.5 VAE: diffusers ``AutoencoderOobleck`` from every layout, tiled encoding, the silence latent.

Layouts: the original ``vae/`` folder (diffusers ``config.json`` + ``diffusion_pytorch_model.safetensors``),
ComfyUI's ``ace_1.5_vae.safetensors`` and the ``vae.*`` part of an all-in-one checkpoint. ComfyUI stores the
stable-audio-tools module tree (``encoder.layers.N...``), Snake parameters as ``[C]`` instead of ``[1, C, 1]`` and
weight norm as a torch parametrization (``parametrizations.weight.original0`` = g, ``original1`` = v); diffusers
uses the legacy ``weight_g`` / ``weight_v`` names. The two mappings below translate key for key.

Encoding is deterministic: the posterior noise comes from a seeded CPU generator drawn once for the whole
file, so a tiled encode and a whole-file encode use the same noise and the cache is reproducible.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch

HOP = 1920  # 48 kHz / 1920 = 25 latent frames per second
SAMPLE_RATE = 48000
LATENT_CHANNELS = 64
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMFY_VAE_PREFIX = "vae."  # prefix of the VAE inside a ComfyUI all-in-one checkpoint

# Weight-norm parameter names: diffusers (legacy torch API) <-> ComfyUI (torch parametrization).
_WN_TO_COMFY = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
    "bias": "bias",
}
_WN_FROM_COMFY = {v: k for k, v in _WN_TO_COMFY.items()}
_SNAKE = ("alpha", "beta")


class VaeError(ValueError):
    """A VAE file that cannot be used; the message starts with the path."""


# ----------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------

# Inside a residual unit: diffusers child -> index in the stable-audio-tools Sequential.
_RES_CHILD = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}
# Inside an encoder block: res_unit1..3 -> 0..2, then snake1 -> 3, conv1 -> 4.
_ENC_BLOCK_CHILD = {"res_unit1": 0, "res_unit2": 1, "res_unit3": 2, "snake1": 3, "conv1": 4}
# Inside a decoder block: snake1 -> 0, conv_t1 -> 1, res_unit1..3 -> 2..4.
_DEC_BLOCK_CHILD = {"snake1": 0, "conv_t1": 1, "res_unit1": 2, "res_unit2": 3, "res_unit3": 4}


def _num_blocks(keys, side: str, diffusers: bool) -> int:
    if diffusers:
        pat = re.compile(rf"^{side}\.block\.(\d+)\.")
    else:  # blocks are the top-level entries that are themselves Sequentials
        pat = re.compile(rf"^{side}\.layers\.(\d+)\.layers\.")
    idx = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    if not idx:
        raise KeyError(f"no {side} blocks found")
    return max(idx) + (1 if diffusers else 0)


def _param_to_comfy(leaf: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    if leaf in _SNAKE:
        return leaf, value.reshape(-1)
    if leaf not in _WN_TO_COMFY:
        raise KeyError(leaf)
    return _WN_TO_COMFY[leaf], value


def vae_state_dict_to_comfy(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderOobleck`` state dict -> the names ComfyUI stores (no ``vae.`` prefix)."""
    keys = list(sd)
    n_enc = _num_blocks(keys, "encoder", True)
    n_dec = _num_blocks(keys, "decoder", True)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        side, leaf = parts[0], parts[-1]
        path = parts[1:-1]
        n = n_enc if side == "encoder" else n_dec
        if side not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE key {key!r}")
        if path == ["conv1"]:
            mod = "layers.0"
        elif path == ["snake1"]:
            mod = f"layers.{n + 1}"
        elif path == ["conv2"]:
            mod = f"layers.{n + 2}"
        elif path[0] == "block":
            block = int(path[1])
            table = _ENC_BLOCK_CHILD if side == "encoder" else _DEC_BLOCK_CHILD
            mod = f"layers.{block + 1}.layers.{table[path[2]]}"
            if path[2].startswith("res_unit"):
                mod += f".layers.{_RES_CHILD[path[3]]}"
        else:
            raise KeyError(f"unexpected VAE key {key!r}")
        name, tensor = _param_to_comfy(leaf, value)
        out[f"{side}.{mod}.{name}"] = tensor
    return out


def _strip_vae_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    anchor = "encoder.layers.0."
    prefixes = {k[: k.index(anchor)] for k in sd if anchor in k}
    if not prefixes:
        raise KeyError("no 'encoder.layers.0.' key: not a stable-audio-tools Oobleck VAE")
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def vae_state_dict_from_comfy(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI / stable-audio-tools names (optionally under ``vae.``) -> diffusers ``AutoencoderOobleck`` names.

    Accepts both weight-norm spellings ComfyUI loads (``parametrizations.weight.original0/1`` and the legacy
    ``weight_g/weight_v``) and plain ``weight`` tensors (weight norm already folded), which are split into g, v.
    """
    sd = _strip_vae_prefix(sd)
    keys = list(sd)
    n = {side: _num_blocks(keys, side, False) for side in ("encoder", "decoder")}
    inv_enc = {v: k for k, v in _ENC_BLOCK_CHILD.items()}
    inv_dec = {v: k for k, v in _DEC_BLOCK_CHILD.items()}
    inv_res = {v: k for k, v in _RES_CHILD.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
        if not m:
            raise KeyError(f"unexpected VAE key {key!r}")
        side, top, rest = m.group(1), int(m.group(2)), m.group(3)
        sub = re.match(r"^layers\.(\d+)\.(.*)$", rest)
        if top == 0:
            mod, param = "conv1", rest
        elif top == n[side] + 1:
            mod, param = "snake1", rest
        elif top == n[side] + 2:
            mod, param = "conv2", rest
        elif sub:
            child = int(sub.group(1))
            name = (inv_enc if side == "encoder" else inv_dec)[child]
            mod, param = f"block.{top - 1}.{name}", sub.group(2)
            if name.startswith("res_unit"):
                inner = re.match(r"^layers\.(\d+)\.(.*)$", param)
                if not inner:
                    raise KeyError(f"unexpected VAE key {key!r}")
                mod += "." + inv_res[int(inner.group(1))]
                param = inner.group(2)
        else:
            raise KeyError(f"unexpected VAE key {key!r}")
        if param in _SNAKE:
            out[f"{side}.{mod}.{param}"] = value.reshape(1, -1, 1)
        elif param in _WN_FROM_COMFY:
            out[f"{side}.{mod}.{_WN_FROM_COMFY[param]}"] = value
        elif param in ("weight_g", "weight_v"):
            out[f"{side}.{mod}.{param}"] = value
        elif param == "weight":  # weight norm folded into the weight: g = |w| per output slice (dim 0)
            w = value.float()
            g = w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))
            out[f"{side}.{mod}.weight_g"] = g.to(value.dtype)
            out[f"{side}.{mod}.weight_v"] = value
        else:
            raise KeyError(f"unexpected VAE key {key!r}")
    return out


def vae_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """diffusers ``AutoencoderOobleck`` config read off diffusers-named tensor shapes."""
    hidden = sd["encoder.conv1.weight_v"].shape[0]
    audio_channels = sd["encoder.conv1.weight_v"].shape[1]
    n = _num_blocks(list(sd), "encoder", True)
    mults, ratios = [], []
    for i in range(n):
        w = sd[f"encoder.block.{i}.conv1.weight_v"]  # [out, in, 2 * stride]
        mults.append(w.shape[0] // hidden)
        ratios.append(w.shape[2] // 2)
    dec_in = sd["decoder.conv1.weight_v"].shape[1]
    dec_channels = sd["decoder.conv2.weight_v"].shape[1]
    hop = 1
    for r in ratios:
        hop *= r
    return {
        "encoder_hidden_size": int(hidden),
        "downsampling_ratios": [int(r) for r in ratios],
        "channel_multiples": [int(m) for m in mults],
        "decoder_channels": int(dec_channels),
        "decoder_input_channels": int(dec_in),
        "audio_channels": int(audio_channels),
        # Oobleck checkpoints with a 1920 hop are the 48 kHz ACE-Step VAE; stable-audio's 2048 hop is 44.1 kHz.
        "sampling_rate": SAMPLE_RATE if hop == HOP else 44100,
    }


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path, prefix: Optional[str] = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                if prefix is None or k.startswith(prefix):
                    out[k] = f.get_tensor(k)
    except Exception as exc:
        raise VaeError(f"{path}: cannot read safetensors ({exc})") from exc
    return out


def _header_keys(path: Path) -> list[str]:
    from .model.loading import read_header

    return [k for k in read_header(path) if k != "__metadata__"]


def is_comfy_vae_file(path: Path) -> bool:
    """True for a safetensors file holding a stable-audio-tools Oobleck VAE (plain or under ``vae.``)."""
    try:
        keys = _header_keys(path)
    except ValueError:
        return False
    return any(k.endswith("decoder.layers.1.layers.0.beta") for k in keys)


def build_vae(config: Mapping, *, device="cpu"):
    from diffusers import AutoencoderOobleck

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not str(k).startswith("_")}
    allowed = {
        "encoder_hidden_size", "downsampling_ratios", "channel_multiples", "decoder_channels",
        "decoder_input_channels", "audio_channels", "sampling_rate",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers still uses the legacy weight_norm API
        with torch.device(device):
            return AutoencoderOobleck(**{k: v for k, v in cfg.items() if k in allowed})


def load_vae(
    path: str | Path, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu"
):
    """An ``AutoencoderOobleck`` (eval, no grad) from a diffusers folder, a ComfyUI VAE file or an AIO checkpoint.

    ``dtype``: None keeps float32 (the weight-norm reparametrisation is computed in the module's dtype).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_path, weights = path / "config.json", path / DIFFUSERS_WEIGHTS
        if not (cfg_path.is_file() and weights.is_file()):
            raise VaeError(f"{path}: not a diffusers VAE folder (needs config.json and {DIFFUSERS_WEIGHTS})")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VaeError(f"{cfg_path}: unreadable config ({exc})") from exc
        state = _read_safetensors(weights)
    elif path.is_file():
        keys = _header_keys(path)
        prefix = COMFY_VAE_PREFIX if any(k.startswith(COMFY_VAE_PREFIX + "encoder.") for k in keys) else ""
        raw = _read_safetensors(path, prefix or None)
        try:
            state = vae_state_dict_from_comfy(raw)
            config = vae_config_from_state_dict(state)
        except KeyError as exc:
            raise VaeError(f"{path}: no Oobleck VAE found ({exc})") from exc
    else:
        raise VaeError(f"{path}: no such file or folder")

    vae = build_vae(config, device="meta")
    expected = set(vae.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise VaeError(
            f"{path}: VAE weights do not match the architecture (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    state = {k: v.to(device=device, dtype=dtype or torch.float32) for k, v in state.items()}
    vae.load_state_dict(state, assign=True)
    return vae.eval().requires_grad_(False)


def vae_hop(vae) -> int:
    hop = 1
    for r in vae.config.downsampling_ratios:
        hop *= int(r)
    return hop


# ----------------------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _flush_denormals():
    """Silence (and fades into it) drives the Snake activations into denormal floats, which are several times
    slower on CPUs; flushing them to zero changes results by less than 1e-38."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


@torch.no_grad()
def encode_moments(
    vae, audio: torch.Tensor, *, chunk_seconds: float = 30.0, overlap_seconds: float = 2.0
) -> torch.Tensor:
    """Encoder output (posterior mean ‖ scale) [1, 2·64, T] in float32, computed in overlapping tiles.

    ``audio`` is [2, S] or [1, 2, S] at the VAE rate. T = S // hop, the same frame count a whole-file encode
    gives. Tiles start on frame boundaries; each keeps only its core frames and discards ``overlap_seconds`` of
    context on both sides, which exceeds the encoder's receptive field (about 0.6 s), so seams vanish.
    """
    x = audio if audio.ndim == 3 else audio.unsqueeze(0)
    hop = vae_hop(vae)
    rate = int(vae.config.sampling_rate)
    total = x.shape[-1] // hop
    if total == 0:
        raise ValueError(f"audio is shorter than one latent frame ({hop} samples)")
    chunk = max(1, round(chunk_seconds * rate / hop))
    overlap = max(0, round(overlap_seconds * rate / hop))
    param = next(vae.parameters())
    pieces = []
    with _flush_denormals():
        for start in range(0, total, chunk):
            end = min(total, start + chunk)
            lo = max(0, start - overlap)
            hi = min(total, end + overlap)
            stop = x.shape[-1] if hi == total else hi * hop  # the last tile keeps the trailing partial frame
            window = x[..., lo * hop: stop].to(device=param.device, dtype=param.dtype)
            h = vae.encoder(window)
            pieces.append(h[..., start - lo: end - lo].float().cpu())
    return torch.cat(pieces, dim=-1)


def sample_posterior(moments: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    """Latents [1, 64, T] from encoder moments: the mean when ``seed`` is None, else mean + std · N(0, 1).

    The noise is drawn on the CPU from ``seed`` for the full length at once (device-independent, tile-independent).
    """
    mean, scale = moments.chunk(2, dim=1)
    if seed is None:
        return mean
    std = torch.nn.functional.softplus(scale) + 1e-4  # the Oobleck posterior's parametrisation
    gen = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
    noise = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
    return mean + std * noise


def encode_audio(
    vae,
    audio: torch.Tensor,
    *,
    seed: Optional[int] = None,
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 2.0,
) -> torch.Tensor:
    """Latents [T, 64] float32 of stereo audio [2, S] at 48 kHz. ``seed`` None → posterior mean (no sampling)."""
    moments = encode_moments(vae, audio, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds)
    return sample_posterior(moments, seed)[0].transpose(0, 1).contiguous()


def receptive_span(vae) -> int:
    """Input samples one latent frame depends on, from the Oobleck geometry (about 26k samples, ~14 frames)."""
    span, jump = 6, 1  # first conv: kernel 7
    for stride in vae.config.downsampling_ratios:
        span += 6 * (1 + 3 + 9) * jump  # three residual units, kernel 7, dilations 1, 3, 9
        span += (2 * int(stride) - 1) * jump  # strided conv, kernel 2·stride
        jump *= int(stride)
    return span + 2 * jump  # last conv: kernel 3


@torch.no_grad()
def silence_latent_from_vae(vae, frames: int = 15000) -> torch.Tensor:
    """The silence latent [1, frames, 64] float32: digital silence encoded with the posterior mean.

    Used when a layout ships no ``silence_latent.pt`` (which stores the transpose, [1, 64, frames]). Away from
    its ends, silence encodes to one constant frame, so a short probe gives the head, the steady frame and the
    tail; the result equals encoding all ``frames`` · hop samples, at a fraction of the cost.
    """
    hop = vae_hop(vae)
    audio_channels = int(vae.config.audio_channels)

    def encode_zeros(n: int) -> torch.Tensor:
        zeros = torch.zeros(audio_channels, n * hop)
        return sample_posterior(encode_moments(vae, zeros), None)[0].transpose(0, 1)  # [n, 64]

    # An edge reaches about half the receptive span into the latent; the constancy check below catches a VAE
    # whose edges reach further (then the probe grows).
    margin = -(-receptive_span(vae) // (2 * hop)) + 3
    check = 4
    while frames > 2 * margin + check:
        probe = encode_zeros(2 * margin + check)
        steady = probe[margin: margin + check]
        tol = 1e-5 * (1.0 + float(steady.abs().max()))
        if torch.allclose(steady, steady[:1].expand_as(steady), rtol=0.0, atol=tol):
            middle = steady[:1].expand(frames - 2 * margin, -1)
            return torch.cat([probe[:margin], middle, probe[-margin:]], dim=0).unsqueeze(0).contiguous()
        margin *= 2  # an unusual VAE whose edges reach further: widen the probe
    return encode_zeros(frames).unsqueeze(0).contiguous()


# ----------------------------------------------------------------------------------------------------------
# finding the VAE that belongs to a checkpoint
# ----------------------------------------------------------------------------------------------------------

COMFY_VAE_NAMES = ("ace_1.5_vae.safetensors",)


def _is_diffusers_vae(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / DIFFUSERS_WEIGHTS).is_file()


def find_vae(checkpoint: str | Path) -> Path:
    """The VAE of a checkpoint: the AIO file itself, a ``vae/`` folder beside the DiT folder, or ComfyUI's
    ``models/vae/ace_1.5_vae.safetensors`` (any single Oobleck file there) beside ``models/diffusion_models``."""
    ckpt = Path(checkpoint).expanduser()
    if ckpt.is_file():
        keys = _header_keys(ckpt)
        if any(k.startswith(COMFY_VAE_PREFIX + "decoder.layers.") for k in keys):
            return ckpt
        models = ckpt.parent.parent
        for folder in (models / "vae", ckpt.parent / "vae"):
            for name in COMFY_VAE_NAMES:
                if (folder / name).is_file():
                    return folder / name
            if folder.is_dir():
                cands = [p for p in sorted(folder.glob("*.safetensors")) if is_comfy_vae_file(p)]
                if len(cands) == 1:
                    return cands[0]
                if len(cands) > 1:
                    names = ", ".join(p.name for p in cands)
                    raise VaeError(f"{folder}: several VAE files ({names}); choose one with --vae")
    else:
        for folder in (ckpt / "vae", ckpt.parent / "vae", ckpt.parent.parent / "vae"):
            if _is_diffusers_vae(folder):
                return folder
    raise VaeError(f"{ckpt}: no VAE found beside the checkpoint; pass --vae with a vae/ folder or "
                   "ace_1.5_vae.safetensors")


def vae_weight_files(path: Path) -> list[Path]:
    return [path / DIFFUSERS_WEIGHTS] if path.is_dir() else [path]
