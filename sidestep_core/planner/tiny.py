"""A tiny deterministic planner LM in the real layouts (tests and the demo).

* ``original``: ``acestep-5Hz-lm-1.7B/`` with transformers ``config.json`` (``Qwen3ForCausalLM``), ``model.safetensors``
  (tied embeddings, so no ``lm_head``) and a tokenizer whose ids follow the real layout: a small byte-level BPE
  vocabulary, placeholders up to 151,642, Qwen3's 26 added tokens at 151,643 … 151,668 and the 64,000
  ``<|audio_code_N|>`` tokens after them (see :mod:`.vocab`), plus a Qwen3-style chat template.
* ``comfyui-split``: ``models/text_encoders/qwen_1.7b_ace15.safetensors`` holding ``model.*`` as ComfyUI's
  ``Qwen3_2B_ACE15_lm`` names them; ComfyUI tokenizes with its own Qwen tokenizer, so the tiny tokenizer is written
  beside under ``lm_tokenizer/`` for headless tools.
* inside a ComfyUI all-in-one checkpoint: under ``text_encoders.qwen3_2b.transformer.model.*``.

Only the widths are tiny: the embedding table has the real 217,204 rows, so real token ids (ComfyUI's tokenizer,
audio codes at 151,669) index it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..tiny.components import QWEN3_SETTINGS
from ..tiny.weights import bf16_exact, seeded_state_dict
from . import vocab as V

ORIGINAL_FOLDER = "acestep-5Hz-lm-1.7B"
COMFY_FILE = "qwen_1.7b_ace15.safetensors"
COMFY_AIO_PREFIX = "text_encoders.qwen3_2b.transformer."
TOKENIZER_FOLDER = "lm_tokenizer"
_SEED_OFFSET = 3  # the DiT, text encoder and VAE use seed + 0 … 2

# Text the tiny BPE merges are learnt from, so prompts tokenize into a few dozen ids on every machine.
_CORPUS = [
    "system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n",
    "Understand the given musical conditions and describe the audio semantics accordingly:\n\n",
    "Format the user's input into a more detailed and specific musical description:\n\n",
    "user\n# Caption\n{caption}\n\n# Lyric\n[verse]\n[chorus]\n[Instrumental]\n",
    "assistant\n\nbpm: 120\ncaption: calm piano\nduration: 30\nkeyscale: C major\nlanguage: en\ntimesignature: 4\n",
    "genres: pop rock\nF# minor\nB♭ major\nunknown\nN/A\n",
    "upbeat electronic dance track with synth bass, punchy drums and bright female vocals",
    "slow acoustic folk ballad, fingerpicked guitar, warm male voice, soft piano, melancholic",
    "the quick brown fox jumps over the lazy dog 0123456789",
]

# Qwen3's chat template reduced to what the ACE-Step prompts use (no tools): an assistant turn after the last user
# turn renders its reasoning as "<think>\n…\n</think>\n\n" before the answer.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last or reasoning %}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}
# ComfyUI builds its 1.7B LM (Qwen3_2B_ACE15_lm) with fixed sizes, so the smallest LM it loads is full size; layers
# from RANDOM_LAYERS on get zero projections (identities), which keeps it cheap to make and exact to run.
COMFYUI_MIN_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
RANDOM_LAYERS = 2
SHAPES = {"tiny": TINY_SHAPE, "comfyui-min": COMFYUI_MIN_SHAPE}


def planner_config(shape: str = "tiny") -> dict:
    """``shape``: ``tiny``, or ``comfyui-min`` (the 1.7B's sizes, for a real ComfyUI)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown planner shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **SHAPES[shape],
        "max_position_embeddings": 40960,
        **QWEN3_SETTINGS,
        "vocab_size": V.LM_VOCAB_ROWS,
        "bos_token_id": V.FIRST_ADDED_ID,
        "eos_token_id": V.FIRST_ADDED_ID + 2,
        "torch_dtype": "bfloat16",
    }


def planner_shapes(shape: str = "tiny") -> dict[str, tuple[int, ...]]:
    """Tensor shapes in transformers ``Qwen3ForCausalLM`` names, without the tied ``lm_head``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = {k: v for k, v in planner_config(shape).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _identity_projection(key: str) -> bool:
    parts = key.split(".")  # model.layers.N.<self_attn|mlp>.<x>_proj.weight
    return (parts[1] == "layers" and int(parts[2]) >= RANDOM_LAYERS and parts[-2].endswith("_proj"))


def planner_state(seed: int = 0, shape: str = "tiny") -> dict[str, torch.Tensor]:
    """Seeded weights, bf16-exact; for ``comfyui-min`` the layers past the first two are identities."""
    shapes = planner_shapes(shape)
    zero = {k for k in shapes if shape != "tiny" and _identity_projection(k)}
    state = bf16_exact(seeded_state_dict(seed + _SEED_OFFSET, {k: v for k, v in shapes.items() if k not in zero}))
    state.update({k: torch.zeros(shapes[k], dtype=torch.bfloat16) for k in zero})  # written as bf16 anyway
    return state


def build_planner_tokenizer():
    """The tiny tokenizer (a ``tokenizers.Tokenizer``) with the real id layout."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    small.train_from_iterator(_CORPUS * 4, trainer=trainer)
    learnt = json.loads(small.to_str())["model"]
    vocab = dict(learnt["vocab"])
    # Unreachable placeholders pad the BPE vocabulary so the added tokens land on their real ids.
    vocab.update({f"<|tiny_unused_{i}|>": i for i in range(len(vocab), V.FIRST_ADDED_ID)})
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t in V.QWEN3_ADDED_TOKENS[:V.QWEN3_SPECIAL_COUNT]]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in V.QWEN3_ADDED_TOKENS[V.QWEN3_SPECIAL_COUNT:]])
    tok.add_tokens([AddedToken(V.code_token(n), special=False, normalized=False) for n in range(V.CODEBOOK_SIZE)])
    if tok.token_to_id(V.code_token(0)) != V.AUDIO_CODE_OFFSET:
        raise AssertionError("tiny planner tokenizer: audio codes are not at their real ids")
    return tok


def write_planner_tokenizer(folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and added_tokens.json, as a released LM has."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_planner_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    first = V.FIRST_ADDED_ID
    decoder = {
        str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": i < V.QWEN3_SPECIAL_COUNT}
        for i, t in enumerate(V.QWEN3_ADDED_TOKENS)
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": V.IM_END,
        "pad_token": V.ENDOFTEXT,
        "model_max_length": 40960,
        "padding_side": "right",
        "split_special_tokens": False,
        "added_tokens_decoder": decoder,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    added = {t: first + i for i, t in enumerate(V.QWEN3_ADDED_TOKENS)}
    added.update({V.code_token(n): V.AUDIO_CODE_OFFSET + n for n in range(V.CODEBOOK_SIZE)})
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=0))


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def planner_state_to_comfy(state: dict[str, torch.Tensor], *, aio: bool = False) -> dict[str, torch.Tensor]:
    """transformers names → ComfyUI's (``model.*``; ``aio`` adds the all-in-one prefix). A tied ``lm_head`` is
    dropped: ComfyUI's ACE-Step LM has none and computes logits from the embedding table."""
    prefix = COMFY_AIO_PREFIX if aio else ""
    return {prefix + k: v for k, v in state.items() if k != "lm_head.weight"}


def make_tiny_planner(root: str | Path, layout: str = "original", seed: int = 0, shape: str = "tiny") -> Path:
    """Writes the tiny LM under ``root`` in ``layout`` (``original`` or ``comfyui-split``) and returns its path
    (the folder, or the safetensors file). The all-in-one layout is written by the checkpoint writer."""
    from ..fsutil import atomic_save_file, atomic_write_json

    root = Path(root).expanduser()
    state = planner_state(seed, shape)
    if layout == "original":
        folder = root / ORIGINAL_FOLDER
        write_planner_tokenizer(folder)
        atomic_write_json(folder / "config.json", planner_config(shape))
        atomic_save_file(_bf16(state), folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    if layout == "comfyui-split":
        path = root / "models" / "text_encoders" / COMFY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(_bf16(planner_state_to_comfy(state)), path)
        write_planner_tokenizer(root / TOKENIZER_FOLDER)
        return path
    raise ValueError(f"unknown planner layout {layout!r}; choose original or comfyui-split")
