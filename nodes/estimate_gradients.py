"""Estimate Gradients: ranks the decoder's modules for Train Adapter's targets and ranks."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import device, free_comfy_models, release_memory, text, training_mode
from .schema import build_schema
from .values import DatasetRef, ModelBundle


class EstimateGradients(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.ESTIMATE, hidden=(io.Hidden.unique_id,))

    @classmethod
    def execute(cls, model: ModelBundle, dataset: DatasetRef, **values) -> io.NodeOutput:
        from sidestep_core.estimate import estimate

        bar: dict[str, comfy.utils.ProgressBar] = {}
        notes: list[str] = []  # the core's warnings (samples it left out), shown above the result

        def progress(ev: dict) -> None:
            if ev.get("event") == "log":
                notes.append(str(ev.get("message", "")))
            if ev.get("event") == "step" and ev.get("total") and not mm.processing_interrupted():
                b = bar.get("bar") or bar.setdefault("bar", comfy.utils.ProgressBar(ev["total"],
                                                                                   node_id=cls.hidden.unique_id))
                b.update_absolute(ev["step"], ev["total"])

        free_comfy_models()
        try:
            with training_mode():
                result = estimate(model.checkpoint, dataset.path, progress=progress,
                                  base_variant=model.stated_variant, should_stop=mm.processing_interrupted,
                                  **calls.estimate_overrides(values, device()))
        except KeyboardInterrupt:
            raise mm.InterruptProcessingException() from None
        finally:
            release_memory()
        ref = calls.estimate_ref(result)
        shown = "\n".join([*notes, ref.text])
        return io.NodeOutput(ref, shown, ui=text(shown))
