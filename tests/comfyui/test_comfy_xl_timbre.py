"""ComfyUI's timbre encoder on XL weights: the 2B path, where upstream's ``xl_*`` modeling files (and we) prepend
``special_token`` (docs/COMFYUI.md). No XL model small enough for ComfyUI to build whole exists (its XL decoder is over
2048 wide), so ComfyUI's own ``AceStepTimbreEncoder`` class is built at the ``tiny-xl`` encoder's shape."""

from __future__ import annotations

import pytest
import torch

from sidestep_core.model import AceStepModel
from sidestep_core.tiny import get_profile
from sidestep_core.tiny.writer import dit_state

pytestmark = [pytest.mark.comfyui]

PREFIX = "encoder.timbre_encoder."


def test_comfyui_xl_timbre_is_the_2b_path(comfy):  # the fixture puts ComfyUI on the path
    import comfy.ops
    from comfy.ldm.ace.ace_step15 import AceStepTimbreEncoder

    profile = get_profile("tiny-xl")
    state = dit_state(profile, 0)
    ours = AceStepModel(profile.dit)
    ours.load_state_dict(state)
    ours.eval()
    enc = profile.dit.encoder_view()
    theirs = AceStepTimbreEncoder(
        enc.timbre_hidden_dim, enc.hidden_size, enc.num_timbre_encoder_hidden_layers, enc.num_attention_heads,
        enc.num_key_value_heads, enc.head_dim, enc.intermediate_size, enc.rms_norm_eps,
        dtype=torch.float32, operations=comfy.ops.disable_weight_init,
    )
    theirs.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
    theirs.eval()

    # ComfyUI's encoder layers have no sliding window: stay within it (8 frames + the token = 9 ≤ window + 1)
    refs = torch.randn(2, profile.dit.sliding_window, enc.timbre_hidden_dim, generator=torch.Generator().manual_seed(5))
    order = torch.tensor([0, 1])
    timbre = ours.encoder.timbre_encoder
    with torch.no_grad():
        a, a_mask = theirs(refs, order)
        xl, _ = timbre(refs, order)
        timbre.cls_token = False
        try:
            first_frame, b_mask = timbre(refs, order)
        finally:
            timbre.cls_token = True
    assert torch.equal(a_mask.long(), b_mask.long())
    assert ((a - first_frame).abs().max() / a.abs().max()).item() < 1e-5
    assert ((a - xl).abs().max() / a.abs().max()).item() > 1e-2
