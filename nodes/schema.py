"""Node specs (``spec.py``, plain data) → ComfyUI V3 schemas."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from . import spec as S
from .comfy_glue import dynamic_options

_CUSTOM = {t: io.Custom(t) for t in (S.MODEL_TYPE, S.DATASET_TYPE, S.ADAPTER_TYPE, S.ESTIMATE_TYPE)}
_BUILTIN = {"MODEL": io.Model, "IMAGE": io.Image, "STRING": io.String, "CONDITIONING": io.Conditioning,
            "LATENT": io.Latent, "VAE": io.Vae, "AUDIO": io.Audio, "CLIP": io.Clip}


def _widget(i: S.InputSpec):
    common: dict[str, Any] = dict(optional=i.optional, tooltip=i.tooltip or None, advanced=i.advanced or None,
                                  extra_dict={S.ADAPTERS_KEY: list(i.adapters)} if i.adapters else None)
    if i.kind == "INT":
        control = None if i.control_after_generate is None else io.ControlAfterGenerate(i.control_after_generate)
        return io.Int.Input(i.name, default=i.default, min=_num(i.min), max=_num(i.max), step=_num(i.step),
                            control_after_generate=control, **common)
    if i.kind == "FLOAT":
        # ComfyUI's frontend rounds floats to the step unless told not to: learning rates need every digit.
        rounding = False if (i.step is None or i.step < 0.01) else None
        return io.Float.Input(i.name, default=float(i.default), min=i.min, max=i.max, step=i.step,
                              round=rounding, **common)
    if i.kind == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.kind == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.kind == "COMBO":
        options = list(i.options) + (dynamic_options(i.dynamic) if i.dynamic else [])
        options = list(dict.fromkeys(options))
        default = i.default if i.default in options else (options[0] if options else None)
        return io.Combo.Input(i.name, options=options, default=default, **common)
    if i.kind in _CUSTOM:
        return _CUSTOM[i.kind].Input(i.name, optional=i.optional, tooltip=i.tooltip or None)
    return _BUILTIN[i.kind].Input(i.name, optional=i.optional, tooltip=i.tooltip or None)


def _num(x):
    return None if x is None else int(x)


def _output(o: S.OutputSpec):
    kind = _CUSTOM.get(o.kind) or _BUILTIN[o.kind]
    return kind.Output(display_name=o.name, tooltip=o.tooltip or None)


def build_schema(node: S.NodeSpec, hidden: tuple = ()) -> io.Schema:
    return io.Schema(
        node_id=node.node_id,
        display_name=node.display_name,
        category=S.CATEGORY,
        description=node.description,
        search_aliases=list(node.search_aliases),
        inputs=[_widget(i) for i in node.inputs],
        outputs=[_output(o) for o in node.outputs],
        hidden=list(hidden),
        is_output_node=node.output_node,
    )
