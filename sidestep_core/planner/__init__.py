"""The 5 Hz planner LM of ACE-Step 1.5: loading, audio codes, prompts and auto-labelling.

The LM is a Qwen3 causal LM whose vocabulary is Qwen3's text tokens followed by one token per code of the DiT's FSQ
audio tokenizer (``<|audio_code_N|>``). Names are resolved lazily so importing the package costs no torch.
"""

from importlib import import_module

_LAZY = {
    "Planner": "loading",
    "PlannerError": "loading",
    "PlannerTokenizer": "loading",
    "load_planner": "loading",
    "find_planner": "loading",
    "make_tiny_planner": "tiny",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
