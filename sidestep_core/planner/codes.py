"""Audio → 5 Hz semantic codes with the DiT checkpoint's own FSQ audio tokenizer, cached by content.

Upstream turns a song into LM codes by VAE-encoding it and running the DiT's ``tokenize`` (25 Hz latents padded with
the silence latent to a multiple of the 5-frame pool window, attention-pooled, FSQ-quantised); code N is the LM
token ``<|audio_code_N|>``. Here the latents come from the preprocessed cache (the same latents the DiT adapter is
trained on) or from the VAE for raw audio.

Codes depend only on the latents and the audio tokenizer's weights, so a cache file is named by a hash of the two
and stores the tokenizer's identity; reading codes made by another tokenizer (another model family, a different
codebook) raises instead of feeding the LM ids it was never trained on. Token ids: see
:meth:`~sidestep_core.planner.loading.PlannerTokenizer.code_ids` / ``codes_from_ids``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import torch

from ..data.cache import canonical_json, write_safetensors
from .loading import PlannerError

CODES_FORMAT = "sidestep-planner-codes"
CODES_VERSION = 1
CODES_DIR = "planner_codes"  # inside a preprocessed folder (the preprocessor only prunes files at its top level)


class CodesMismatchError(PlannerError):
    """Codes made by a different audio tokenizer than the one in use."""


def audio_tokenizer_identity(model) -> str:
    """Content hash of the audio tokenizer (``tokenizer.*`` weights, fp32 bytes in name order) and its levels."""
    h = hashlib.sha256()
    levels = [int(v) for v in model.tokenizer.quantizer.levels.tolist()]
    h.update(canonical_json({"levels": levels, "pool": int(model.config.pool_window_size)}).encode())
    for name, t in sorted(model.tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def codebook_size(model) -> int:
    return math.prod(int(v) for v in model.tokenizer.quantizer.levels.tolist())


@torch.no_grad()
def codes_from_latents(model, latents: torch.Tensor, silence_latent: torch.Tensor) -> torch.Tensor:
    """Codes [ceil(T/5)] int64 of one song's latents [T, 64] (the model's ``tokenize``, as upstream labels songs)."""
    if latents.ndim != 2:
        raise ValueError(f"latents must be [T, 64], got {tuple(latents.shape)}")
    param = next(model.tokenizer.parameters())
    x = latents.to(device=param.device, dtype=param.dtype)[None]
    _, indices = model.tokenize(x, silence_latent.to(device=param.device, dtype=param.dtype))
    return indices[0, :, 0].long().cpu()


def latents_identity(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


def codes_key(latents: torch.Tensor, tokenizer_identity: str) -> str:
    payload = canonical_json({"format": CODES_FORMAT, "version": CODES_VERSION, "latents": latents_identity(latents),
                              "audio_tokenizer": tokenizer_identity})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def write_codes(path: Path, codes: torch.Tensor, tokenizer_identity: str, size: int) -> None:
    write_safetensors(path, {"codes": codes.to(torch.int64).contiguous()}, {
        "format": CODES_FORMAT, "format_version": str(CODES_VERSION),
        "audio_tokenizer": tokenizer_identity, "codebook_size": str(size),
    })


def read_codes(path: Path, tokenizer_identity: Optional[str] = None) -> torch.Tensor:
    """Codes [N] from a cache file; with ``tokenizer_identity``, refuses codes of another audio tokenizer."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            codes = f.get_tensor("codes")
    except Exception as exc:
        raise PlannerError(f"{path}: cannot read audio codes ({exc})") from exc
    if meta.get("format") != CODES_FORMAT:
        raise PlannerError(f"{path}: not an audio-code file of this tool")
    if tokenizer_identity is not None and meta.get("audio_tokenizer") != tokenizer_identity:
        raise CodesMismatchError(
            f"{path}: these audio codes were made by a different audio tokenizer ({meta.get('audio_tokenizer')}) "
            f"than this checkpoint's ({tokenizer_identity}); codes are only meaningful to the tokenizer that made "
            "them — delete the file or make them again with this checkpoint")
    return codes


class CodeCache:
    """Codes of latents, one safetensors file per (latents, audio tokenizer), written atomically."""

    def __init__(self, folder: str | Path, model, silence_latent: torch.Tensor):
        self.folder = Path(folder).expanduser()
        self.model = model
        self.silence = silence_latent
        self.identity = audio_tokenizer_identity(model)
        self.size = codebook_size(model)

    def path_for(self, latents: torch.Tensor) -> Path:
        return self.folder / f"{codes_key(latents, self.identity)}.safetensors"

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        path = self.path_for(latents)
        if path.is_file():
            try:
                return read_codes(path, self.identity)
            except CodesMismatchError:
                raise
            except PlannerError:
                pass  # a torn or foreign file under our name: make it again
        codes = codes_from_latents(self.model, latents, self.silence)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_codes(path, codes, self.identity, self.size)
        return codes


def check_codebook(model, planner) -> None:
    """The LM's audio-code vocabulary must be this audio tokenizer's codebook."""
    size = codebook_size(model)
    if planner.tokenizer.codebook_size != size:
        raise CodesMismatchError(
            f"{planner.path}: the LM knows {planner.tokenizer.codebook_size} audio codes but this checkpoint's audio "
            f"tokenizer makes {size}; the LM and the DiT are from different model families")


def dataset_codes(dataset, model, silence_latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codes of every clip of a ``training.data.LatentDataset`` (from its ``target_latents``; the samples it left
    out as unreadable are not read), cached in ``<its folder>/planner_codes/``; keyed by sample id."""
    cache = CodeCache(Path(dataset.root) / CODES_DIR, model, silence_latent)
    return {c.sample.id: cache.codes(c.sample.load()["target_latents"].float()) for c in dataset.clips}
