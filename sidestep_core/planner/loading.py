"""Load the planner LM from every layout a user has, as a transformers ``Qwen3ForCausalLM`` plus its tokenizer.

* original folder ``acestep-5Hz-lm-{0.6B,1.7B,4B}/``: ``config.json``, ``model.safetensors`` (or shards) and the
  tokenizer files, whose added tokens include ``<|audio_code_N|>``;
* ComfyUI ``qwen_1.7b_ace15.safetensors`` / ``qwen_4b_ace15.safetensors`` (``model.*``): no tokenizer inside;
  ComfyUI tokenizes with its Qwen tokenizer (``comfy/text_encoders/qwen25_tokenizer``) and puts code N at id
  151,669 + N, which is what this module does with that tokenizer;
* a ComfyUI all-in-one checkpoint holding the LM under ``text_encoders.qwen3_{2b,4b}.transformer.``.

An LM is told apart from the 0.6B text encoder (same architecture) by its embedding table, which has rows for the
audio codes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ..text.encoder import (
    TextEncoderError,
    folder_weight_files,
    hf_tokenizer,
    is_tokenizer_dir,
    qwen3_config_from_shapes,
)
from . import vocab as V

LAYOUT_ORIGINAL = "original"
LAYOUT_COMFY = "comfyui"
LAYOUT_AIO = "comfyui-aio"
# Released sizes by hidden width (Qwen3-0.6B / 1.7B / 4B).
SIZES = {1024: "0.6B", 2048: "1.7B", 2560: "4B"}
ORIGINAL_FOLDERS = tuple(f"acestep-5Hz-lm-{s}" for s in ("1.7B", "0.6B", "4B"))
COMFY_FILES = ("qwen_1.7b_ace15.safetensors", "qwen_4b_ace15.safetensors")
AIO_PREFIXES = ("text_encoders.qwen3_2b.transformer.", "text_encoders.qwen3_4b.transformer.")
TOKENIZER_FOLDER = "lm_tokenizer"  # where the tiny generator puts a tokenizer beside ComfyUI files
_ANCHOR = "model.layers.0.input_layernorm.weight"
_EMBED = "model.embed_tokens.weight"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json")

WHERE_TO_PUT = (
    "put the LM folder acestep-5Hz-lm-1.7B (or -0.6B / -4B, from the ACE-Step/Ace-Step1.5 download) beside the DiT "
    "folder, or ComfyUI's qwen_1.7b_ace15.safetensors (or qwen_4b_ace15.safetensors) in ComfyUI's "
    "models/text_encoders/, or pass its path"
)


class PlannerError(ValueError):
    """A planner LM or tokenizer that cannot be found or used; the message starts with the path."""


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------


class PlannerTokenizer:
    """Text ↔ ids for the LM, with audio codes as ids ``code_offset + code``.

    With an LM's own tokenizer the ``<|audio_code_N|>`` strings are tokens of it; ComfyUI's Qwen tokenizer has none,
    so codes never go through the text tokenizer here: prompts are built as text pieces and code ids.
    """

    def __init__(self, hf_tokenizer, source: Path, code_offset: int, codebook_size: int, has_code_tokens: bool):
        self._tok = hf_tokenizer
        self.source = source
        self.code_offset = code_offset
        self.codebook_size = codebook_size
        self.has_code_tokens = has_code_tokens

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with nothing added (Qwen tokenizers add no BOS)."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def token_id(self, token: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise PlannerError(f"{self.source}: the LM tokenizer has no single token for {token!r}")
        return ids[0]

    def is_code(self, token_id: int) -> bool:
        return self.code_offset <= token_id < self.code_offset + self.codebook_size

    def code_ids(self, codes: Iterable[int]) -> list[int]:
        out = []
        for c in codes:
            c = int(c)
            if not 0 <= c < self.codebook_size:
                raise PlannerError(f"{self.source}: audio code {c} is outside the LM's codebook (0 … "
                                   f"{self.codebook_size - 1})")
            out.append(self.code_offset + c)
        return out

    def codes_from_ids(self, ids: Iterable[int]) -> list[int]:
        return [int(i) - self.code_offset for i in ids if self.is_code(int(i))]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, codes written ``<|audio_code_N|>`` whichever tokenizer this is."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if self.is_code(i):
                if run:
                    out.append(self._tok.decode(run, skip_special_tokens=False))
                    run = []
                out.append(V.code_token(i - self.code_offset))
            else:
                run.append(i)
        if run:
            out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def identity(self) -> str:
        h = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            p = self.source / name
            if p.is_file():
                h.update(name.encode() + p.read_bytes())
        h.update(f"{self.code_offset}:{self.codebook_size}".encode())
        return h.hexdigest()[:16]


def load_planner_tokenizer(path: str | Path) -> PlannerTokenizer:
    """An LM's own tokenizer folder (codes as added tokens) or ComfyUI's Qwen tokenizer (codes at 151,669 + N)."""
    path = Path(path).expanduser()
    try:
        tok = hf_tokenizer(path)
    except TextEncoderError as exc:  # same message (it starts with the path), in the planner's error class
        raise PlannerError(str(exc)) from exc
    offset = tok.convert_tokens_to_ids(V.code_token(0))
    has_codes = isinstance(offset, int) and offset != tok.unk_token_id and offset is not None
    if has_codes:
        size = 0
        while tok.convert_tokens_to_ids(V.code_token(size)) == offset + size:
            size += 1
        last = tok.convert_tokens_to_ids(V.code_token(size))
        if isinstance(last, int) and last not in (None, tok.unk_token_id):
            raise PlannerError(f"{path}: the audio-code tokens are not consecutive ids (code {size} breaks the run)")
    else:
        offset, size = V.AUDIO_CODE_OFFSET, V.CODEBOOK_SIZE
        if len(tok) > offset:
            raise PlannerError(f"{path}: this tokenizer has no <|audio_code_N|> tokens and more than {offset} "
                               "tokens, so audio codes cannot be placed after its text vocabulary")
    wrapped = PlannerTokenizer(tok, path, int(offset), size, has_codes)
    for t in (V.IM_START, V.IM_END, V.ENDOFTEXT):
        wrapped.token_id(t)
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Planner:
    """A loaded planner LM: the transformers model, its tokenizer and where it came from."""

    model: "torch.nn.Module"  # transformers Qwen3ForCausalLM, eval, no grad
    tokenizer: PlannerTokenizer
    path: Path
    layout: str  # LAYOUT_ORIGINAL | LAYOUT_COMFY | LAYOUT_AIO
    size: str  # "0.6B" | "1.7B" | "4B" | "hidden-<H>" for other widths (the tiny model)
    identity: str = ""  # content identity of the weight files (:func:`planner_identity`)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def vocab_rows(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def describe(self) -> str:
        return f"{self.size} planner LM {self.path.name} ({self.layout})"


def size_name(hidden: int) -> str:
    return SIZES.get(hidden, f"hidden-{hidden}")


def planner_identity(path: str | Path) -> str:
    """The LM's content identity, made as the DiT's (headers, sizes and sampled bytes of its weight files; see
    :func:`~sidestep_core.model.loading.weights_identity`): another LM file of the same name and size differs."""
    from ..model.loading import weights_identity

    return weights_identity(planner_architecture(path).files)


def _header_shapes(files: Sequence[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    from ..model.loading import read_header, tensor_shapes

    shapes, where = {}, {}
    for f in files:
        try:
            s = tensor_shapes(read_header(f))
        except ValueError as exc:
            raise PlannerError(str(exc)) from exc
        shapes.update(s)
        where.update(dict.fromkeys(s, f))
    return shapes, where


def _lm_prefix(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """The prefix before ``model.layers.0…`` of the one LM among ``shapes`` (text encoders have no code rows)."""
    found = []
    for key in shapes:
        if key.endswith(_ANCHOR):
            prefix = key[: -len(_ANCHOR)]
            rows = shapes.get(prefix + _EMBED, (0,))[0]
            if rows > V.AUDIO_CODE_OFFSET:
                found.append(prefix)
    if not found:
        raise PlannerError(f"{path}: no 5 Hz planner LM in this file (a Qwen3 model whose vocabulary includes the "
                           f"audio codes); the 0.6B text encoder is not the LM. {WHERE_TO_PUT}")
    if len(found) > 1:
        raise PlannerError(f"{path}: several LMs in one file ({', '.join(found)}); pass a single-LM file")
    return found[0]


def _config_from_shapes(shapes: dict[str, tuple[int, ...]]):
    """The LM's config read off its shapes, as for the text encoder, with the LM's context length."""
    return qwen3_config_from_shapes(shapes, prefix="model.", max_position_embeddings=40960,
                                    tie_word_embeddings="lm_head.weight" not in shapes)


def _comfy_tokenizer_dirs() -> list[Path]:
    from ..text.encoder import COMFY_TOKENIZER_SUBDIR, _comfy_roots

    return [root / COMFY_TOKENIZER_SUBDIR for root in _comfy_roots()]


def find_planner_tokenizer(lm_path: Path, explicit: Optional[str | Path] = None) -> Path:
    """The tokenizer for an LM: ``explicit``; the LM folder itself; an LM folder or ``lm_tokenizer/`` beside a
    ComfyUI file (up to three levels up); ComfyUI's own Qwen tokenizer (the running ComfyUI, $COMFYUI_DIR)."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not is_tokenizer_dir(p):
            raise PlannerError(f"{p}: not a tokenizer folder (needs tokenizer.json, or vocab.json + merges.txt)")
        return p
    if lm_path.is_dir() and is_tokenizer_dir(lm_path):
        return lm_path
    searched = []
    start = lm_path if lm_path.is_dir() else lm_path.parent
    for folder in [start, *list(start.parents)[:3]]:
        for name in (TOKENIZER_FOLDER, *ORIGINAL_FOLDERS):
            cand = folder / name
            if is_tokenizer_dir(cand):
                return cand
            searched.append(str(cand))
    beside_comfy = (p / "comfy" / "text_encoders" / "qwen25_tokenizer" for p in start.parents)
    for root in [*beside_comfy, *_comfy_tokenizer_dirs()]:
        if is_tokenizer_dir(root):
            return root
    raise PlannerError(
        f"{lm_path}: no tokenizer for the planner LM. ComfyUI's LM files carry none; pass --lm-tokenizer with an "
        f"acestep-5Hz-lm-* folder (or ComfyUI's comfy/text_encoders/qwen25_tokenizer), or set COMFYUI_DIR. "
        f"Searched: {', '.join(searched[:6])}"
    )


@dataclass
class PlannerArchitecture:
    """What the headers of an LM's files say (no tensor data read): its files, layout and transformers config, and
    each tensor's shape under its causal-LM name (``names`` maps that name to the file's key, ``where`` the key to
    its file)."""

    path: Path
    files: list[Path]
    layout: str
    config: "Any"  # transformers Qwen3Config
    names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    where: dict[str, Path]


def planner_architecture(path: str | Path) -> PlannerArchitecture:
    """The LM at ``path`` (as :func:`load_planner` takes it) read from its headers and config only."""
    from transformers import Qwen3Config

    path = Path(path).expanduser()
    if not path.exists():
        raise PlannerError(f"{path}: no such file or folder; {WHERE_TO_PUT}")
    if path.is_dir() and not ((path / "config.json").is_file() and is_tokenizer_dir(path)):
        path = find_planner(path)  # a checkpoint or DiT folder: the LM beside it
    if path.is_dir():
        files = folder_weight_files(path, PlannerError, "planner LM folder", WHERE_TO_PUT)
        layout = LAYOUT_ORIGINAL
    else:
        files, layout = [path], LAYOUT_COMFY
    shapes_all, where = _header_shapes(files)
    prefix = _lm_prefix(shapes_all, path)
    if prefix:
        layout = LAYOUT_AIO
    names = {k[len(prefix):]: k for k in shapes_all if k.startswith(prefix)}
    shapes = {n: shapes_all[k] for n, k in names.items()}
    try:
        config = (Qwen3Config.from_pretrained(str(path)) if layout == LAYOUT_ORIGINAL
                  else _config_from_shapes(shapes))
    except KeyError as exc:
        raise PlannerError(f"{path}: cannot infer the LM architecture ({exc} missing)") from exc
    config._attn_implementation = "sdpa"
    return PlannerArchitecture(path, files, layout, config, names, shapes, where)


def load_planner(
    path: str | Path,
    *,
    tokenizer: Optional[str | Path] = None,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
) -> Planner:
    """The LM at ``path`` (an ``acestep-5Hz-lm-*`` folder, a ComfyUI LM file or an all-in-one checkpoint, or a
    checkpoint folder to search with :func:`find_planner`). ``dtype`` None → float32."""
    from transformers import Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    arch = planner_architecture(path)
    path, files, layout, config = arch.path, arch.files, arch.layout, arch.config
    names, shapes, where = arch.names, arch.shapes, arch.where
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    needed = {k for k in expected if not (tied and k == "lm_head.weight")}
    missing = sorted(needed - set(shapes))
    wrong = [k for k in needed if k in shapes and tuple(shapes[k]) != expected[k]]
    if missing or wrong:
        raise PlannerError(f"{path}: LM weights do not match a Qwen3 causal LM (missing {missing[:4]}, wrong shapes "
                           f"{wrong[:4]})")
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in needed:
        by_file.setdefault(where[names[n]], []).append(n)
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for n in keys:
                    state[n] = fh.get_tensor(names[n]).to(device=device, dtype=dtype or torch.float32)
        except Exception as exc:
            raise PlannerError(f"{f}: cannot read tensors ({exc})") from exc
    model.load_state_dict(state, assign=True, strict=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = Qwen3RotaryEmbedding(config=config).to(device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise PlannerError(f"{path}: LM tensor {name} was not loaded")
    tok = load_planner_tokenizer(find_planner_tokenizer(path, tokenizer))
    rows = shapes[_EMBED][0]
    if tok.code_offset + tok.codebook_size > rows:
        raise PlannerError(
            f"{tok.source}: the tokenizer's audio codes (ids {tok.code_offset} … "
            f"{tok.code_offset + tok.codebook_size - 1}) do not fit the LM's {rows}-token vocabulary; this tokenizer "
            "does not belong to this LM")
    from ..model.loading import weights_identity

    return Planner(model.eval().requires_grad_(False), tok, path, layout, size_name(config.hidden_size),
                   weights_identity(files))


def find_planner(where: str | Path) -> Path:
    """The LM belonging to a checkpoint: ``where`` itself when it is an LM, an ``acestep-5Hz-lm-*`` folder in or
    beside it, ComfyUI's ``models/text_encoders/qwen_{1.7b,4b}_ace15.safetensors`` (also ``models/clip``), or the
    LM inside an all-in-one file. Raises with where to put one."""
    from ..model.loading import read_header

    p = Path(where).expanduser()
    candidates: list[Path] = []
    if p.is_file():
        candidates.append(p)
        models = p.parent.parent
        candidates += [models / sub / n for sub in ("text_encoders", "clip") for n in COMFY_FILES]
    elif p.is_dir():
        if (p / "config.json").is_file() and (p / "tokenizer.json").is_file():
            candidates.append(p)
        for base in (p, p.parent, p.parent.parent):
            candidates += [base / n for n in ORIGINAL_FOLDERS]
            candidates += [base / "models" / sub / n for sub in ("text_encoders", "clip") for n in COMFY_FILES]
    for c in candidates:
        if c.is_dir() and (c / "config.json").is_file():
            return c
        if c.is_file():
            try:
                header = read_header(c)
            except ValueError:
                continue
            shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
            try:
                _lm_prefix(shapes, c)
            except PlannerError:
                continue
            return c
    raise PlannerError(f"{p}: no 5 Hz planner LM found; {WHERE_TO_PUT}")
