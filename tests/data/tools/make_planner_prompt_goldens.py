#!/usr/bin/env python3
"""Token ids of the planner LM's prompts as upstream ACE-Step 1.5 and ComfyUI build them (goldens for
tests/test_planner_prompts.py).

Our own driver, not their code. ``--upstream-root``: imports upstream's ``acestep.llm_inference.LLMHandler``, gives
it the tiny LM's tokenizer (``sidestep make-tiny-checkpoint DIR --lm``) and calls its prompt builders
(``build_formatted_prompt``, ``build_formatted_prompt_with_cot`` with the CoT of ``_format_metadata_as_cot``, the
CFG variant, ``build_formatted_prompt_for_understanding``), tokenizing each prompt the way its PyTorch generation
path does (``llm_tokenizer(prompt)``). ``--comfyui-root``: calls ComfyUI's ``ACE15Tokenizer.tokenize_with_weights``
(the TextEncodeAceStepAudio1.5 tokenizer, with ComfyUI's own Qwen tokenizer) and keeps the ids of ``lm_prompt``
and ``lm_prompt_negative``. The cases, the text each front end built and its ids go to a JSON file with the
versions and the source commit.

Usage:

    sidestep make-tiny-checkpoint /tmp/tiny_lm --layout original --profile tiny --seed 0 --lm
    /path/to/upstream-venv/bin/python tests/data/tools/make_planner_prompt_goldens.py \
        --upstream-root /path/to/ACE-Step-1.5 --lm /tmp/tiny_lm/acestep-5Hz-lm-1.7B \
        --out tests/data/planner_prompts_upstream.json
    python tests/data/tools/make_planner_prompt_goldens.py --comfyui-root /path/to/ComfyUI \
        --out tests/data/planner_prompts_comfyui.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

LONG = ("an unhurried cinematic piece for strings and felt piano, with distant choir pads, slow swells "
        "and a hopeful ending")
CASES = [
    {"name": "full", "caption": "calm piano ballad", "lyrics": "[verse]\nla la la\n[chorus]\noh oh",
     "bpm": 120, "keyscale": "C major", "timesignature": "4", "duration": 30, "language": "en"},
    {"name": "long_unicode", "caption": LONG, "lyrics": "[Instrumental]", "bpm": None, "keyscale": "B♭ major",
     "timesignature": "3/4", "duration": 45, "language": "unknown"},
    {"name": "spaces", "caption": "  lofi hip hop \\(jazzy\\)  ", "lyrics": "[verse]\nhello world\n", "bpm": 88,
     "keyscale": "F# minor", "timesignature": "6", "duration": 12, "language": "en"},
]
UNDERSTAND_CODES = [0, 5, 123, 63999, 17]


def git_commit(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def upstream(root: Path, lm: Path, commit: str | None) -> dict:
    sys.path.insert(0, str(root))
    from transformers import AutoTokenizer

    from acestep.llm_inference import LLMHandler

    handler = LLMHandler.__new__(LLMHandler)  # only the tokenizer is needed by the prompt builders
    handler.llm_tokenizer = AutoTokenizer.from_pretrained(str(lm))

    def ids(text: str) -> list[int]:
        return handler.llm_tokenizer(text, padding=False, truncation=True)["input_ids"]

    out = []
    for case in CASES:
        meta = {k: case[k] for k in ("bpm", "caption", "duration", "keyscale", "language", "timesignature")}
        cot = handler._format_metadata_as_cot(meta)
        texts = {
            "generation": handler.build_formatted_prompt(case["caption"], case["lyrics"]),
            "codes": handler.build_formatted_prompt_with_cot(case["caption"], case["lyrics"], cot),
            "codes_negative": handler.build_formatted_prompt_with_cot(case["caption"], case["lyrics"], cot,
                                                                      is_negative_prompt=True),
        }
        out.append({**case, "cot": cot, "texts": texts, "ids": {k: ids(v) for k, v in texts.items()}})
    codes = "".join(f"<|audio_code_{c}|>" for c in UNDERSTAND_CODES)
    understand = handler.build_formatted_prompt_for_understanding(codes)
    return {
        "cases": out,
        "understand": {"codes": UNDERSTAND_CODES, "text": understand, "ids": ids(understand)},
        "provenance": {
            "source": "wbs2788/ACE-Step-1.5 acestep/llm_inference.py (LLMHandler prompt builders)",
            "commit": git_commit(root, commit),
            "tokenizer": f"tiny planner LM tokenizer ({lm.name}, sidestep make-tiny-checkpoint --lm, seed 0)",
            "transformers": version("transformers"),
            "pyyaml": version("pyyaml"),
            "driver": "tests/data/tools/make_planner_prompt_goldens.py --upstream-root",
        },
    }


def comfyui(root: Path, commit: str | None) -> dict:
    sys.path.insert(0, str(root))
    sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI reads its options on import
    import comfy.options

    comfy.options.enable_args_parsing()
    from comfy.text_encoders.ace15 import ACE15Tokenizer

    tok = ACE15Tokenizer()
    out = []
    for case in CASES:
        kwargs = {"lyrics": case["lyrics"], "duration": case["duration"], "language": case["language"],
                  "keyscale": case["keyscale"], "timesignature": case["timesignature"], "seed": 0,
                  "generate_audio_codes": True}
        if case["bpm"] is not None:
            kwargs["bpm"] = case["bpm"]
        tokens = tok.tokenize_with_weights(case["caption"], **kwargs)
        ids = {key: [int(t) for t, _ in tokens[src][0]]
               for key, src in (("codes", "lm_prompt"), ("codes_negative", "lm_prompt_negative"))}
        out.append({**case, "ids": ids})
    return {
        "cases": out,
        "provenance": {
            "source": "comfyanonymous/ComfyUI comfy/text_encoders/ace15.py (ACE15Tokenizer.tokenize_with_weights)",
            "commit": git_commit(root, commit),
            "comfyui_version": (root / "comfyui_version.py").read_text().split('"')[1]
            if (root / "comfyui_version.py").is_file() else "unknown",
            "tokenizer": "ComfyUI comfy/text_encoders/qwen25_tokenizer",
            "transformers": version("transformers"),
            "pyyaml": version("pyyaml"),
            "driver": "tests/data/tools/make_planner_prompt_goldens.py --comfyui-root",
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream-root", type=Path)
    ap.add_argument("--lm", type=Path, help="the tiny LM folder (its tokenizer), with --upstream-root")
    ap.add_argument("--comfyui-root", type=Path)
    ap.add_argument("--commit", help="the checkout's commit, when it is not a git repository")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.upstream_root:
        data = upstream(args.upstream_root, args.lm, args.commit)
    elif args.comfyui_root:
        data = comfyui(args.comfyui_root, args.commit)
    else:
        ap.error("give --upstream-root (with --lm) or --comfyui-root")
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
