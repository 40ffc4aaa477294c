"""Names of adaptable ACE-Step 1.5 targets, and turning the underscore names of kohya / LyCORIS files back into them.

ACE-Step's module tree is the same in the released checkpoints, ComfyUI and this package, so the set of valid
targets is read from the model class itself (built on the meta device, no weights).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import torch

_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)")


def normalise(name: str) -> str:
    """``decoder.layers.12.self_attn.q_proj`` -> ``decoder.layers.N.self_attn.q_proj``."""
    return _NUM.sub("N", name)


@lru_cache(maxsize=1)
def _patterns() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(target patterns, bias-owner patterns, every dotted prefix of a target pattern) for the whole model."""
    from ..model.model import AceStepModel
    from ..tiny.profiles import get_profile

    with torch.device("meta"):
        model = AceStepModel(get_profile("tiny").dit)
    targets, biases = set(), set()
    for name, _ in model.named_parameters():
        n = normalise(name)
        if n.endswith(".weight"):
            targets.add(n[: -len(".weight")])
        elif n.endswith(".bias"):
            biases.add(n[: -len(".bias")])
        else:
            targets.add(n)
    prefixes = set()
    for t in targets | biases:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            prefixes.add(".".join(parts[:i]))
    return frozenset(targets), frozenset(biases), frozenset(prefixes)


def is_target(root_name: str) -> bool:
    """True if ``root_name`` (named from the model root, e.g. ``decoder.layers.0.mlp.up_proj``) can be adapted."""
    targets, biases, _ = _patterns()
    n = normalise(root_name)
    return n in targets or n in biases


def from_underscores(flat: str, root_prefix: str = "") -> Optional[str]:
    """Dotted model-root name for an underscore name (``layers_0_self_attn_q_proj`` with root_prefix ``decoder.``),
    or None when no ACE-Step target spells that way."""
    _, _, prefixes = _patterns()
    tokens = flat.split("_")
    found: list[str] = []

    def walk(i: int, parts: list[str]) -> None:
        if found:
            return
        if i == len(tokens):
            name = root_prefix + ".".join(parts)
            if is_target(name):
                found.append(name)
            return
        for j in range(i + 1, len(tokens) + 1):
            part = "_".join(tokens[i:j])
            cand = normalise(root_prefix + ".".join(parts + [part]))
            if cand in prefixes:
                walk(j, parts + [part])

    walk(0, [])
    return found[0] if found else None


def split_root(root_name: str) -> tuple[bool, str]:
    """(inside the decoder?, name in decoder naming if inside, else the root name)."""
    if root_name.startswith("decoder."):
        return True, root_name[len("decoder."):]
    return False, root_name
