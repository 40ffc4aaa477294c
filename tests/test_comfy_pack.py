"""The ComfyUI node pack without ComfyUI: node specs against TrainConfig, the example workflows against the specs,
the generated pack files, run-folder decisions, and the core calls behind each node on the tiny model.

(tests/comfyui/ runs the same nodes inside a real ComfyUI.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pack_loader import ROOT, pack_module

S = pack_module("spec")
calls = pack_module("calls")
runs = pack_module("runs")
values_mod = pack_module("values")
chart = pack_module("chart")

from sidestep_core.config import TrainConfig  # noqa: E402

WORKFLOWS = ROOT / "example_workflows"
REQUIRED_WORKFLOWS = ("train_then_generate", "preprocess_and_train", "estimate_then_train", "apply_saved_adapter")
# TrainConfig fields the Train Adapter node does not show, and why.
NOT_ON_NODE = {
    "checkpoint": "from the model bundle", "dataset": "from the dataset", "out": "the run folder (output_name)",
    "resume": "the node's resume switch", "device": "ComfyUI's device", "base_variant": "the loader's variant",
    "rank_pattern": "from Estimate Gradients", "alpha_pattern": "from Estimate Gradients",
    "timestep_mu": "the checkpoint's value", "timestep_sigma": "the checkpoint's value",
    "log_every": "TensorBoard cadence", "histogram_every": "TensorBoard cadence",
    "lm": "the planner_lm input, resolved in ComfyUI's text_encoders folders",
    # Audio previews while training need the text encoder and VAE loaded by the trainer; in ComfyUI the graph
    # generates with ComfyUI's own nodes instead, so the node turns them off.
    "preview_every": "off in ComfyUI", "preview_prompts": "off in ComfyUI", "preview_steps": "off in ComfyUI",
    "preview_shift": "off in ComfyUI", "preview_guidance": "off in ComfyUI", "preview_codes": "off in ComfyUI",
}


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def generator():
    spec = importlib.util.spec_from_file_location("generate_pack_files", ROOT / "tools" / "generate_pack_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def widget_values(wf: dict, node_type: str) -> dict:
    node = next(n for n in wf["nodes"] if n["type"] == node_type)
    return dict(zip(S.BY_ID[node_type].widget_slots, node["widgets_values"]))


# --------------------------------------------------------------------------------------------------------
# pack entry point and generated files
# --------------------------------------------------------------------------------------------------------


def test_pack_imports_outside_comfyui(tmp_path):
    """Importing the pack folder as ComfyUI would, but without ComfyUI: only WEB_DIRECTORY, no V1 mappings."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web'\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS') and not hasattr(m, 'comfy_entrypoint')\n"
        "assert 'comfy' not in sys.modules and 'comfy_api' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_entrypoint_is_v3_only():
    text = (ROOT / "__init__.py").read_text()
    assert "comfy_entrypoint" in text and "NODE_CLASS_MAPPINGS =" not in text
    ext = (ROOT / "nodes" / "extension.py").read_text()
    assert "NODE_CLASS_MAPPINGS" not in ext


def test_generated_files_are_up_to_date():
    """example_workflows/*.json and locales/en/main.json are what tools/generate_pack_files.py writes."""
    stale = [str(p.relative_to(ROOT)) for p, text in generator().generated_files().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"run `python tools/generate_pack_files.py`: stale {stale}"


def test_templates_have_thumbnails():
    """The template browser asks for <template>.jpg beside each template (a 404 and a blank card without it)."""
    from PIL import Image

    gen = generator()
    for name in REQUIRED_WORKFLOWS:
        with Image.open(WORKFLOWS / f"{name}.jpg") as img:
            assert img.format == "JPEG" and img.size == gen.THUMB_SIZE, name
            assert len(set(img.convert("L").getdata())) > 16, f"{name}.jpg is blank"  # a drawing, not a fill
        assert gen.SUMMARIES[name] and name.replace("_", " ") not in gen.SUMMARIES[name].lower()


def test_locales_describe_every_node_and_input():
    data = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["nodeDefs"]
    for node in S.NODES:
        entry = data[node.node_id]
        assert entry["display_name"] == node.display_name and entry["description"]
        assert set(entry["inputs"]) == {i.name for i in node.inputs}
        for i in node.inputs:
            assert entry["inputs"][i.name]["name"]
            assert entry["inputs"][i.name].get("tooltip"), (node.node_id, i.name)


def test_web_extension_parses():
    js = ROOT / "web" / "sidestep.js"
    text = js.read_text()
    assert 'from "../../scripts/app.js"' in text and "sidestep.train" in text and "sidestep.preview" in text
    if shutil.which("node") is None:
        pytest.skip("node is not installed: JavaScript syntax not checked")
    out = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------------------------------------
# specs against the core's configuration
# --------------------------------------------------------------------------------------------------------


def test_node_ids_and_types():
    assert [n.node_id for n in S.NODES] == ["SideStepLoadCheckpoint", "SideStepPreprocessAudio",
                                           "SideStepTrainAdapter", "SideStepEstimateGradients",
                                           "SideStepExportAdapter", "SideStepApplyAdapter",
                                           "SideStepCompareAdapters", "SideStepMergeAdapters"]
    for node in S.NODES:
        names = [i.name for i in node.inputs]
        assert len(names) == len(set(names)), node.node_id
    assert [o.kind for o in S.TRAIN.outputs] == ["ACESTEP_ADAPTER", "IMAGE"]
    assert [o.kind for o in S.ESTIMATE.outputs] == ["ACESTEP_ESTIMATE", "STRING"]
    assert S.EXPORT.output_node and [o.kind for o in S.EXPORT.outputs] == ["STRING"]
    assert [o.kind for o in S.APPLY.outputs] == ["MODEL", "CLIP"] and S.APPLY.input("adapter").optional
    assert S.APPLY.input("clip").optional
    assert S.EXPORT.input("format").options == ("comfyui", "peft", "lycoris")
    assert S.COMPARE.output_node and [o.kind for o in S.COMPARE.outputs] == ["AUDIO", "IMAGE", "STRING"]
    assert S.COMPARE.input("adapter").optional and S.COMPARE.input("checkpoints").default == "last 3"
    assert S.MERGE.output_node and [o.kind for o in S.MERGE.outputs] == ["STRING"]
    assert S.MERGE.input("mode").options == ("sum", "bake") and S.MERGE.input("model").optional


def test_train_inputs_are_train_config_fields():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    on_node = {i.config_field for i in S.TRAIN.inputs if i.config_field}
    assert on_node | set(NOT_ON_NODE) == set(fields), sorted(set(fields) - on_node - set(NOT_ON_NODE))
    assert not on_node & set(NOT_ON_NODE)
    defaults = TrainConfig()
    for i in S.TRAIN.inputs:
        if not i.config_field:
            continue
        assert i.name == i.config_field
        expected = getattr(defaults, i.name)
        assert S.to_config_value(i, i.default) == expected, i.name
        choices = fields[i.name].metadata.get("choices")
        if choices:
            assert i.kind == "COMBO" and i.options == tuple(choices)
        assert i.tooltip == fields[i.name].metadata["help"]
    defaults = {"id": 1, "type": S.TRAIN.node_id,
                "widgets_values": [S.FIXED if "." in n else S.TRAIN.input(n).default for n in S.TRAIN.widget_slots]}
    assert S.check_widgets(defaults, S.node_info(S.TRAIN)) == []


def test_train_config_from_node_defaults_is_the_core_default():
    values = {w.name: w.default for w in S.TRAIN.widgets}
    assert S.train_config_from_inputs(values) == TrainConfig()


def test_train_config_inputs_override_and_preset_base():
    values = {w.name: w.default for w in S.TRAIN.widgets}
    values.update(rank=8, target_modules="self_attn.q_proj, layers.1.mlp.up_proj\ncross_attn.o_proj")
    cfg = S.train_config_from_inputs(values)
    assert cfg.rank == 8 and cfg.target_modules == ["self_attn.q_proj", "layers.1.mlp.up_proj", "cross_attn.o_proj"]
    preset = TrainConfig(rank=16, max_steps=50, learning_rate=2e-4)
    cfg = S.train_config_from_inputs({**{w.name: w.default for w in S.TRAIN.widgets}, "learning_rate": 3e-4},
                                     preset)
    assert (cfg.rank, cfg.max_steps, cfg.learning_rate) == (16, 50, 3e-4)  # defaults keep the preset's values


def test_train_config_with_estimate():
    bundle = _bundle_stub()
    est = values_mod.EstimateRef(targets=("layers.0.self_attn.q_proj",), rank_pattern={"layers\\.0": 8},
                                 alpha_pattern={"layers\\.0": 16.0})
    values = {w.name: w.default for w in S.TRAIN.widgets}
    cfg = calls.train_config(values, bundle, est, preset=None, device="cpu")
    assert cfg.target_modules == ["layers.0.self_attn.q_proj"] and cfg.rank_pattern == {"layers\\.0": 8}
    assert cfg.device == "cpu" and cfg.base_variant == "" and cfg.preview_every == 0
    oft = calls.train_config({**values, "adapter": "oft"}, bundle, est, preset=None, device="cpu")
    assert oft.rank_pattern == {} and oft.target_modules == ["layers.0.self_attn.q_proj"]


def test_preprocess_config_mapping():
    bundle = _bundle_stub()
    values = {w.name: w.default for w in S.PREPROCESS.widgets}
    cfg = calls.preprocess_config({**values, "normalize": "peak", "max_duration": 30}, bundle, "cpu")
    assert (cfg.prompt_style, cfg.normalize, cfg.max_duration, cfg.device) == ("comfyui", "peak", 30.0, "cpu")
    assert cfg.custom_tag == ""
    cfg = calls.preprocess_config({**values, "trigger_tag": " zz "}, bundle, "cpu")
    assert (cfg.custom_tag, cfg.tag_position) == ("zz", "prepend")


def test_estimate_overrides():
    values = {w.name: w.default for w in S.ESTIMATE.widgets}
    out = calls.estimate_overrides({**values, "modules": "attention", "top_k": 0}, "cpu")
    assert out["groups"] == ("self_attn", "cross_attn") and out["top_k"] is None and out["device"] == "cpu"
    from sidestep_core.estimate import EstimateSettings

    settings = dataclasses.replace(EstimateSettings(), **out).validate()
    assert settings.batches == values["batches"]


# --------------------------------------------------------------------------------------------------------
# the example workflows against the specs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_WORKFLOWS)
def test_example_workflow_is_valid(name):
    wf = workflow(name)
    problems = [p for n in wf["nodes"] for p in S.check_ui_workflow_node(n)] + S.check_ui_workflow_links(wf)
    assert not problems, "\n".join(problems)
    assert any(n["type"].startswith("SideStep") for n in wf["nodes"])
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])


def test_train_then_generate_uses_comfyuis_native_graph():
    wf = workflow("train_then_generate")
    by_type = {n["type"]: n for n in wf["nodes"]}
    for kind in ("SideStepLoadCheckpoint", "SideStepPreprocessAudio", "SideStepTrainAdapter",
                 "SideStepApplyAdapter", "UNETLoader", "DualCLIPLoader", "VAELoader", "TextEncodeAceStepAudio1.5",
                 "EmptyAceStep1.5LatentAudio", "KSampler", "ModelSamplingAuraFlow", "VAEDecodeAudio",
                 "SaveAudioAdvanced"):
        assert kind in by_type, kind
    assert by_type["DualCLIPLoader"]["widgets_values"][2] == "ace"
    seed, control, steps, cfg, sampler, scheduler, denoise = by_type["KSampler"]["widgets_values"]
    assert (steps, cfg, control) == (8, 1.0, "fixed")  # turbo: 8 steps, cfg 1
    assert by_type["ModelSamplingAuraFlow"]["widgets_values"] == [3.0]  # turbo shift
    tags = by_type["TextEncodeAceStepAudio1.5"]["widgets_values"][0]
    assert widget_values(wf, "SideStepPreprocessAudio")["trigger_tag"] in tags
    apply = by_type["SideStepApplyAdapter"]
    src = {l[0]: l for l in wf["links"]}
    linked = {i["name"]: src[i["link"]][1] for i in apply["inputs"] if i["link"] is not None}
    ids = {n["id"]: n["type"] for n in wf["nodes"]}
    assert ids[linked["model"]] == "UNETLoader" and ids[linked["adapter"]] == "SideStepTrainAdapter"


def test_apply_saved_adapter_loads_what_an_example_exports():
    exported = {widget_values(workflow(n), "SideStepExportAdapter")["name"] + ".safetensors"
                for n in REQUIRED_WORKFLOWS if any(x["type"] == "SideStepExportAdapter" for x in workflow(n)["nodes"])}
    assert widget_values(workflow("apply_saved_adapter"), "SideStepApplyAdapter")["lora_name"] in exported


def test_workflow_checks_catch_mistakes():
    wf = workflow("preprocess_and_train")
    node = next(n for n in wf["nodes"] if n["type"] == "SideStepTrainAdapter")
    names = S.TRAIN.widget_slots
    bad = json.loads(json.dumps(node))
    bad["widgets_values"][names.index("adapter")] = "banana"
    bad["widgets_values"][names.index("rank")] = 0
    bad["widgets_values"][names.index("learning_rate")] = "fast"
    problems = S.check_ui_workflow_node(bad)
    assert len(problems) == 3, problems
    short = json.loads(json.dumps(node))
    short["widgets_values"].pop()
    assert f"widget values, none for '{S.TRAIN.widgets[-1].name}'" in S.check_ui_workflow_node(short)[0]
    cut = json.loads(json.dumps(wf))
    train = next(n for n in cut["nodes"] if n["type"] == "SideStepTrainAdapter")
    dataset_input = next(i for i in train["inputs"] if i["name"] == "dataset")
    cut["links"] = [l for l in cut["links"] if l[0] != dataset_input["link"]]
    dataset_input["link"] = None
    assert any("'dataset' is not linked" in p for p in S.check_ui_workflow_links(cut))


def test_widget_checker_follows_the_frontends_layout():
    """Seed-like widgets carry a control value, V3 dynamic combos their sub-widgets, file combos any name."""
    info = {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "min": 0, "control_after_generate": True}],
        "name": [["a.safetensors", "b.safetensors"]], "lora": ["COMBO", {"options": ["none"], "any_file": True}],
        "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "flac", "inputs": {"required": {}}}, {
            "key": "mp3", "inputs": {"required": {"quality": ["COMBO", {"options": ["V0", "320k"]}]}}}]}]}},
        "input_order": {"required": ["model", "seed", "name", "lora", "format"]}}
    node = {"id": 1, "type": "X", "widgets_values": [5, "fixed", "a.safetensors", "mine.safetensors", "mp3", "V0"]}
    assert S.check_widgets(node, info) == []
    node["widgets_values"] = [5, "a.safetensors", "c.safetensors", 3, "mp3", "128k"]
    problems = S.check_widgets(node, info)  # positional: the missing control value shifts every later value
    assert [p.split(": ")[1] for p in problems] == ["'seed' needs a control_after_generate value after it",
                                                    "name", "lora", "format.quality"], problems
    node["widgets_values"] = [5, "fixed", "a.safetensors", "x", "flac", "extra"]
    assert S.check_widgets(node, info) == ["node 1 (X): 6 widget values for 5 widget slots"]
    # The front end's legacy rule: an INT named seed/noise_seed gets the control even when /object_info does not
    # ask for one (ComfyUI 0.27 + frontend 1.45), unless it says false.
    legacy = {"input": {"required": {"seed": ["INT", {"default": 0}], "noise_seed": ["INT", {}],
                                     "steps": ["INT", {}], "s": ["INT", {"control_after_generate": False}]}},
              "input_order": {"required": ["seed", "noise_seed", "steps", "s"]}}
    node["widgets_values"] = [1, "fixed", 2, "randomize", 3, 4]
    assert S.check_widgets(node, legacy) == []


@pytest.mark.parametrize("name", REQUIRED_WORKFLOWS)
def test_seed_controls_are_stored_fixed(name):
    """Every seed-like widget of every node (ComfyUI's too) is followed by its control value, "fixed" (a randomized
    seed changes the run fingerprint: queueing again would start over instead of reusing or resuming)."""
    gen = generator()
    for node in workflow(name)["nodes"]:
        spec = S.BY_ID.get(node["type"])
        slots = spec.widget_slots if spec else [("seed." + S.CONTROL if w == "+control" else w)
                                                  for w in gen.NATIVE[node["type"]]["widgets"]]
        assert len(slots) == len(node["widgets_values"]), node["type"]
        values = dict(zip(slots, node["widgets_values"]))
        seeds = [s for s in slots if s.split(".")[0] in S.SEED_NAMES and not s.endswith(S.CONTROL)]
        for seed in seeds:
            assert values.get(f"{seed}.{S.CONTROL}") == S.FIXED, (node["type"], seed, node["widgets_values"])
    for node_spec in (S.TRAIN, S.ESTIMATE):
        assert node_spec.input("seed").control_after_generate == S.FIXED


# --------------------------------------------------------------------------------------------------------
# run folders, strengths, chart, file recognition
# --------------------------------------------------------------------------------------------------------


def test_run_plan_fresh_resume_reuse_restart(tmp_path):
    cfg = TrainConfig(max_steps=10)
    plan = runs.plan_run(tmp_path, "my style!", cfg, "model", "data", resume=True)
    assert plan.action == "fresh" and plan.out.name.startswith("my_style-")
    (plan.out / "checkpoints" / "step_5").mkdir(parents=True)
    assert runs.plan_run(tmp_path, "my style!", cfg, "model", "data", resume=True).action == "resume"
    # the fingerprint ignores the run length and bookkeeping, not what is trained
    assert runs.plan_run(tmp_path, "my style!", cfg.replace(max_steps=99, save_every=7), "model", "data",
                         resume=True).out == plan.out
    assert runs.plan_run(tmp_path, "my style!", cfg.replace(rank=8), "model", "data", resume=True).out != plan.out
    assert runs.plan_run(tmp_path, "my style!", cfg, "model2", "data", resume=True).out != plan.out
    assert runs.plan_run(tmp_path, "my style!", cfg, "model", "data2", resume=True).out != plan.out
    # a planner LM in a run that trains it is part of what is trained; a DiT-only run ignores the field
    assert runs.plan_run(tmp_path, "my style!", cfg.replace(lm="x"), "model", "data", resume=True).out == plan.out
    (tmp_path / "lm_a.safetensors").write_bytes(b"1")
    (tmp_path / "lm_b.safetensors").write_bytes(b"22")
    both = cfg.replace(train_models="both")
    outs = {runs.plan_run(tmp_path, "my style!", both.replace(lm=str(tmp_path / f"lm_{x}.safetensors")), "model",
                          "data", resume=True).out for x in "ab"}
    assert len(outs) == 2 and plan.out not in outs
    # the LM's identity is its content, as the model's: the same file name and size with other weights differ
    from sidestep_core.planner.tiny import make_tiny_planner

    same_name = {runs.plan_run(tmp_path, "my style!", both.replace(lm=str(make_tiny_planner(tmp_path / f"s{seed}",
                 "comfyui-split", seed=seed))), "model", "data", resume=True).out for seed in (0, 1)}
    assert len(same_name) == 2
    (plan.out / "final").mkdir()
    runs.write_marker(plan.out, cfg, "complete", 10, 10)
    assert runs.plan_run(tmp_path, "my style!", cfg, "model", "data", resume=True).action == "reuse"
    assert runs.plan_run(tmp_path, "my style!", cfg, "model", "data", resume=False).action == "reuse"
    longer = runs.plan_run(tmp_path, "my style!", cfg.replace(max_steps=20), "model", "data", resume=True)
    assert longer.action == "resume"
    restart = runs.plan_run(tmp_path, "my style!", cfg.replace(max_steps=20), "model", "data", resume=False)
    assert restart.action == "fresh" and not restart.out.exists()
    assert (tmp_path / f"{plan.out.name}.old-1" / "checkpoints" / "step_5").is_dir()  # moved aside, not deleted


def test_group_strengths_split_patches():
    patches = {"diffusion_model.decoder.layers.0.self_attn.q_proj.weight": "a",
               "diffusion_model.decoder.layers.0.cross_attn.k_proj.weight": "b",
               "diffusion_model.decoder.layers.1.mlp.up_proj.weight": "c",
               ("diffusion_model.decoder.condition_embedder.weight", (0, 0, 4)): "d"}
    groups = calls.group_strengths(patches, 0.5, {"self_attn_strength": 2.0, "cross_attn_strength": 0.0,
                                                  "mlp_strength": 1.0})
    assert groups == {1.0: {"diffusion_model.decoder.layers.0.self_attn.q_proj.weight": "a"},
                      0.0: {"diffusion_model.decoder.layers.0.cross_attn.k_proj.weight": "b"},
                      0.5: {"diffusion_model.decoder.layers.1.mlp.up_proj.weight": "c",
                            ("diffusion_model.decoder.condition_embedder.weight", (0, 0, 4)): "d"}}


def test_loss_chart(tmp_path):
    csv = tmp_path / "loss.csv"
    csv.write_text("step,epoch,loss,smoothed_loss,lr,grad_norm,val_loss,elapsed_s\n"
                   "1,0,1.0,1.0,1e-4,1,,0.1\n2,0,0.5,0.9,1e-4,1,,0.2\n3,0,nan,0.9,1e-4,1,,0.3\n")
    steps, loss, smooth = chart.read_loss_csv(csv)
    assert steps == [1, 2, 3] and loss[:2] == [1.0, 0.5]
    img = chart.render_loss_curve(steps, loss, smooth, title="t")
    assert img.shape == (1, 384, 768, 3) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert chart.render_loss_curve([], [], []).shape == (1, 384, 768, 3)


def test_classify_files_by_their_keys(tmp_path):
    from safetensors.torch import save_file

    z = torch.zeros
    save_file({"decoder.layers.0.self_attn_norm.weight": z(4)}, str(tmp_path / "dit.safetensors"))
    save_file({"model.diffusion_model.decoder.layers.0.self_attn_norm.weight": z(4), "vae.x": z(1),
               "text_encoders.qwen3_06b.transformer.model.layers.0.post_attention_layernorm.weight": z(1024)},
              str(tmp_path / "aio.safetensors"))
    save_file({"model.layers.0.post_attention_layernorm.weight": z(1024)}, str(tmp_path / "qwen.safetensors"))
    save_file({"model.layers.0.post_attention_layernorm.weight": z(2048)}, str(tmp_path / "lm.safetensors"))
    save_file({"decoder.layers.1.layers.0.beta": z(4)}, str(tmp_path / "vae.safetensors"))
    save_file({"transformer_blocks.0.attn.weight": z(4)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    kinds = {p.stem: values_mod.classify(p) for p in tmp_path.iterdir()}
    assert kinds == {"dit": "acestep", "aio": "acestep_aio", "qwen": "qwen_0.6b", "lm": None, "vae": "vae",
                     "other": None, "junk": None}
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "dit.safetensors", tmp_path / "sub" / "ft.safetensors")
    assert values_mod.list_files([str(tmp_path)], {"acestep", "acestep_aio"}) == \
        ["aio.safetensors", "dit.safetensors", "sub/ft.safetensors"]


def test_list_original_folders(tmp_path):
    from sidestep_core.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "checkpoints", "original", "tiny", 0)
    assert values_mod.list_original_folders([str(tmp_path)]) == ["checkpoints/acestep-v15-turbo"]


# --------------------------------------------------------------------------------------------------------
# the core calls behind each node, on the tiny model, with the example workflow's own values
# --------------------------------------------------------------------------------------------------------


def _bundle_stub():
    return values_mod.ModelBundle(checkpoint=Path("/nonexistent"), label="x", variant="turbo", stated_variant=None,
                                  is_turbo=True, shift=3.0, steps=8, guidance=1.0, identity="id", layout="original")


@pytest.mark.slow
def test_core_calls_behind_the_nodes(tmp_path):
    """Load → Preprocess → Estimate → Train → Export → read back, each with the arguments its node would pass."""
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    try:
        from comfy_harness import write_dataset
    finally:
        sys.path.remove(str(ROOT / "tests" / "comfyui"))
    from sidestep_core.adapters import export_comfyui, read_adapter_weights
    from sidestep_core.data.preprocess import preprocess
    from sidestep_core.estimate import estimate
    from sidestep_core.model import load_acestep
    from sidestep_core.tiny import make_tiny_checkpoint
    from sidestep_core.training import train

    ckpt = make_tiny_checkpoint(tmp_path / "models", "original", "tiny", 0)
    info = load_acestep(ckpt.dit, parts=set()).info
    bundle = calls.bundle_from_info(ckpt.dit, "acestep/acestep-v15-turbo", info, None)
    assert bundle.variant == "turbo" and bundle.steps == 8 and "shift 3" in bundle.summary()

    audio = write_dataset(tmp_path / "songs", n=2, seconds=2.0)
    (audio / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    wf = workflow("estimate_then_train")
    pre_values = widget_values(wf, "SideStepPreprocessAudio")
    cfg = calls.preprocess_config(pre_values, bundle, "cpu")
    json_path = calls.dataset_json_path(audio, pre_values["dataset_json"])
    out = calls.dataset_cache_dir(tmp_path / "cache", audio, json_path, bundle)
    result = preprocess(bundle.checkpoint, audio, out, dataset_json=json_path, config=cfg)
    dataset = calls.dataset_ref(out, result, pre_values["trigger_tag"])
    assert dataset.samples == 2 and [f for f, _ in dataset.failures] == ["broken.wav"]
    assert "broken.wav" in dataset.summary()
    assert "dataset report: 2 song(s)" in dataset.summary()  # the quality report reaches the node's text
    again = calls.dataset_ref(out, preprocess(bundle.checkpoint, audio, out, dataset_json=json_path, config=cfg),
                              pre_values["trigger_tag"])
    assert (again.encoded, again.reused, again.identity) == (0, 2, dataset.identity)

    est_values = {**widget_values(wf, "SideStepEstimateGradients"), "batches": 1, "runs": 1, "top_k": 4}
    est = calls.estimate_ref(estimate(bundle.checkpoint, dataset.path, **calls.estimate_overrides(est_values, "cpu")))
    assert len(est.targets) == 4 and est.text

    train_values = {**widget_values(wf, "SideStepTrainAdapter"), "max_steps": 2, "estimate_steps": 0,
                    "tensorboard": False, "precision": "fp32"}
    tcfg = calls.train_config(train_values, bundle, est, preset=None, device="cpu")
    plan = runs.plan_run(tmp_path / "runs", train_values["output_name"], tcfg, bundle.identity, dataset.identity,
                         train_values["resume"])
    res = train(tcfg, checkpoint_path=bundle.checkpoint, dataset_path=dataset.path, out_dir=plan.out)
    assert res.status == "complete" and res.step == 2 and (plan.out / "final").is_dir()
    runs.write_marker(plan.out, tcfg, res.status, res.step, res.total_steps)
    assert runs.plan_run(tmp_path / "runs", train_values["output_name"], tcfg, bundle.identity, dataset.identity,
                         True).action == "reuse"
    steps, loss, _ = chart.read_loss_csv(plan.out / "loss.csv")
    assert steps == [1, 2] and all(l == l for l in loss)

    aw = read_adapter_weights(plan.out / "final")
    assert sorted(aw.targets()) == sorted(est.targets)
    for fmt, prefix in (("comfyui", "diffusion_model.decoder."), ("peft", "base_model.model."),
                        ("lycoris", "lycoris_")):
        path, _ = export_comfyui(aw, calls.export_path(tmp_path / "loras", "my_style", False),
                                 key_style=calls.EXPORT_KEY_STYLES[fmt])
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith(prefix) for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == \
        ["my_style.safetensors", "my_style_001.safetensors", "my_style_002.safetensors"]


def test_preview_plan_defaults_schedule_and_half_wiring(tmp_path):
    calls = pack_module("calls")
    values = pack_module("values")
    bundle = values.ModelBundle(checkpoint=tmp_path / "m.safetensors", label="m", variant="turbo",
                                stated_variant=None, is_turbo=True, shift=3.0, steps=8, guidance=1.0,
                                identity="x", layout="comfy")
    sockets = {n: object() for n in S.PREVIEW_SOCKETS}
    assert calls.preview_plan({}, bundle, tmp_path) is None
    with pytest.raises(ValueError, match="preview_latent"):
        calls.preview_plan({**sockets, "preview_latent": None}, bundle, tmp_path)
    plan = calls.preview_plan(sockets, bundle, tmp_path / "run")  # widget values absent: the spec's defaults
    assert (plan.every, plan.steps, plan.cfg, plan.sampler, plan.scheduler) == (100, 8, 1.0, "euler", "simple")
    plan = calls.preview_plan({**sockets, "preview_every": 2, "preview_steps": 4, "preview_cfg": 2.5}, bundle,
                              tmp_path / "run")
    assert [s for s in range(1, 8) if plan.due(s, s == 7)] == [2, 4, 6, 7]
    assert (plan.steps, plan.cfg) == (4, 2.5)
    assert plan.path(6) == tmp_path / "run" / "previews" / "step_6.flac"
    assert plan.view_ref(6, tmp_path) == {"filename": "step_6.flac", "subfolder": "run/previews", "type": "output"}
    only_last = calls.preview_plan({**sockets, "preview_every": 0}, bundle, tmp_path)
    assert [s for s in range(1, 5) if only_last.due(s, s == 4)] == [4]
    (tmp_path / "run" / "previews").mkdir(parents=True)
    for n in ("step_2.flac", "step_10.flac", "step_x.flac"):
        (tmp_path / "run" / "previews" / n).write_bytes(b"")
    assert calls.latest_preview(tmp_path / "run" / "previews")[0] == 10


def _encoder(**over):
    values = {"clip": ["1", 0], "tags": "tst, synth", "lyrics": "", "seed": 3, "bpm": 120, "duration": 4.0,
              "timesignature": "4", "language": "en", "keyscale": "C major", "generate_audio_codes": True,
              "cfg_scale": 2.0, "temperature": 0.85, "top_p": 0.9, "top_k": 0, "min_p": 0.0}
    return {"class_type": "TextEncodeAceStepAudio1.5", "inputs": {**values, **over}}


def test_the_encoder_behind_a_conditioning_is_found_or_refused_with_the_reason():
    """Compare Adapters follows its positive / negative back to TextEncodeAceStepAudio1.5 in the prompt graph
    (directly or through ConditioningZeroOut) to run it again with each checkpoint's LM adapter; anything else
    between, or an encoder input fed by another node, is refused with the reason."""
    prompt = {"1": {"class_type": "DualCLIPLoader", "inputs": {}},
              "2": _encoder(),
              "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
              "9": {"class_type": "SideStepCompareAdapters",
                    "inputs": {"positive": ["2", 0], "negative": ["3", 0], "clip": ["1", 0]}}}
    (pos, neg), note = calls.encoding_plan(prompt, "9", "positive", "negative", "clip")
    assert (pos.node_id, pos.zero_out, neg.node_id, neg.zero_out) == ("2", False, "2", True) and note == ""
    assert "clip" not in pos.values and pos.values["tags"] == "tst, synth"
    prompt["9"]["inputs"]["clip"] = ["7", 1]
    assert "is not the one TextEncodeAceStepAudio1.5 (node 2) uses" in calls.encoding_plan(
        prompt, "9", "positive", "negative", "clip")[1]
    prompt["4"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0]}}
    prompt["9"]["inputs"]["positive"] = ["4", 0]
    assert calls.encoding_plan(prompt, "9", "positive", "negative", "clip") == (
        None, "positive comes from ConditioningCombine (node 4), not straight from TextEncodeAceStepAudio1.5 (or "
              "through ConditioningZeroOut)")
    prompt["9"]["inputs"]["positive"] = ["2", 0]
    prompt["2"] = _encoder(tags=["5", 0])
    assert "takes tags from another node" in calls.encoding_plan(prompt, "9", "positive", "negative", "clip")[1]
    prompt["2"] = _encoder(generate_audio_codes=False)
    assert "generate_audio_codes is off" in calls.encoding_plan(prompt, "9", "positive", "negative", "clip")[1]
    assert calls.encoding_plan(None, "9", "positive", "negative", "clip")[0] is None
