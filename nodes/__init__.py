"""The ComfyUI nodes of Side-Step. They only translate between ComfyUI values and ``sidestep_core`` calls.

- ``spec``: what each node takes and returns, as plain data built from the core's own settings (no ComfyUI
  import, so the example workflows can be checked anywhere);
- ``values``: the values that travel between the nodes (model bundle, dataset, adapter, estimate);
- ``extension``: the V3 node classes and ``comfy_entrypoint`` (imports ComfyUI).
"""
