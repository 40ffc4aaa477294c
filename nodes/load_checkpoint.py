"""Load ACE-Step Checkpoint: finds a model and its text encoder and VAE; loads only headers."""

from __future__ import annotations

from comfy_api.latest import io

from . import calls, spec as S
from .comfy_glue import comfy_tokenizer_dir, pick, resolve_model_choice, text
from .schema import build_schema
from .values import classify


class LoadCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(S.LOAD)

    @classmethod
    def fingerprint_inputs(cls, model, text_encoder=S.AUTO, vae=S.AUTO, variant=S.AUTO):
        try:
            path = resolve_model_choice(model)
        except ValueError:
            return ""
        target = path / "model.safetensors" if path.is_dir() else path
        try:
            st = target.stat()
            return f"{path}:{st.st_size}:{st.st_mtime_ns}:{text_encoder}:{vae}:{variant}"
        except OSError:
            return str(path)

    @classmethod
    def execute(cls, model, text_encoder=S.AUTO, vae=S.AUTO, variant=S.AUTO) -> io.NodeOutput:
        from sidestep_core.model import load_acestep

        path = resolve_model_choice(model)
        stated = None if variant == S.AUTO else variant
        loaded = load_acestep(path, parts=set(), variant=stated)  # headers and config only: no weights
        info = loaded.info
        kind = "folder" if path.is_dir() else classify(path)
        te_path = vae_path = None
        if kind == "acestep":  # a bare DiT file: its text encoder and VAE live in ComfyUI's other folders
            te_path = pick("text_encoders", text_encoder, "qwen_0.6b_ace15.safetensors", "qwen_0.6b")
            vae_path = pick("vae", vae, "ace_1.5_vae.safetensors", "vae")
        else:  # all-in-one file or original folder: the core finds them inside/beside unless one is chosen
            if text_encoder != S.AUTO:
                te_path = pick("text_encoders", text_encoder, "", "qwen_0.6b")
            if vae != S.AUTO:
                vae_path = pick("vae", vae, "", "vae")
        tokenizer = None if path.is_dir() else comfy_tokenizer_dir()  # ComfyUI files carry no tokenizer
        bundle = calls.bundle_from_info(path, model, info, stated, text_encoder=te_path, vae=vae_path,
                                        tokenizer=tokenizer)
        lines = [bundle.summary(), f"text encoder: {te_path or 'auto'}", f"VAE: {vae_path or 'auto'}",
                 f"tokenizer: {tokenizer or 'auto'}"]
        if info.variant == "unknown":
            lines.append("variant unknown: set 'variant' so training uses the right timestep distribution")
        return io.NodeOutput(bundle, ui=text(*lines))
