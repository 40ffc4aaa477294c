"""The planner LM's ComfyUI layout holds exactly the tensors ComfyUI's ACE-Step 1.5 LM model has, by name and (for
the comfyui-min shape) by shape, and ComfyUI tells it apart from the text encoder by the same tensors."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.comfyui]


def _comfy_lm_shapes(comfy) -> dict[str, tuple[int, ...]]:
    import comfy.ops
    import comfy.text_encoders.llama as llama

    with torch.device("meta"):
        lm = llama.Qwen3_2B_ACE15_lm({}, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    return {k: tuple(v.shape) for k, v in lm.state_dict().items()}


def test_comfyui_layout_matches_comfyuis_lm(comfy):
    import comfy.sd

    from sidestep_core.planner.tiny import planner_shapes, planner_state_to_comfy

    expected = _comfy_lm_shapes(comfy)
    full = {k: tuple(t.shape) for k, t in planner_state_to_comfy(
        {k: torch.empty(s, device="meta") for k, s in planner_shapes("comfyui-min").items()}).items()}
    assert full == expected  # every tensor, no extra one, same shapes
    tiny = planner_state_to_comfy({k: torch.empty(s, device="meta") for k, s in planner_shapes("tiny").items()})
    n_layers = 2
    assert set(tiny) == {k for k in expected if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    # ComfyUI's detection sends a file with these names to its 1.7B LM slot
    fake = {k: torch.empty(s, device="meta") for k, s in full.items()}
    assert comfy.sd.detect_te_model(fake) == comfy.sd.TEModel.QWEN3_2B
