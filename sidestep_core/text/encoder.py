"""The Qwen3 text encoder (Qwen3-Embedding-0.6B) and its tokenizer, from every layout a user has.

* original folder ``Qwen3-Embedding-0.6B/``: transformers ``config.json`` + ``model.safetensors`` (Qwen3Model
  names without a ``model.`` prefix) + ``tokenizer.json``;
* ComfyUI ``qwen_0.6b_ace15.safetensors``: the same tensors under ``model.``;
* ComfyUI all-in-one checkpoint: under ``text_encoders.qwen3_06b.transformer.model.`` (ComfyUI's
  ``ACE15TEModel.qwen3_06b`` → ``SDClipModel.transformer`` → ``Llama2_`` at ``.model``).

ComfyUI files carry no tokenizer; one is taken from the original folder, from a ComfyUI installation
(``comfy/text_encoders/qwen25_tokenizer``, the vocabulary ComfyUI itself tokenizes ACE-Step prompts with) or
from a path the user gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

COMFY_TE_PREFIX = "model."  # qwen_0.6b_ace15.safetensors
COMFY_AIO_TE_PREFIX = "text_encoders.qwen3_06b.transformer."  # + COMFY_TE_PREFIX inside an all-in-one file
COMFY_TE_NAMES = ("qwen_0.6b_ace15.safetensors",)
ORIGINAL_TE_FOLDER = "Qwen3-Embedding-0.6B"
COMFY_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
ENDOFTEXT = "<|endoftext|>"
_ANCHOR = "layers.0.input_layernorm.weight"


class TextEncoderError(ValueError):
    """A text encoder or tokenizer that cannot be found or used; the message starts with the path."""


# ----------------------------------------------------------------------------------------------------------
# key mapping
# ----------------------------------------------------------------------------------------------------------


def qwen_state_dict_to_comfy(sd: Mapping[str, torch.Tensor], *, aio: bool = False) -> dict[str, torch.Tensor]:
    """transformers ``Qwen3Model`` names -> the names in ComfyUI's ``qwen_0.6b_ace15.safetensors`` (``model.*``).

    ``aio=True`` gives the full all-in-one names (``text_encoders.qwen3_06b.transformer.model.*``). Names that
    already carry ``model.`` (a ``Qwen3ForCausalLM`` dump) are accepted; an ``lm_head`` is dropped, since
    ComfyUI's 0.6B ACE-Step encoder has none.
    """
    prefix = (COMFY_AIO_TE_PREFIX if aio else "") + COMFY_TE_PREFIX
    out = {}
    for key, value in sd.items():
        if key.startswith("lm_head."):
            continue
        out[prefix + key.removeprefix("model.")] = value
    return out


def _te_prefix(keys: Iterable[str]) -> str:
    """The prefix in front of ``layers.0.input_layernorm.weight`` of the 0.6B encoder among ``keys``."""
    prefixes = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)}, key=len)
    if not prefixes:
        raise KeyError("no Qwen3 text encoder ('layers.0.input_layernorm.weight') found")
    if len(prefixes) == 1:
        return prefixes[0]
    # All-in-one files may also hold the 5 Hz LM (qwen3_2b / qwen3_4b); the condition encoder needs the 0.6B.
    small = [p for p in prefixes if "qwen3_06b" in p]
    if len(small) == 1:
        return small[0]
    raise KeyError(f"several text encoders found ({', '.join(p or '<none>' for p in prefixes)})")


def qwen_state_dict_from_comfy(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI names (split file ``model.*`` or AIO ``text_encoders.qwen3_06b.transformer.model.*``) -> transformers
    ``Qwen3Model`` names. Keys outside the 0.6B encoder (DiT, VAE, LM) are ignored."""
    prefix = _te_prefix(sd.keys())
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("lm_head.weight")}


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------


def qwen3_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "", **fixed):
    """A ``Qwen3Config`` read off tensor shapes (transformers names below ``prefix``). Counts shapes cannot reveal use
    the Qwen3 values (θ 1e6, RMS eps 1e-6), which ComfyUI hard-codes too; ``fixed`` overrides or adds fields."""
    from transformers import Qwen3Config

    vocab, hidden = shapes[f"{prefix}embed_tokens.weight"]
    layer0 = f"{prefix}layers.0."
    head_dim = shapes[f"{layer0}self_attn.q_norm.weight"][0]
    depth = prefix.count(".") + 1  # the layer index's place in a key
    layers = 1 + max(int(k.split(".")[depth]) for k in shapes if k.startswith(f"{prefix}layers."))
    return Qwen3Config(**{
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[f"{layer0}mlp.gate_proj.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": shapes[f"{layer0}self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes[f"{layer0}self_attn.k_proj.weight"][0] // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
        "attention_bias": f"{layer0}self_attn.q_proj.bias" in shapes,
        **fixed,
    })


def _read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as exc:
        raise TextEncoderError(f"{path}: cannot read tensors ({exc})") from exc


def folder_weight_files(folder: Path, error: type[Exception], what: str, hint: str = "") -> list[Path]:
    """A transformers model folder's safetensors files: the shards its ``model.safetensors.index.json`` names, else
    ``model.safetensors``. A bad index or a missing file raises ``error`` naming it (``what``: the kind of folder)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise error(f"{index}: unreadable shard index ({exc})") from exc
        files = [folder / n for n in names]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise error(f"{folder}: not a {what} ({f.name} missing)" + (f"; {hint}" if hint else ""))
    return files


def _te_files(path: Path) -> tuple[list[Path], Optional[Path]]:
    """The safetensors files and config.json of a text encoder folder or file."""
    if path.is_dir():
        files = folder_weight_files(path, TextEncoderError, "text encoder folder")
        cfg = path / "config.json"
        return files, cfg if cfg.is_file() else None
    if path.is_file():
        return [path], None
    raise TextEncoderError(f"{path}: no such file or folder")


def load_text_encoder(
    path: str | Path, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu"
):
    """A transformers ``Qwen3Model`` (eval, no grad) from a Qwen3-Embedding folder, ComfyUI file or AIO checkpoint.

    Only the 0.6B encoder's tensors are read from the file. ``dtype`` None → float32.
    """
    from transformers import Qwen3Config, Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from ..model.loading import read_header, tensor_shapes

    path = Path(path).expanduser()
    files, cfg_path = _te_files(path)
    key_file: dict[str, Path] = {}
    shapes_all: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            shapes = tensor_shapes(read_header(f))
        except ValueError as exc:
            raise TextEncoderError(str(exc)) from exc
        shapes_all.update(shapes)
        key_file.update({k: f for k in shapes})
    try:
        prefix = _te_prefix(shapes_all)
    except KeyError as exc:
        raise TextEncoderError(f"{path}: {exc.args[0]}") from exc
    names = {k[len(prefix):]: k for k in shapes_all if k.startswith(prefix) and not k.endswith("lm_head.weight")}
    shapes = {n: shapes_all[k] for n, k in names.items()}
    if cfg_path is not None:
        config = Qwen3Config.from_pretrained(str(path))
    else:
        try:
            config = qwen3_config_from_shapes(shapes)
        except KeyError as exc:
            raise TextEncoderError(f"{path}: cannot infer the text encoder architecture ({exc} missing)") from exc
    config._attn_implementation = "sdpa"

    with torch.device("meta"):
        model = Qwen3Model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if missing or wrong:
        raise TextEncoderError(
            f"{path}: text encoder weights do not match a Qwen3 model (missing {missing[:4]}, wrong shapes {wrong[:4]})"
        )
    state = {}
    by_file: dict[Path, list[str]] = {}
    for n in expected:
        by_file.setdefault(key_file[names[n]], []).append(names[n])
    for f, keys in by_file.items():
        for full, t in _read_tensors(f, keys).items():
            state[full[len(prefix):]] = t.to(device=device, dtype=dtype or torch.float32)
    model.load_state_dict(state, assign=True, strict=True)
    # The rotary table is a non-persistent buffer: rebuild it on the real device.
    model.rotary_emb = Qwen3RotaryEmbedding(config=config).to(device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise TextEncoderError(f"{path}: text encoder tensor {name} was not loaded")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A thin wrapper: plain ``encode`` (no special tokens added) and the ids of named tokens."""

    def __init__(self, hf_tokenizer, source: Path):
        self._tok = hf_tokenizer
        self.source = source

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def token_id(self, token: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise TextEncoderError(f"{self.source}: tokenizer has no single token for {token!r}")
        return ids[0]

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def identity(self) -> str:
        """Hash of the tokenizer files, part of every cache key."""
        h = hashlib.sha256()
        for name in sorted(_TOKENIZER_FILES):
            p = self.source / name
            if p.is_file():
                h.update(name.encode() + p.read_bytes())
        return h.hexdigest()[:16]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                    "special_tokens_map.json")


def is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    )


def hf_tokenizer(path: str | Path):
    """The transformers tokenizer in a folder: ``tokenizer.json``, else ComfyUI's ``qwen25_tokenizer`` layout
    (``vocab.json`` + ``merges.txt``). Shared by the text encoder and the planner LM; raises TextEncoderError."""
    path = Path(path).expanduser()
    if not is_tokenizer_dir(path):
        raise TextEncoderError(f"{path}: not a tokenizer folder (needs tokenizer.json, or vocab.json + merges.txt)")
    try:
        if (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        from transformers import Qwen2Tokenizer  # ComfyUI's qwen25_tokenizer: BPE vocabulary and merges only

        return Qwen2Tokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many kinds on broken files
        raise TextEncoderError(f"{path}: cannot load tokenizer ({exc})") from exc


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path).expanduser()
    wrapped = Tokenizer(hf_tokenizer(path), path)
    wrapped.token_id(ENDOFTEXT)  # every ACE-Step prompt needs it as a single token
    return wrapped


def _comfy_roots() -> list[Path]:
    """ComfyUI installations this process can see: an imported ``comfy`` package, then $COMFYUI_DIR/$COMFYUI_PATH."""
    roots = []
    mod = sys.modules.get("comfy")
    if mod is not None:
        # ComfyUI's ``comfy`` is a namespace package (``__file__`` None): its folders are in ``__path__``.
        for entry in [mod.__file__] if getattr(mod, "__file__", None) else list(getattr(mod, "__path__", [])):
            p = Path(entry).resolve()
            roots.append(p.parent.parent if p.name == "__init__.py" else p.parent)
    for var in ("COMFYUI_DIR", "COMFYUI_PATH"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]).expanduser())
    # Installed as a custom node: <ComfyUI>/custom_nodes/<pack>/sidestep_core/text/encoder.py
    here = Path(__file__).resolve().parents
    if len(here) > 4:
        roots.append(here[4])
    return roots


def find_tokenizer(
    explicit: Optional[str | Path] = None, *, text_encoder: Optional[Path] = None, near: Optional[Path] = None
) -> Path:
    """The tokenizer folder to use, in this order: ``explicit``; the text encoder's own folder; a
    ``Qwen3-Embedding-0.6B`` or ``tokenizer`` folder beside ``near`` or up to three levels above it; a ComfyUI
    installation (above ``near``, the running ComfyUI, $COMFYUI_DIR). Raises with what was searched."""
    searched: list[str] = []
    if explicit is not None:
        p = Path(explicit).expanduser()
        if is_tokenizer_dir(p):
            return p
        raise TextEncoderError(f"{p}: not a tokenizer folder (needs tokenizer.json, or vocab.json + merges.txt)")
    if text_encoder is not None and text_encoder.is_dir():
        if is_tokenizer_dir(text_encoder):
            return text_encoder
        searched.append(str(text_encoder))
    ancestors: list[Path] = []
    if near is not None:
        start = near if near.is_dir() else near.parent
        ancestors = [start, *list(start.parents)[:3]]
        for a in ancestors:
            for name in (ORIGINAL_TE_FOLDER, "tokenizer"):
                cand = a / name
                if is_tokenizer_dir(cand):
                    return cand
                searched.append(str(cand))
    for root in [*list(near.resolve().parents if near else []), *_comfy_roots()]:
        cand = root / COMFY_TOKENIZER_SUBDIR
        if is_tokenizer_dir(cand):
            return cand
    searched.append(f"<ComfyUI>/{COMFY_TOKENIZER_SUBDIR.as_posix()} (no ComfyUI installation found)")
    where = near or text_encoder or Path(".")
    raise TextEncoderError(
        f"{where}: no tokenizer found for the Qwen3 text encoder. ComfyUI files carry none; pass --tokenizer with a "
        f"Qwen3-Embedding-0.6B folder (or ComfyUI's comfy/text_encoders/qwen25_tokenizer), or set COMFYUI_DIR. "
        f"Searched: {', '.join(searched[:8])}"
    )


# ----------------------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TextEncoder:
    """The loaded Qwen3 model and tokenizer, used the way ACE-Step inference uses them."""

    model: "torch.nn.Module"
    tokenizer: Tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.embed_tokens.weight.shape[1]

    @torch.no_grad()
    def encode_caption(self, ids: list[int]) -> torch.Tensor:
        """Caption branch: the full forward, last hidden state (after the final norm) [L, H] float32.

        Called with input ids only, as upstream inference does; there is no padding, so a mask would not matter.
        """
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(input_ids=x).last_hidden_state[0].float().cpu()

    @torch.no_grad()
    def embed_lyrics(self, ids: list[int]) -> torch.Tensor:
        """Lyric branch: the token-embedding table only [L, H] float32 (no transformer layers)."""
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model.embed_tokens(x).float().cpu()

    def check_ids(self, ids: list[int], what: str) -> None:
        rows = self.model.embed_tokens.weight.shape[0]
        bad = [i for i in ids if i >= rows]
        if bad:
            raise TextEncoderError(
                f"{self.tokenizer.source}: {what} token id {bad[0]} is outside the text encoder's vocabulary "
                f"({rows}); the tokenizer does not belong to this text encoder"
            )


# ----------------------------------------------------------------------------------------------------------
# finding the text encoder that belongs to a checkpoint
# ----------------------------------------------------------------------------------------------------------


def _is_te_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    )


def find_text_encoder(checkpoint: str | Path) -> Path:
    """The 0.6B text encoder of a checkpoint: the AIO file itself, ``Qwen3-Embedding-0.6B/`` beside the DiT
    folder, or ComfyUI's ``models/text_encoders/qwen_0.6b_ace15.safetensors`` (also under ``models/clip``)."""
    from ..model.loading import read_header

    ckpt = Path(checkpoint).expanduser()
    if ckpt.is_file():
        keys = [k for k in read_header(ckpt) if k != "__metadata__"]
        if any(k.startswith("text_encoders.") and k.endswith(_ANCHOR) for k in keys):
            return ckpt
        models = ckpt.parent.parent
        for folder in (models / "text_encoders", models / "clip", ckpt.parent / "text_encoders"):
            for name in COMFY_TE_NAMES:
                if (folder / name).is_file():
                    return folder / name
    else:
        for folder in (ckpt / ORIGINAL_TE_FOLDER, ckpt.parent / ORIGINAL_TE_FOLDER,
                       ckpt.parent.parent / ORIGINAL_TE_FOLDER):
            if _is_te_folder(folder):
                return folder
    raise TextEncoderError(
        f"{ckpt}: no text encoder found beside the checkpoint; pass --text-encoder with a Qwen3-Embedding-0.6B "
        f"folder or qwen_0.6b_ace15.safetensors"
    )


def text_encoder_weight_files(path: Path) -> list[Path]:
    return _te_files(path)[0]
