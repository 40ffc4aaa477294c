"""Merge Adapters: an exact weighted sum of adapters as a new file in ``models/loras``, or the adapters baked into a
copy of the base model in ``models/diffusion_models`` (``sidestep merge`` in the graph)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import folder_paths
from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import paths, text
from .schema import build_schema
from .values import AdapterRef, ModelBundle


class MergeAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.MERGE)

    @classmethod
    def fingerprint_inputs(cls, mode="sum", name="sidestep_merged", **slots):
        """Merge again when a source LoRA or the written file changed or was deleted."""
        sources = [folder_paths.get_full_path("loras", slots.get(f"lora_{n}", S.NONE))
                   for n in range(1, S.MERGE_SLOTS + 1) if slots.get(f"lora_{n}", S.NONE) not in ("", S.NONE)]
        folder = "diffusion_models" if mode == "bake" else "loras"
        out = calls.export_path(Path((paths(folder) or ["."])[0]), name, True)
        return calls.files_state(*sources, out)

    @classmethod
    def execute(cls, mode="sum", name="sidestep_merged", overwrite=True, rank=0, adapter: Optional[AdapterRef] = None,
                adapter_weight=1.0, checkpoint="final", model: Optional[ModelBundle] = None,
                **slots) -> io.NodeOutput:
        from sidestep_core.adapters import export_comfyui, read_adapter_weights

        chosen: list[tuple[str, float]] = []
        if adapter is not None:
            chosen.append((str(calls.chosen_adapter(adapter, checkpoint)), float(adapter_weight)))
        for n in range(1, S.MERGE_SLOTS + 1):
            lora = slots.get(f"lora_{n}", S.NONE)
            if lora not in ("", S.NONE):
                weight = float(slots.get(f"weight_{n}", 1.0))
                chosen.append((folder_paths.get_full_path_or_raise("loras", lora), weight))
        if not chosen:
            raise ValueError("Merge Adapters: choose at least one lora_N or connect an adapter")
        sources = [(read_adapter_weights(p), w) for p, w in chosen]
        lines = [f"{w:+g} × {Path(p).name}" for p, w in chosen]

        if mode == "bake":
            from sidestep_core.adapters.bake import bake

            base = model.checkpoint if model is not None else (adapter.checkpoint if adapter is not None else None)
            if rank:
                raise ValueError("Merge Adapters: rank applies to mode 'sum' only (a baked model is exact)")
            if base is None:
                raise ValueError("Merge Adapters: baking needs the base model: connect Load ACE-Step Checkpoint "
                                 "to 'model' (or a trained adapter, whose base model is used)")
            out = calls.export_path(Path(paths("diffusion_models")[0]), name, bool(overwrite))
            result = bake(base, sources, out)
            folder_paths.filename_list_cache.pop("diffusion_models", None)  # UNETLoader lists it at once
            lines += [f"baked into a copy of {Path(base).name}: {result.patched} tensors changed", *result.notes]
            return io.NodeOutput(str(result.path), ui=text(f"wrote {result.path}", *lines))

        from sidestep_core.adapters.merge import weighted_sum

        merged = weighted_sum(sources)
        if rank:
            from sidestep_core.adapters.merge import rerank

            merged, errors = rerank(merged, int(rank))
            if errors:
                lines.append(f"re-ranked {len(errors)} target(s) to rank {rank} by truncated SVD: relative error "
                             f"max {max(errors.values()):.2e}, mean {sum(errors.values()) / len(errors):.2e}")
        path, notes = export_comfyui(merged, calls.export_path(Path(paths("loras")[0]), name, bool(overwrite)))
        folder_paths.filename_list_cache.pop("loras", None)
        return io.NodeOutput(str(path), ui=text(f"wrote {path}", *lines, *merged.notes, *notes))
