"""Side-Step core: headless ACE-Step 1.5 adapter training (no ComfyUI imports here)."""

__version__ = "0.1.0"
