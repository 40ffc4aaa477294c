"""The ComfyUI nodes of Side-Step. They only translate between ComfyUI values and ``sidestep_core`` calls.

- ``spec``: what each node takes and returns, as plain data built from the core's own settings (no ComfyUI
  import, so the example workflows can be checked anywhere);
- ``values``: the values that travel between the nodes (model bundle, dataset, adapter, estimate);
- ``calls``, ``runs``, ``chart``: the ComfyUI-free half of the nodes (core arguments, run folders, loss image);
- ``load_checkpoint``, ``preprocess_audio``, ``train_adapter``, ``estimate_gradients``, ``export_adapter``,
  ``apply_adapter``: one V3 node class each (import ComfyUI), over ``comfy_glue`` (folders, memory, events) and
  ``schema`` (spec → V3 schema);
- ``extension``: ``comfy_entrypoint``, the list of nodes.
"""
