"""What a checkpoint is: variant, turbo or not, timestep distribution and inference recommendations."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

from .config import AceStepConfig

VARIANTS = ("turbo", "base", "sft", "xl-turbo", "xl-base", "xl-sft")

# Recommended inference settings per family (ACE-Step docs and ComfyUI templates).
_RECOMMENDED = {
    "turbo": dict(shift=3.0, steps=8, guidance=1.0),
    "base": dict(shift=1.0, steps=50, guidance=7.0),
    "sft": dict(shift=1.0, steps=50, guidance=7.0),
}
_XL_GUIDANCE = {"xl-base": 6.0, "xl-sft": 7.0}


@dataclass(frozen=True)
class ModelInfo:
    variant: str  # one of VARIANTS, or "unknown"
    is_turbo: bool
    is_xl: bool
    timestep_mu: float
    timestep_sigma: float
    shift: float
    steps: int
    guidance: float
    identity: str  # stable hash of the weights; keys caches and adapter metadata
    source: str  # the path the model was loaded from
    layout: str  # original | comfyui-split | comfyui-aio

    def to_dict(self) -> dict:
        return asdict(self)


def _family(name: str) -> Optional[str]:
    name = name.lower()
    for fam in ("turbo", "sft", "base"):
        if re.search(rf"(^|[^a-z]){fam}([^a-z]|$)", name):
            return fam
    return None


def detect_variant(config: AceStepConfig, names: list[str], stated: Optional[str] = None) -> str:
    """Variant from (in order) what the user states, config.json, then folder/file names."""
    is_xl = config.is_xl
    if stated:
        stated = stated.lower().replace("_", "-")
        if stated not in VARIANTS:
            raise ValueError(f"unknown base variant {stated!r}; choose one of {', '.join(VARIANTS)}")
        if stated.startswith("xl-") != is_xl:  # the shape tells: the variant would give wrong metadata and advice
            fam = stated.removeprefix("xl-")
            raise ValueError(f"base variant {stated}: the checkpoint is {'an XL' if is_xl else 'a 2B'} model by its "
                             f"shape; state {'xl-' + fam if is_xl else fam}")
        return stated
    fam = None
    version = str(config.model_version or config.extra.get("model_version") or "")
    if version:
        fam = _family(version)
    if fam is None and config.is_turbo:
        fam = "turbo"
    for name in names:
        if fam is None:
            fam = _family(name)
    if fam is None:
        if config.is_turbo is False:
            fam = "base"
        else:
            return "unknown"
    return f"xl-{fam}" if is_xl else fam


def build_info(config: AceStepConfig, variant: str, identity: str, source: str, layout: str) -> ModelInfo:
    fam = variant.removeprefix("xl-") if variant != "unknown" else ("turbo" if config.is_turbo else "base")
    rec = dict(_RECOMMENDED[fam])
    rec["guidance"] = _XL_GUIDANCE.get(variant, rec["guidance"])
    return ModelInfo(
        variant=variant,
        is_turbo=fam == "turbo",
        is_xl=variant.startswith("xl-") or config.is_xl,
        timestep_mu=float(config.timestep_mu),
        timestep_sigma=float(config.timestep_sigma),
        identity=identity,
        source=source,
        layout=layout,
        **rec,
    )
