"""Inference: the samplers, text-to-music generation with the core model, previews while training, and comparing
checkpoints × strengths.

- ``sampling``: the turbo and base/SFT samplers (upstream ``generate_audio``).
- ``generate``: :class:`Generator` (prompt → audio with the core model) and strength/checkpoint comparison.
- ``previews``: audio previews while training, isolated from training randomness.
"""
