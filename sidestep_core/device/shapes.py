"""The released architectures, for planning without a checkpoint (``sidestep plan --shape 2b|xl``).

2B: the ``config.json`` of ``acestep-v15-turbo`` (decoder 1,575,458,880 parameters); XL: the widths of the
``acestep-v15-xl-*`` configs (DiT 2560 wide, 32 layers, 32 / 8 heads, MLP 9728; condition encoder 2048 wide).
"""

from __future__ import annotations

from ..model.config import AceStepConfig

SHAPES = ("2b", "xl")


def real_shape(name: str) -> AceStepConfig:
    if name == "2b":
        return AceStepConfig()  # the class defaults are the released 2B config
    if name == "xl":
        return AceStepConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, encoder_hidden_size=2048,
                             encoder_intermediate_size=6144, encoder_num_attention_heads=16,
                             encoder_num_key_value_heads=8)
    raise ValueError(f"shape: choose one of {', '.join(SHAPES)} (got {name!r})")
