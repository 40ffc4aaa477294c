"""``train_compare_export`` opened from the Templates dialog and queued with the Run button, on both canvases, with
only its run length shortened for the CPU (3 steps with a checkpoint each, 2-second clips, 2 sampler steps): the
queue succeeds, Compare Adapters renders 3 checkpoints × 3 strengths as one batch of 9 that Save Audio writes,
states the cost, and its node shows the grid: a clickable play button per cell that loads that cell's audio."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

import ui

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

SHORTEN = {
    "SideStepTrainAdapter": {"max_steps": 3, "save_every": 1, "estimate_steps": 0, "tensorboard": False,
                             "preview_every": 3, "preview_steps": 2},
    "SideStepCompareAdapters": {"steps": 2},
    "TextEncodeAceStepAudio1.5": {"duration": 2.0},
    "EmptyAceStep1.5LatentAudio": {"seconds": 2.0},
    "KSampler": {"steps": 2},
}


def test_train_compare_export_from_the_run_button(page, comfy_server, canvas):
    ids = ui.open_for_a_run(page, comfy_server, canvas, "train_compare_export", SHORTEN, f"cmp_{canvas}")

    entry = ui.queue_from_ui(page, comfy_server)
    status = entry["status"]
    assert status["status_str"] == "success", ui.dumps(status["messages"])
    outputs = entry["outputs"]
    compare = str(ids["SideStepCompareAdapters"])
    grid = outputs[compare]["sidestep_grid"][0]
    assert grid["rows"] == ["step_1", "step_2", "final"] and grid["strengths"] == [0.5, 0.8, 1.0]
    assert grid["cost"].startswith("9 render(s) × about"), grid["cost"]
    saves = [n for n in ui.read_nodes(page) if n["type"] == "SaveAudioAdvanced"]
    batch = [outputs[str(n["id"])]["audio"] for n in saves if str(n["id"]) in outputs]
    assert sorted(len(b) for b in batch) == [1, 9], ui.dumps(batch)  # the generation, and the grid's batch

    # the grid on the node: 9 enabled play buttons, rows = checkpoints, columns = strengths
    panel = f".sidestep-panel[data-sidestep-node='{compare}']"
    cells = page.locator(f"{panel} button.sidestep-cell")
    page.wait_for_function("(sel) => [...document.querySelectorAll(sel)].filter(b => !b.disabled && b.dataset.url)"
                           ".length === 9", arg=f"{panel} button.sidestep-cell", timeout=30_000)
    assert cells.count() == 9
    labels = page.eval_on_selector_all(f"{panel} th.sidestep-row", "els => els.map(e => e.textContent)")
    assert labels == grid["rows"]
    cost = page.locator(f"{panel} .sidestep-cost").inner_text()
    assert cost.startswith("9 render(s)")

    # clicking a cell loads that cell's file: the checkpoint final at strength 0.8
    cell = page.locator(f"{panel} button.sidestep-cell[data-row='2'][data-col='1']")
    want = grid["cells"][2][1]["filename"]
    assert want in unquote(cell.get_attribute("data-url"))
    with page.expect_response(lambda r: "/view" in r.url and want in unquote(r.url), timeout=30_000) as got:
        cell.click()
    assert got.value.status in (200, 206)


def test_a_typo_in_strengths_is_named_when_run_is_pressed(page, comfy_server, canvas):
    """Compare Adapters runs after the training: its ``strengths`` are checked when Run is pressed, so a typo is
    reported on the spot (ComfyUI's validation error on the node, naming the input and the value) instead of after
    the training. ComfyUI still runs the outputs that do not depend on the node: the training is stopped here."""
    ids = ui.open_for_a_run(page, comfy_server, canvas, "train_compare_export",
                            {"SideStepCompareAdapters": {"strengths": "0.5, O.8"},
                             "SideStepTrainAdapter": {"max_steps": 1}}, f"cmp_typo_{canvas}")
    try:
        with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as got:
            page.get_by_test_id("queue-button").click()
        errors = got.value.json()["node_errors"]
        compare = str(ids["SideStepCompareAdapters"])
        assert list(errors) == [compare], errors
        details = " ".join(e["details"] for e in errors[compare]["errors"])
        assert "strengths" in details and "O.8 is not a number" in details, details
        # the front end outlines the node and lists the error; "See Errors" shows the message
        page.get_by_role("button", name="See Errors").click()
        shown = page.get_by_text("O.8 is not a number").first
        shown.wait_for(timeout=30_000)
        assert "&amp;" not in shown.inner_text()
    finally:
        comfy_server.post("/queue", {"clear": True})
        comfy_server.post("/interrupt", {})
        ui.wait_idle(comfy_server)
