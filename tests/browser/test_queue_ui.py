"""``train_then_generate`` opened from the Templates dialog and queued with the Run button, on both canvases, with
only its run length shortened for the CPU: the queue succeeds, Train Adapter draws its loss chart and offers the
newest preview to play, and Save Audio holds the generated audio."""

from __future__ import annotations

import pytest

import ui

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

SHORTEN = {
    "SideStepTrainAdapter": {"max_steps": 2, "estimate_steps": 0, "tensorboard": False},
    "TextEncodeAceStepAudio1.5": {"duration": 4.0},
    "EmptyAceStep1.5LatentAudio": {"seconds": 4.0},
}


def test_train_then_generate_from_the_run_button(page, comfy_server, canvas):
    ids = ui.open_for_a_run(page, comfy_server, canvas, "train_then_generate", SHORTEN, f"ui_{canvas}")

    entry = ui.queue_from_ui(page, comfy_server)
    status = entry["status"]
    assert status["status_str"] == "success", ui.dumps(status["messages"])
    train = str(ids["SideStepTrainAdapter"])
    assert "2 steps (complete)" in "\n".join(entry["outputs"][train].get("text", [])), ui.dumps(entry["outputs"])

    # the loss chart, drawn from the run's steps, and the play button of the newest preview
    panel = f".sidestep-panel[data-sidestep-node='{ids['SideStepTrainAdapter']}']"
    chart = page.locator(f"{panel} canvas.sidestep-chart")
    chart.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("(sel) => Number(document.querySelector(sel)?.dataset.points) >= 2",
                           arg=f"{panel} canvas.sidestep-chart", timeout=30_000)
    play = page.locator(f"{panel} button.sidestep-play")
    play.wait_for(state="visible", timeout=30_000)
    assert play.get_attribute("data-url"), "the play button has no preview to play"

    # Save Audio's player holds the file the queue wrote
    saved = entry["outputs"][str(ids["SaveAudioAdvanced"])]["audio"][0]["filename"]
    page.wait_for_function("(f) => [...document.querySelectorAll('audio')].some(a => decodeURIComponent(a.src)"
                           ".includes(f))", arg=saved, timeout=30_000)


def test_train_dit_and_lm_queues_and_names_the_missing_lm(page, comfy_server, canvas):
    """``train_dit_and_lm`` queued with the Run button: the front end's prompt is accepted (every value and link
    valid), the data is preprocessed, and Train Adapter stops with the message saying where the LM goes — the
    test model set holds no 5 Hz LM ComfyUI can run (ComfyUI builds the 1.7B LM at full size)."""
    ids = ui.open_for_a_run(page, comfy_server, canvas, "train_dit_and_lm", {"SideStepTrainAdapter": {"max_steps": 2}},
                            f"lm_{canvas}")
    entry = ui.queue_from_ui(page, comfy_server)
    status = entry["status"]
    assert status["status_str"] == "error", ui.dumps(status["messages"])
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "SideStepTrainAdapter", ui.dumps(status["messages"])
    message = errors[0]["exception_message"]
    assert "no 5 Hz planner LM found" in message and "qwen_1.7b_ace15.safetensors" in message, message
