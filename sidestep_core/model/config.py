"""Architecture description of an ACE-Step 1.5 DiT checkpoint.

Built from the checkpoint's own ``config.json`` when there is one (the class defaults of upstream's config
class do not describe the released weights), otherwise inferred from tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"


def default_layer_types(n: int) -> list[str]:
    """Even-indexed layers use the sliding window, odd ones attend to everything (upstream's rule)."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(n)]


@dataclass
class AceStepConfig:
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Upstream hands this to transformers' Qwen3 RoPE; we support none, 'default' and 'linear' (see rope_factor).
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    use_sliding_window: bool = True
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    in_channels: int = 192
    audio_acoustic_hidden_dim: int = 64
    patch_size: int = 2
    text_hidden_dim: int = 1024
    timbre_hidden_dim: int = 64
    timbre_fix_frame: int = 750
    num_lyric_encoder_hidden_layers: int = 8
    num_timbre_encoder_hidden_layers: int = 4
    num_attention_pooler_hidden_layers: int = 2
    pool_window_size: int = 5
    fsq_dim: int = 2048
    fsq_input_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    fsq_input_num_quantizers: int = 1
    vocab_size: int = 64003
    num_audio_decoder_hidden_layers: int = 24
    timestep_mu: float = -0.4
    timestep_sigma: float = 1.0
    data_proportion: float = 0.5
    is_turbo: Optional[bool] = None
    model_version: Optional[str] = None
    # XL: the condition encoder, tokenizer and detokenizer keep their own (narrower) width.
    encoder_hidden_size: Optional[int] = None
    encoder_intermediate_size: Optional[int] = None
    encoder_num_attention_heads: Optional[int] = None
    encoder_num_key_value_heads: Optional[int] = None
    # Audio tokenizer / detokenizer widths when they differ from the encoder's (not in released configs; used by
    # minimal test models whose encoder is narrower than the 6144-wide pooler ComfyUI hard-wires).
    tokenizer_intermediate_size: Optional[int] = None
    tokenizer_num_attention_heads: Optional[int] = None
    # Everything else config.json carries (auto_map, architectures, dtype, ...), kept so it can be written back.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) < self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer types {bad}")
        self.rope_factor()  # refuses an unsupported rope_scaling when the config is made

    def rope_factor(self) -> float:
        """Linear RoPE scaling factor (positions are divided by it); 1 without scaling.

        transformers' ``linear`` type divides the frequencies by ``factor``; ``default`` (or none) leaves them.
        The other types (dynamic, yarn, longrope, llama3) are refused rather than silently ignored.
        """
        scaling = self.rope_scaling
        if scaling is None:
            return 1.0
        if not isinstance(scaling, Mapping):
            raise ValueError(f"rope_scaling must be an object or null, not {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return 1.0
        if kind != "linear":
            raise ValueError(
                f"rope_scaling of type {kind!r} is not supported (only 'linear' and 'default'); "
                "the released ACE-Step 1.5 models use none"
            )
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise ValueError(f"rope_scaling 'linear' needs a positive 'factor', got {factor!r}")
        return float(factor)

    @property
    def is_xl(self) -> bool:
        """Upstream's XL architecture (``xl_*`` modeling files): a decoder wider than its condition encoder."""
        return self.encoder_hidden_size is not None and self.hidden_size > self.encoder_hidden_size

    # ----- derived widths -----
    @property
    def enc_hidden(self) -> int:
        return self.encoder_hidden_size or self.hidden_size

    def encoder_view(self) -> "AceStepConfig":
        """The config the condition encoder, tokenizer and detokenizer are built from."""
        if self.enc_hidden == self.hidden_size:
            return self
        return dataclasses.replace(
            self,
            hidden_size=self.enc_hidden,
            intermediate_size=self.encoder_intermediate_size or self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads or self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads or self.num_key_value_heads,
            encoder_hidden_size=None,
        )

    def tokenizer_view(self) -> "AceStepConfig":
        """The config the audio tokenizer and detokenizer are built from."""
        enc = self.encoder_view()
        if self.tokenizer_intermediate_size is None and self.tokenizer_num_attention_heads is None:
            return enc
        return dataclasses.replace(
            enc,
            intermediate_size=self.tokenizer_intermediate_size or enc.intermediate_size,
            num_attention_heads=self.tokenizer_num_attention_heads or enc.num_attention_heads,
        )

    def window_for(self, layer_idx: int) -> Optional[int]:
        """Encoders index the DiT's layer_types by their own layer index; past its end the default rule holds."""
        types = self.layer_types if layer_idx < len(self.layer_types) else default_layer_types(layer_idx + 1)
        if self.use_sliding_window and types[layer_idx] == SLIDING:
            return self.sliding_window
        return None

    # ----- (de)serialisation -----
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AceStepConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if "intermediate_size" not in known and "inner_mlp_width" in extra:
            known["intermediate_size"] = extra.pop("inner_mlp_width")
        # null means "not set" in upstream configs: fall back to the defaults rather than to None.
        for key in ("sliding_window", "layer_types"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "AceStepConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON config ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config must be a JSON object")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.setdefault("model_type", "acestep")
        out.setdefault("architectures", ["AceStepConditionGenerationModel"])
        return out

    # ----- shape inference for files without a config -----
    @classmethod
    def infer_from_state_dict(cls, shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> "AceStepConfig":
        """Read the architecture off tensor shapes (keys without any prefix).

        Counts that shapes cannot reveal (KV-head split of the DiT, pooler depth ...) fall back to the
        released 2B model's values, as ComfyUI does.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise KeyError(key)
            return tuple(shapes[key])

        def count(prefix: str) -> int:
            idx = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
            return max(idx) + 1 if idx else 0

        hidden = shape("decoder.layers.0.self_attn_norm.weight")[0]
        head_dim = shape("decoder.layers.0.self_attn.q_norm.weight")[0]
        q_rows = shape("decoder.layers.0.self_attn.q_proj.weight")[0]
        kv_rows = shape("decoder.layers.0.self_attn.k_proj.weight")[0]
        inter = shape("decoder.layers.0.mlp.gate_proj.weight")[0]
        in_channels, patch = shape("decoder.proj_in.1.weight")[1:]
        acoustic = shape("decoder.proj_out.1.weight")[1]
        cond_in = shape("decoder.condition_embedder.weight")[1]

        kw: dict[str, Any] = dict(
            hidden_size=hidden,
            head_dim=head_dim,
            num_attention_heads=q_rows // head_dim,
            num_key_value_heads=kv_rows // head_dim,
            intermediate_size=inter,
            num_hidden_layers=count("decoder.layers."),
            in_channels=in_channels,
            patch_size=patch,
            audio_acoustic_hidden_dim=acoustic,
        )
        enc = "encoder.lyric_encoder.layers.0."
        if enc + "input_layernorm.weight" in shapes:
            enc_hidden = shape(enc + "input_layernorm.weight")[0]
            kw["text_hidden_dim"] = shape("encoder.text_projector.weight")[1]
            kw["timbre_hidden_dim"] = shape("encoder.timbre_encoder.embed_tokens.weight")[1]
            kw["num_lyric_encoder_hidden_layers"] = count("encoder.lyric_encoder.layers.")
            kw["num_timbre_encoder_hidden_layers"] = count("encoder.timbre_encoder.layers.")
            enc_heads = shape(enc + "self_attn.q_proj.weight")[0] // head_dim
            enc_kv = shape(enc + "self_attn.k_proj.weight")[0] // head_dim
            enc_inter = shape(enc + "mlp.gate_proj.weight")[0]
            if enc_hidden != hidden or cond_in != hidden:
                kw.update(
                    encoder_hidden_size=enc_hidden,
                    encoder_intermediate_size=enc_inter,
                    encoder_num_attention_heads=enc_heads,
                    encoder_num_key_value_heads=enc_kv,
                )
        pool = "tokenizer.attention_pooler.layers.0."
        if pool + "input_layernorm.weight" in shapes:
            kw["num_attention_pooler_hidden_layers"] = count("tokenizer.attention_pooler.layers.")
            tok_inter = shape(pool + "mlp.gate_proj.weight")[0]
            tok_heads = shape(pool + "self_attn.q_proj.weight")[0] // head_dim
            if tok_inter != kw.get("encoder_intermediate_size", inter):
                kw["tokenizer_intermediate_size"] = tok_inter
            if tok_heads != kw.get("encoder_num_attention_heads", kw["num_attention_heads"]):
                kw["tokenizer_num_attention_heads"] = tok_heads
            kw["fsq_dim"] = shape("tokenizer.quantizer.project_in.weight")[1]
            kw["pool_window_size"] = shape("detokenizer.special_tokens")[1]
        return cls(**kw)
