"""The planner LM writing a prompt's audio codes (planner/write.py), the DiT conditioned on them
(conditioning.codes_hints), and ``sidestep compare|generate --lm``: the grid hears each checkpoint's LM adapter."""

from __future__ import annotations

import json

import pytest
import torch

from sidestep_core.planner.prompts import LMInputs, codes_prompt_ids
from sidestep_core.planner.write import CodeSampling, code_count, write_codes
from test_planner_training import lm_config, songs  # noqa: F401  (the module's dataset fixture)
from train_helpers import single_thread  # noqa: F401

INPUTS = LMInputs(caption="tst, bright synth pop", lyrics="[verse]\nla la", bpm=120, keyscale="C major",
                  timesignature="4", duration=2.0)


@pytest.fixture(scope="module")
def planner(tiny_with_lm):
    from sidestep_core.planner.loading import load_planner

    return load_planner(tiny_with_lm.planner)


def test_greedy_codes_are_the_guided_argmax_over_the_codes_only(planner):
    """Temperature 0: each code is the argmax of uncond + cfg · (cond − uncond) over the code ids alone, the
    prompts as built for the codes (a full forward per token here, the KV-cache streams in write_codes)."""
    tok = planner.tokenizer
    s = CodeSampling(cfg_scale=1.5, temperature=0.0)
    got = write_codes(planner, INPUTS, "comfyui", seed=0, count=6, sampling=s)
    pos, neg = codes_prompt_ids(tok, INPUTS, "comfyui"), codes_prompt_ids(tok, INPUTS, "comfyui", negative=True)
    lo, hi = tok.code_offset, tok.code_offset + tok.codebook_size
    want = []
    with torch.no_grad():
        for _ in range(6):
            c = planner.model(input_ids=torch.tensor([pos])).logits[0, -1, lo:hi].float()
            u = planner.model(input_ids=torch.tensor([neg])).logits[0, -1, lo:hi].float()
            code = int(torch.argmax(u + 1.5 * (c - u)))
            want.append(code)
            pos, neg = pos + [lo + code], neg + [lo + code]
    assert got == want


def test_sampled_codes_are_seeded_and_as_many_as_comfyui_writes(planner):
    assert code_count(2.0) == 10 and code_count(2.1) == 15  # ComfyUI: ceil(duration) · 5
    a = write_codes(planner, INPUTS, "acestep", seed=3, count=10)
    assert a == write_codes(planner, INPUTS, "acestep", seed=3, count=10)
    assert a != write_codes(planner, INPUTS, "acestep", seed=4, count=10)
    assert all(0 <= c < planner.tokenizer.codebook_size for c in a)
    before = torch.get_rng_state()
    write_codes(planner, INPUTS, "comfyui", seed=3, count=3, sampling=CodeSampling(top_k=5, min_p=0.05))
    assert torch.equal(before, torch.get_rng_state())  # its own generator only


def test_codes_become_the_context_as_comfyui_builds_it(tiny_with_lm):
    """The codebook vectors of the codes through the detokenizer, cut to the generation; short codes padded with
    ComfyUI's pad code; the chunk mask stays ones."""
    from sidestep_core.conditioning import PAD_CODE, codes_hints, encode_conditions
    from sidestep_core.model import load_acestep

    loaded = load_acestep(tiny_with_lm.dit, parts={"encoder", "tokenizer", "detokenizer"})
    model, silence = loaded.model, loaded.silence_latent
    codes = torch.tensor([1, 7, 300, 42])
    frames = 23  # needs ceil(23 / 5) = 5 codes: one pad
    hints = codes_hints(model, codes, frames)
    padded = torch.cat([codes, torch.tensor([PAD_CODE])])
    with torch.no_grad():
        want = model.detokenize(model.tokenizer.quantizer.from_indices(padded[None, :, None]))[0, :frames]
    assert torch.equal(hints, want)
    text, lyric = torch.randn(5, loaded.config.text_hidden_dim), torch.randn(3, loaded.config.text_hidden_dim)
    _, _, ctx = encode_conditions(model, text, lyric, silence, frames, "comfyui", codes)
    _, _, plain = encode_conditions(model, text, lyric, silence, frames, "comfyui")
    assert torch.equal(ctx[:, :64], hints.to(ctx.dtype)) and torch.equal(ctx[:, 64:], plain[:, 64:])
    assert not torch.equal(ctx[:, :64], plain[:, :64])


@pytest.fixture(scope="module")
def joint_run(tiny_with_lm, songs, tmp_path_factory):  # noqa: F811
    from sidestep_core.training import train

    out = tmp_path_factory.mktemp("joint") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures are set up before the autouse single_thread
    try:
        train(lm_config(tiny_with_lm, max_steps=2, save_every=1), tiny_with_lm.dit, songs, out)
    finally:
        torch.set_num_threads(threads)
    return out


def test_compare_hears_each_checkpoints_lm_adapter(tiny_with_lm, joint_run):
    """With an LM, every cell's codes are written by the LM with that row's LM adapter at the cell's strength;
    strength 0 is the base LM. An LM adapter scaled far up writes other codes than the base LM."""
    from sidestep_core.inference import compare as C
    from sidestep_core.inference.generate import Generator, Prompt

    gen = Generator.load(tiny_with_lm.dit, device="cpu", prompt_style="comfyui", lm=tiny_with_lm.planner)
    prompt = Prompt(caption="tst, bright synth pop", seconds=1.0, seed=5).validate()
    plan = C.make_plan(C.select_checkpoints(joint_run, "step_1 final"), [0.0, 1.0])
    results = C.render(gen, prompt, plan, None)
    assert gen.adapter is None and gen.lm_adapter is None
    base = gen.codes(prompt).tolist()
    assert results[(None, 0.0)].codes == base and len(base) == 5
    for r, row in enumerate(plan.rows):
        gen.set_adapter(row.path, 1.0)
        assert gen.lm_adapter is not None and gen.adapter is not None
        assert results[(r, 1.0)].codes == gen.codes(prompt).tolist()
        gen.set_strength(1e4)
        assert gen.codes(prompt).tolist() != base
        gen.remove_adapter()
    assert gen.codes(prompt).tolist() == base  # removed: the plain LM again


def test_compare_command_with_the_lm(tiny_with_lm, joint_run, tmp_path, capsys):
    from sidestep_core.cli import main

    out = tmp_path / "grid"
    assert main(["compare", "--checkpoint", str(tiny_with_lm.dit), "--adapter", str(joint_run), "--checkpoints",
                 "final", "--strengths", "0", "1", "--seconds", "1", "--caption", "tst, synth", "--out", str(out),
                 "--device", "cpu", "--prompt-style", "comfyui", "--lm", str(tiny_with_lm.planner), "--plain"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["lm"] == str(tiny_with_lm.planner) and len(doc["renders"]) == 2
    assert "audio codes written by the" in (out / "compare.md").read_text()


def test_previews_hear_the_lm_as_it_trains(tiny_with_lm, songs, tmp_path):  # noqa: F811
    """preview_codes in a joint run: each preview's codes are what the LM with that step's LoRA writes (the same
    codes `sidestep generate --lm` writes with that checkpoint), and training is exactly the run without previews."""
    from safetensors.torch import load_file

    from sidestep_core.inference.generate import Generator, Prompt
    from sidestep_core.training import train

    spec = {"caption": "tst, bright synth pop", "seconds": 1.0, "seed": 3}
    cfg = lm_config(tiny_with_lm, max_steps=2, save_every=1, preview_every=1, preview_prompts=json.dumps([spec]),
                    preview_codes=True)
    out, plain = tmp_path / "run", tmp_path / "plain"
    train(cfg, tiny_with_lm.dit, songs, out)
    train(cfg.replace(preview_every=0, preview_codes=False), tiny_with_lm.dit, songs, plain)
    for name in ("adapter_model.safetensors", "lm/adapter_model.safetensors"):
        a, b = load_file(str(out / "final" / name)), load_file(str(plain / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gen = Generator.load(tiny_with_lm.dit, device="cpu", prompt_style="comfyui", lm=tiny_with_lm.planner)
    prompt = Prompt(**spec).validate()
    heard = []
    for step in (1, 2):
        entry = json.loads((out / "previews" / f"step_{step}" / "previews.json").read_text())["previews"][0]
        gen.set_adapter(out / "checkpoints" / f"step_{step}", 1.0)
        assert entry["codes"] == gen.codes(prompt).tolist()
        heard.append(entry["codes"])
        gen.remove_adapter()
    assert len(heard[0]) == 5


def test_previews_of_a_dit_run_hear_the_plain_lms_codes(tiny_with_lm, songs, tmp_path):  # noqa: F811
    from sidestep_core.inference.generate import Generator, Prompt
    from sidestep_core.training import train

    spec = {"caption": "tst, slow piano", "seconds": 1.0, "seed": 4}
    cfg = lm_config(tiny_with_lm, train_models="dit", max_steps=1, preview_every=1,
                    preview_prompts=json.dumps([spec]), preview_codes=True)
    train(cfg, tiny_with_lm.dit, songs, tmp_path / "run")
    entry = json.loads((tmp_path / "run" / "previews" / "step_1" / "previews.json").read_text())["previews"][0]
    gen = Generator.load(tiny_with_lm.dit, device="cpu", prompt_style="comfyui", lm=tiny_with_lm.planner)
    assert entry["codes"] == gen.codes(Prompt(**spec).validate()).tolist()


def test_preview_codes_need_an_lm(tiny_with_lm, songs, tmp_path):  # noqa: F811
    from sidestep_core.training import train

    cfg = lm_config(tiny_with_lm, train_models="dit", lm="", max_steps=1, preview_every=1,
                    preview_prompts='["tst"]', preview_codes=True)
    with pytest.raises(ValueError, match="preview_codes has the planner LM write the previews' audio codes"):
        train(cfg, tiny_with_lm.dit, songs, tmp_path / "x")
