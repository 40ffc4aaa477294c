"""The node pack in a real ComfyUI server (headless, loopback, CPU): node registration, the example workflows
run through ``POST /prompt``, Cancel through ``POST /interrupt``.

The server gets the ``comfyui-min`` tiny model (see comfy_harness) through an extra_model_paths file and the pack
as a link in its custom_nodes folder, exactly as a user's copy would be found. Only run length is shortened
for the CPU: training steps, the generated duration and the estimation batches (``SHORTEN``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import comfy_harness as H

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows"
PACK_NAME = "ComfyUI-SideStep"
NODE_IDS = ("SideStepLoadCheckpoint", "SideStepPreprocessAudio", "SideStepTrainAdapter",
            "SideStepEstimateGradients", "SideStepExportAdapter", "SideStepApplyAdapter", "SideStepCompareAdapters",
            "SideStepMergeAdapters")
SHORTEN = {
    "SideStepTrainAdapter": {"max_steps": 2, "estimate_steps": 0, "tensorboard": False},
    "SideStepEstimateGradients": {"batches": 2, "runs": 1},
    "TextEncodeAceStepAudio1.5": {"duration": 4.0},
    "EmptyAceStep1.5LatentAudio": {"seconds": 4.0},
}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def shorten(prompt: dict, **extra) -> dict:
    for node in prompt.values():
        node["inputs"].update(SHORTEN.get(node["class_type"], {}))
        node["inputs"].update(extra.get(node["class_type"], {}))
    return prompt


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    models = H.write_model_set()
    base = tmp_path_factory.mktemp("comfy_base")
    H.write_dataset(base / "input" / "sidestep_dataset")
    (base / "input" / "sidestep_dataset" / "broken.mp3").write_bytes(b"this is not audio" * 100)
    # An original ACE-Step folder in a models/acestep folder that only extra_model_paths.yaml names.
    from sidestep_core.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(base / "elsewhere" / "acestep", "original", "tiny", 0)
    srv = H.ComfyServer(comfy.dir, base, models, comfy.standin_dir, pack_name=PACK_NAME,
                        extra_paths={"acestep": str(base / "elsewhere" / "acestep")}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def history_text(entry: dict, class_type: str) -> str:
    ids = [k for k, v in entry["prompt"][2].items() if v["class_type"] == class_type]
    texts = []
    for node_id in ids:
        texts += list(entry.get("outputs", {}).get(node_id, {}).get("text", []))
    return "\n".join(texts)


# --------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------


def test_object_info_lists_the_nodes(object_info):
    from pack_loader import pack_module

    S = pack_module("spec")
    for node_id in NODE_IDS:
        assert node_id in object_info, node_id
        info = object_info[node_id]
        node = S.BY_ID[node_id]
        assert info["category"] == "Side-Step"
        assert info["display_name"] == node.display_name
        assert info["output"] == [o.kind for o in node.outputs]
        assert info["output_node"] == node.output_node
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        assert order == [i.name for i in node.inputs if not i.optional] + [i.name for i in node.inputs if i.optional]
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        for i in node.inputs:
            kind = specs[i.name][0]
            assert kind == i.kind, (node_id, i.name, kind)
            if i.advanced:
                assert specs[i.name][1].get("advanced") is True, (node_id, i.name)
            if i.control_after_generate:  # the seeds: the front end's control widget starts at "fixed"
                assert specs[i.name][1].get("control_after_generate") == i.control_after_generate, (node_id, i.name)
    load = object_info["SideStepLoadCheckpoint"]["input"]["required"]
    assert load["model"][1]["options"] == [f"diffusion_models/{H.DIT_NAME}", "acestep/acestep-v15-turbo"]
    assert H.TE_NAME in load["text_encoder"][1]["options"]
    assert load["vae"][1]["options"] == ["auto", H.VAE_NAME]
    assert object_info["SideStepApplyAdapter"]["input"]["optional"]["adapter"][0] == "ACESTEP_ADAPTER"


def test_pack_files_are_served(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    for p in WORKFLOWS.glob("*.json"):
        assert server.get(f"/api/workflow_templates/{PACK_NAME}/{p.name}")["nodes"]
    scripts = server.get("/extensions")
    assert f"/extensions/{PACK_NAME}/sidestep.js" in scripts
    i18n = server.get("/i18n")
    assert i18n["en"]["nodeDefs"]["SideStepTrainAdapter"]["display_name"] == "Train Adapter"


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_example_workflow_widgets_are_valid_for_comfyui(object_info, name):
    """Every widget value of every node (ComfyUI's own too) is valid for the running ComfyUI's schema."""
    problems = []
    workflow = load_workflow(name)
    for node in workflow["nodes"]:
        if node["type"] in H.FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"{name}: unknown node {node['type']}"
        problems += H.check_widgets(node, object_info[node["type"]])
    # A LoRA file another example exports does not exist before that example ran; it is checked again when the
    # example runs (test_run_apply_saved_adapter).
    exported = {f"{n['widgets_values'][0]}.safetensors" for p in WORKFLOWS.glob("*.json")
                for n in load_workflow(p.stem)["nodes"] if n["type"] == "SideStepExportAdapter"}
    problems = [p for p in problems if not ("lora_name" in p and any(repr(e) in p for e in exported))]
    assert not problems, "\n".join(problems)
    prompt = H.ui_to_api(workflow, object_info)
    assert {n["class_type"] for n in prompt.values()} >= {"SideStepLoadCheckpoint"} or name == "apply_saved_adapter"


# --------------------------------------------------------------------------------------------------------
# running the examples (order matters: the first one exports the adapter the last one loads)
# --------------------------------------------------------------------------------------------------------


def run_logged(server, prompt: dict):
    """Run a prompt to its end while recording the WebSocket messages; (history entry, the message log)."""
    ws = H.WebSocketLog(server)
    try:
        return server.run(prompt), ws
    finally:
        ws.close()


def test_run_preprocess_and_train(server, object_info):
    prompt = shorten(H.ui_to_api(load_workflow("preprocess_and_train"), object_info))
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SideStepTrainAdapter")
    entry, ws = run_logged(server, prompt)
    loader = history_text(entry, "SideStepLoadCheckpoint")
    assert "turbo" in loader and "shift 3" in loader and "8 steps" in loader, loader
    # the loss chart's event stream and ComfyUI's progress bar for the training node
    events = [m for m in ws.of_type("sidestep.train") if m.get("node") == train_id]
    steps = [m for m in events if m["event"] == "step"]
    kinds = [m["event"] for m in events if m["event"] != "log"]  # log lines (e.g. the memory plan) may come first
    assert kinds[0] == "plan" and kinds[-1] == "done", events
    assert [m["step"] for m in steps] == [1, 2] and all(
        {"loss", "smoothed_loss", "lr", "eta_s", "total"} <= set(m) for m in steps), steps
    progress = [m for m in ws.of_type("progress") if m.get("node") == train_id]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2, progress
    text = history_text(entry, "SideStepPreprocessAudio")
    assert "2 samples" in text and "broken.mp3" in text, text  # per-file failures are shown on the node
    lora = server.base / "models" / "loras" / "my_style.safetensors"
    assert lora.is_file()
    runs = list((server.base / "output" / "sidestep").glob("my_style-*"))
    assert len(runs) == 1 and (runs[0] / "final").is_dir()
    assert "2 steps (complete)" in history_text(entry, "SideStepTrainAdapter")

    # Re-queued as is: ComfyUI's cache answers (nothing runs). Re-queued after a restart-like cache miss
    # (a changed but training-irrelevant input): the finished adapter on disk is reused, not retrained.
    again = shorten(H.ui_to_api(load_workflow("preprocess_and_train"), object_info),
                    SideStepTrainAdapter={"keep_checkpoints": 5})
    entry2 = server.run(again)
    assert "reusing the finished adapter" in history_text(entry2, "SideStepTrainAdapter")
    assert len(list((server.base / "output" / "sidestep").glob("my_style-*"))) == 1
    # The exported file deleted, the same prompt queued again: Export Adapter runs again instead of ComfyUI's cache
    # answering for it.
    lora.unlink()
    entry3 = server.run(again)
    assert lora.is_file() and "wrote" in history_text(entry3, "SideStepExportAdapter")


def test_run_train_then_generate(server, object_info):
    # Another output name: with preprocess_and_train's settings the finished run would be reused, not trained.
    prompt = shorten(H.ui_to_api(load_workflow("train_then_generate"), object_info),
                     SideStepTrainAdapter={"output_name": "my_style_previewed"})
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SideStepTrainAdapter")
    entry, ws = run_logged(server, prompt)
    files = [f for out in entry["outputs"].values() for f in out.get("audio", [])]
    assert files, entry["outputs"]
    for f in files:
        audio = server.base / "output" / f["subfolder"] / f["filename"] if f["type"] == "output" else None
        assert audio is None or (audio.is_file() and audio.stat().st_size > 1000), f
    # the preview rendered through the user's own graph: sent to the node while training, kept in the run folder,
    # and the last one is the Train node's playable output
    previews = [m for m in ws.of_type("sidestep.preview") if m.get("node") == train_id]
    assert previews and previews[-1]["audio"]["filename"].endswith(".flac"), previews
    ref = previews[-1]["audio"]
    assert (server.base / "output" / ref["subfolder"] / ref["filename"]).is_file()
    assert entry["outputs"][train_id].get("audio"), entry["outputs"][train_id]
    assert "applied" in history_text(entry, "SideStepApplyAdapter")
    assert (server.base / "models" / "loras" / "my_style.safetensors").is_file()


def test_run_estimate_then_train(server, object_info):
    prompt = shorten(H.ui_to_api(load_workflow("estimate_then_train"), object_info))
    entry = server.run(prompt)
    assert history_text(entry, "SideStepEstimateGradients")
    assert (server.base / "models" / "loras" / "my_style_estimated.safetensors").is_file()


@pytest.fixture(scope="module")
def my_style_adapter(server, object_info):
    """``models/loras/my_style.safetensors``, the adapter apply_saved_adapter loads: the one a training example
    exported, or a short training of its own (so the test also runs alone)."""
    lora = server.base / "models" / "loras" / "my_style.safetensors"
    if not lora.is_file():
        prompt = shorten(H.ui_to_api(load_workflow("preprocess_and_train"), object_info),
                         SideStepTrainAdapter={"output_name": "for_apply"})
        server.run(prompt)
    assert lora.is_file()
    return lora


def test_run_apply_saved_adapter(server, my_style_adapter):
    object_info = server.get("/object_info")  # lists the exported file
    workflow = load_workflow("apply_saved_adapter")
    problems = [p for n in workflow["nodes"] if n["type"] not in H.FRONTEND_ONLY
                for p in H.check_widgets(n, object_info[n["type"]])]
    assert not problems, problems
    prompt = shorten(H.ui_to_api(workflow, object_info))
    entry = server.run(prompt)
    assert any(out.get("audio") for out in entry["outputs"].values())
    assert "applied" in history_text(entry, "SideStepApplyAdapter")
    # exported into models/loras, so ComfyUI's own LoRA loaders list it too
    assert "my_style.safetensors" in object_info["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]


def cached_nodes(entry: dict) -> set[str]:
    """The nodes ComfyUI answered from its cache in a history entry."""
    return {n for event, data in entry["status"]["messages"] if event == "execution_cached" for n in data["nodes"]}


def test_compare_runs_again_only_when_its_files_change(server, my_style_adapter, object_info):
    """Compare Adapters' cache key holds the files its widgets name (``fingerprint_inputs`` sees widget values
    only): the same prompt again is answered from ComfyUI's cache, a rewritten LoRA file renders again."""
    prompt = shorten(H.ui_to_api(load_workflow("apply_saved_adapter"), object_info))
    by_type = {v["class_type"]: k for k, v in prompt.items()}
    # the example's generation inputs without its Apply Adapter (which reads the same file) and sampler
    for kind in ("SideStepApplyAdapter", "KSampler", "VAEDecodeAudio", "SaveAudioAdvanced"):
        del prompt[by_type[kind]]
    prompt[by_type["ModelSamplingAuraFlow"]]["inputs"]["model"] = [by_type["UNETLoader"], 0]
    prompt["90"] = {"class_type": "SideStepCompareAdapters", "inputs": {
        "model": [by_type["ModelSamplingAuraFlow"], 0], "positive": [by_type["TextEncodeAceStepAudio1.5"], 0],
        "negative": [by_type["ConditioningZeroOut"], 0], "latent": [by_type["EmptyAceStep1.5LatentAudio"], 0],
        "vae": [by_type["VAELoader"], 0], "checkpoints": "final", "strengths": "1.0", "seed": 0, "steps": 1,
        "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "run": "", "lora_names": my_style_adapter.name}}
    first = server.run(prompt)
    assert "90" not in cached_nodes(first) and first["outputs"]["90"]["sidestep_grid"]
    assert "90" in cached_nodes(server.run(prompt))
    st = my_style_adapter.stat()
    os.utime(my_style_adapter, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = server.run(prompt)
    assert "90" not in cached_nodes(again) and by_type["VAELoader"] in cached_nodes(again)


# --------------------------------------------------------------------------------------------------------
# Cancel
# --------------------------------------------------------------------------------------------------------


def test_cancel_saves_checkpoint_and_adapter_then_resume_continues(server, object_info):
    prompt = shorten(H.ui_to_api(load_workflow("preprocess_and_train"), object_info),
                     SideStepTrainAdapter={"max_steps": 100000, "output_name": "cancel_me", "save_every": 0})
    prompt = {k: v for k, v in prompt.items() if v["class_type"] != "SideStepExportAdapter"}
    prompt_id = server.queue(prompt)
    runs_root = server.base / "output" / "sidestep"
    deadline = time.time() + 600
    csv = None
    while time.time() < deadline:
        found = list(runs_root.glob("cancel_me-*/loss.csv"))
        if found and len(found[0].read_text().splitlines()) >= 4:  # header + 3 steps
            csv = found[0]
            break
        time.sleep(0.5)
    assert csv is not None, server.log_tail()
    status, _ = server.post("/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    entry = server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    run = csv.parent
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert checkpoints, list(run.iterdir())
    assert (run / "final").is_dir() and any((run / "final").iterdir())
    marker = json.loads((run / "sidestep_node_run.json").read_text())
    assert marker["status"] == "stopped" and marker["step"] >= 3
    stopped_at = marker["step"]

    # Queue again with resume on (the default) and a reachable length: training continues from the checkpoint.
    prompt2 = shorten(H.ui_to_api(load_workflow("preprocess_and_train"), object_info),
                      SideStepTrainAdapter={"max_steps": stopped_at + 2, "output_name": "cancel_me",
                                            "save_every": 0})
    prompt2 = {k: v for k, v in prompt2.items() if v["class_type"] != "SideStepExportAdapter"}
    entry2 = server.run(prompt2)
    text = history_text(entry2, "SideStepTrainAdapter")
    assert "continuing the run" in text and f"{stopped_at + 2} steps (complete)" in text, text
    steps = [int(line.split(",")[0]) for line in csv.read_text().splitlines()[1:]]
    assert steps == list(range(1, stopped_at + 3)), steps  # one row per step, no step trained twice
