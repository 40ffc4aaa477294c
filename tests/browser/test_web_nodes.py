"""The web extension (``web/sidestep.js``) in the real front end, on both canvases: Train Adapter shows only the
chosen adapter type's options and keeps advanced inputs behind a toggle; every node's panel holds the loss chart
(legend, step axis, redrawn from ``loss.csv`` after a reload), the play button of the newest preview and the
result text wrapped inside the node; a new run clears the last; Export Adapter and Merge Adapters refresh every
LoRA list; Compare Adapters' grid of play buttons fills as renders finish and comes back after a reload.

Progress, preview and result messages are sent into the page as the server sends them (the front end's own
``api`` event dispatch), so these tests need no training run; ``test_queue_ui.py`` checks the same panel after a
real one.
"""

from __future__ import annotations

import csv

import pytest

import ui

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

TRAIN = "SideStepTrainAdapter"
PANEL = ".sidestep-panel[data-sidestep-node='{id}']"
# Train Adapter's height with default settings, graph units (= px at 100 %): it fits a laptop screen. Nodes 2.0
# draws every row taller than the classic canvas does.
MAX_HEIGHT = {"classic": 700, "vue": 900}


def add_node(page, node_type: str, x: float = 40, y: float = 40) -> int:
    return page.evaluate("""([type, x, y]) => { const n = LiteGraph.createNode(type); app.graph.add(n);
      n.pos = [x, y]; app.graph.setDirtyCanvas(true, true); return n.id; }""", [node_type, x, y])


def fresh(page, server, canvas: str) -> None:
    ui.set_setting(server, "Comfy.TutorialCompleted", True)  # no first-run Templates dialog over the canvas
    ui.open_app(page, server, vue=canvas == "vue")
    # small enough that the Train Adapter with every advanced input shown fits the window
    page.evaluate("() => { app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.6;"
                  " app.canvas.setDirty(true, true); }")


def send(page, event: str, detail) -> None:
    """A server message, delivered to the page's listeners as the WebSocket client delivers it."""
    page.evaluate("([e, d]) => window.comfyAPI.api.api.dispatchCustomEvent(e, d)", [event, detail])


def visible_widgets(page, node_id: int, canvas: str) -> set[str]:
    """Widget names the user sees: LiteGraph's own visibility rule on the classic canvas, the rendered rows'
    labels (``rank``, ``lokr factor`` …) on Nodes 2.0."""
    if canvas == "classic":
        return set(page.evaluate("(id) => { const n = app.graph.getNodeById(id);"
                                 " return n.widgets.filter(w => n.isWidgetVisible(w)).map(w => w.name); }", node_id))
    ui.settle(page)
    labels = page.evaluate("""(id) => [...document.querySelectorAll(
        `[data-testid="node-body-${id}"] [data-testid="widget-layout-field-label"]`)]
        .filter(e => e.offsetParent !== null).map(e => e.textContent.trim())""", node_id)
    return {label.replace(" ", "_") for label in labels}


def node_height(page, node_id: int, canvas: str) -> float:
    """The node's drawn height in graph units (title included on Nodes 2.0, where it is part of the element)."""
    if canvas == "classic":
        return page.evaluate("(id) => app.graph.getNodeById(id).size[1]", node_id)
    ui.settle(page)
    return page.evaluate("(id) => document.querySelector(`.lg-node[data-node-id=\"${id}\"]`)"
                         ".getBoundingClientRect().height / app.canvas.ds.scale", node_id)


def node_rect(page, node_id: int, canvas: str) -> list[float]:
    """The node's body on screen, [left, top, right, bottom] in CSS pixels."""
    if canvas == "vue":
        return page.evaluate("(id) => { const r = document.querySelector(`.lg-node[data-node-id=\"${id}\"]`)"
                             ".getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }", node_id)
    return page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
      const a = app.canvasPosToClientPos([n.pos[0], n.pos[1]]);
      const b = app.canvasPosToClientPos([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
      return [a[0], a[1], b[0], b[1]]; }""", node_id)


def set_adapter(page, node_id: int, kind: str) -> None:
    ui.set_widget(page, node_id, "adapter", kind)
    ui.settle(page)


def click_advanced(page, node_id: int, canvas: str) -> None:
    """The Advanced switch as a user clicks it: Nodes 2.0's footer button, the classic canvas's button widget."""
    if canvas == "vue":
        button = page.locator(f".lg-node[data-node-id='{node_id}'] [data-testid='advanced-inputs-button']")
        box, height = button.bounding_box(), page.viewport_size["height"]
        if box["y"] < 0 or box["y"] + box["height"] > height:  # an expanded node runs off the screen: pan to it
            page.evaluate("""(dy) => { const ds = app.canvas.ds; ds.offset[1] -= dy / ds.scale;
              app.canvas.setDirty(true, true); }""", box["y"] - height / 2)
            ui.settle(page)
        button.click()
    else:
        x, y = page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
          const w = n.widgets.find(w => w.name === 'sidestep_advanced');
          return app.canvasPosToClientPos([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + 10]); }""", node_id)
        page.mouse.click(x, y)
    ui.settle(page)


# ----- Train Adapter: the chosen adapter type's options, Advanced -----


def test_train_adapter_shows_only_the_chosen_adapter_types_options(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    node = add_node(page, TRAIN)
    ui.settle(page)
    expected = {
        "lora": ({"rank", "alpha"}, {"lokr_factor", "oft_block_size"}),
        "dora": ({"rank", "alpha"}, {"lokr_factor", "oft_block_size"}),
        "lokr": ({"rank", "alpha", "lokr_factor"}, {"oft_block_size"}),
        "loha": ({"rank", "alpha"}, {"lokr_factor", "oft_block_size"}),
        "oft": ({"oft_block_size"}, {"rank", "alpha", "lokr_factor"}),
    }
    for kind, (shown, hidden) in expected.items():
        set_adapter(page, node, kind)
        seen = visible_widgets(page, node, canvas)
        assert shown <= seen, f"{kind}: {sorted(shown - seen)} not shown ({canvas})"
        assert not hidden & seen, f"{kind}: {sorted(hidden & seen)} shown ({canvas})"
    # the type-specific advanced options follow the type too
    set_adapter(page, node, "loha")
    click_advanced(page, node, canvas)
    seen = visible_widgets(page, node, canvas)
    assert {"loha_use_tucker", "dropout"} <= seen and not {"lokr_use_tucker", "oft_rescaled"} & seen, sorted(seen)


def test_train_adapter_fits_a_laptop_screen_and_advanced_toggles(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    node = add_node(page, TRAIN)
    ui.settle(page)
    height = node_height(page, node, canvas)
    print(f"Train Adapter height, default settings, {canvas} canvas: {height:.0f}")
    assert height < MAX_HEIGHT[canvas], f"{canvas}: {height:.0f} graph units tall"
    assert "dropout" not in visible_widgets(page, node, canvas)

    click_advanced(page, node, canvas)
    shown = visible_widgets(page, node, canvas)
    assert {"dropout", "precision", "warmup_steps"} <= shown, sorted(shown)
    assert node_height(page, node, canvas) > height + 200

    click_advanced(page, node, canvas)
    assert "dropout" not in visible_widgets(page, node, canvas)
    assert abs(node_height(page, node, canvas) - height) < 2, "the node did not shrink back"


def test_other_nodes_keep_advanced_inputs_behind_the_toggle(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    node = add_node(page, "SideStepEstimateGradients")
    ui.settle(page)
    assert {"batches", "focus", "top_k"} <= visible_widgets(page, node, canvas)
    assert not {"runs", "base_rank", "seed"} & visible_widgets(page, node, canvas)
    click_advanced(page, node, canvas)
    assert {"runs", "base_rank", "seed"} <= visible_widgets(page, node, canvas)


def test_saved_values_are_only_the_nodes_own_inputs(page, comfy_server, canvas):
    """The panel and the Advanced button are never saved: widgets_values keep the node's input order."""
    fresh(page, comfy_server, canvas)
    node = add_node(page, TRAIN)
    set_adapter(page, node, "oft")
    saved, own = page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
      return [n.serialize().widgets_values,
              n.widgets.filter(w => !w.name.startsWith('sidestep_')).map(w => w.value)]; }""", node)
    assert saved == own
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert not [k for k in prompt[str(node)]["inputs"] if k.startswith("sidestep_")]


# ----- the panel: chart, play button, result text -----


def run_messages(page, node: int, run: str, steps: int, previews=(), total: int = 10) -> None:
    log = {"filename": "loss.csv", "subfolder": f"sidestep/{run}", "type": "output"}
    send(page, "executing", str(node))
    send(page, "sidestep.train", {"node": str(node), "event": "plan", "run": run, "total": total, "start": 0,
                                  "loss_log": log})
    for s in range(1, steps + 1):
        send(page, "sidestep.train", {"node": str(node), "event": "step", "run": run, "step": s, "total": total,
                                      "loss": 1.0 / s, "smoothed_loss": 1.1 / s, "lr": 1e-4, "eta_s": 3.0})
        if s in previews:
            send(page, "sidestep.preview", {"node": str(node), "run": run, "step": s, "audio": {
                "filename": f"step_{s}.flac", "subfolder": f"sidestep/{run}/previews", "type": "output"}})


def test_panel_chart_newest_preview_and_wrapped_text(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    node = add_node(page, TRAIN)
    panel = PANEL.format(id=node)
    run_messages(page, node, "web_first", steps=6, previews=(3, 6))
    long_path = "/home/someone/ComfyUI/output/sidestep/" + "a_very_long_run_folder_name_" * 6 + "/final"
    send(page, "executed", {"node": str(node), "display_node": str(node), "prompt_id": "web", "output": {
        "text": [f"lora adapter, 6 steps (complete): {long_path}", "last loss 0.16667"]}})
    ui.settle(page)

    chart = page.locator(f"{panel} canvas.sidestep-chart")
    assert chart.is_visible()
    assert chart.get_attribute("data-points") == "6"
    ticks = [float(t) for t in chart.get_attribute("data-x-ticks").split(",")]
    assert len(ticks) >= 2 and ticks[0] <= 1 and ticks[-1] >= 6, ticks  # a step axis covering the run
    legend = page.locator(f"{panel} .sidestep-legend").inner_text()
    assert "loss" in legend and "smoothed" in legend and "step" in legend, legend
    drawn = page.evaluate("(sel) => { const c = document.querySelector(sel); const d = c.getContext('2d')"
                          ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
                          " for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }",
                          f"{panel} canvas.sidestep-chart")
    assert drawn > 500, "the chart canvas is empty"

    buttons = page.locator(f"{panel} button.sidestep-play")
    assert buttons.count() == 1 and buttons.is_visible()
    assert buttons.get_attribute("data-step") == "6"
    assert "step_6.flac" in buttons.get_attribute("data-url")

    result = page.locator(f"{panel} .sidestep-result")
    assert long_path in result.inner_text().replace("\n", "")
    box = result.bounding_box()
    left, top, right, bottom = node_rect(page, node, canvas)
    assert box["x"] >= left - 1 and box["x"] + box["width"] <= right + 1, (box, [left, right])
    assert box["y"] + box["height"] <= bottom + 1, (box, bottom)
    assert page.evaluate("(sel) => { const e = document.querySelector(sel); return e.scrollWidth <= e.clientWidth; }",
                         f"{panel} .sidestep-result"), "the result text runs out of the node"

    # a new run on the node: the last run's chart, button and text are gone, the new chart starts empty
    send(page, "executing", str(node))
    ui.settle(page)
    assert not buttons.is_visible() and not result.is_visible() and not chart.is_visible()
    run_messages(page, node, "web_second", steps=2)
    ui.settle(page)
    assert chart.get_attribute("data-points") == "2"
    assert not buttons.is_visible()


@pytest.mark.parametrize("node_type", [TRAIN, "SideStepExportAdapter", "SideStepLoadCheckpoint"])
def test_panel_shows_all_of_its_content(page, comfy_server, canvas, node_type):
    """The panel is as tall as what it holds: no line of the result (nor the chart's legend) is cut off at the
    node's bottom. The classic canvas draws a DOM widget 2 × its margin shorter than the height it asks for."""
    fresh(page, comfy_server, canvas)
    page.evaluate("() => { app.canvas.ds.scale = 1; app.canvas.setDirty(true, true); }")
    node = add_node(page, node_type)
    if node_type == TRAIN:
        run_messages(page, node, f"web_fit_{canvas}", steps=3)
    lines = ["wrote /home/someone/ComfyUI/models/loras/my_style.safetensors", "from /home/someone/run/final",
             "the last line of the result"]
    send(page, "executed", {"node": str(node), "display_node": str(node), "prompt_id": "web",
                            "output": {"text": lines}})
    ui.settle(page)
    panel = PANEL.format(id=node)
    page.wait_for_function("(sel) => document.querySelector(sel)?.offsetHeight > 0", arg=f"{panel} .sidestep-result",
                           timeout=10_000)
    ui.settle(page)
    cut = page.evaluate("""(sel) => { const p = document.querySelector(sel), box = p.getBoundingClientRect();
      return [...p.children].filter(c => !c.hidden).map(c => [c.className, c.getBoundingClientRect().bottom - box.bottom])
        .filter(([, over]) => over > 1); }""", panel)
    assert not cut, f"cut off at the panel's bottom (class, px): {cut}"
    bottom = page.evaluate("(sel) => document.querySelector(sel).getBoundingClientRect().bottom", panel)
    assert bottom <= node_rect(page, node, canvas)[3] + 1
    assert "the last line of the result" in page.locator(f"{panel} .sidestep-result").inner_text()


def write_loss_csv(server, run: str, rows: int) -> dict:
    from sidestep_core.training.logs import CSV_FIELDS

    folder = server.base / "output" / "sidestep" / run
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "loss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for s in range(1, rows + 1):
            row = {"step": s, "epoch": 0, "loss": 2.0 / s, "smoothed_loss": 2.2 / s}
            w.writerow([row.get(k, "") for k in CSV_FIELDS])
    return {"filename": "loss.csv", "subfolder": f"sidestep/{run}", "type": "output"}


def test_chart_is_redrawn_from_the_loss_log_after_a_reload(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    log = write_loss_csv(comfy_server, f"web_reload_{canvas}", rows=12)
    node = add_node(page, TRAIN)
    chart = f"{PANEL.format(id=node)} canvas.sidestep-chart"
    # a reused run: no steps arrive, the node's result names the run's loss log
    send(page, "executing", str(node))
    send(page, "executed", {"node": str(node), "display_node": str(node), "prompt_id": "web",
                            "output": {"text": ["reusing the finished adapter"], "sidestep_loss_log": [log]}})
    page.wait_for_function("(sel) => document.querySelector(sel)?.dataset.points === '12'", arg=chart,
                           timeout=10_000)
    # the open workflow, with the node's run, is stored for the reload (the front end saves a draft shortly after)
    page.wait_for_function("(run) => Object.keys(localStorage).some(k => k.startsWith('Comfy.Workflow.Draft')"
                           " && localStorage.getItem(k).includes(run))", arg=f"web_reload_{canvas}", timeout=10_000)

    page.reload()
    page.wait_for_function("() => window.app?.graph?.nodes?.length > 0", timeout=120_000)
    assert page.evaluate(f"() => app.graph.getNodeById({node})?.type") == TRAIN
    page.wait_for_function("(sel) => document.querySelector(sel)?.dataset.points === '12'", arg=chart,
                           timeout=30_000)
    ticks = page.locator(chart).get_attribute("data-x-ticks").split(",")
    assert float(ticks[0]) <= 1 and float(ticks[-1]) >= 10, ticks  # the step axis spans the logged steps
    assert page.locator(chart).is_visible()


@pytest.mark.parametrize("writer", ["SideStepExportAdapter", "SideStepMergeAdapters"])
def test_export_refreshes_the_lora_lists(page, comfy_server, canvas, writer):
    fresh(page, comfy_server, canvas)
    apply_node = add_node(page, "SideStepApplyAdapter", 40, 40)
    loader = add_node(page, "LoraLoaderModelOnly", 420, 40)
    export = add_node(page, writer, 420, 300)
    name = f"web_export_{canvas}_{writer}.safetensors"
    lists = ("(ids) => ids.map(id => app.graph.getNodeById(id).widgets.find(w => w.name === 'lora_name')"
             ".options.values)")
    assert not any(name in v for v in page.evaluate(lists, [apply_node, loader]))

    (comfy_server.base / "models" / "loras" / name).write_bytes(b"")  # what the node has just written
    send(page, "executed", {"node": str(export), "display_node": str(export), "prompt_id": "web",
                            "output": {"text": [f"wrote {name}"]}})
    page.wait_for_function(f"(ids) => ({lists})(ids).every(v => v.includes({name!r}))",
                           arg=[apply_node, loader], timeout=30_000)
    # nodes made afterwards (a workflow opened next, e.g. apply_saved_adapter) know the file too: not "missing"
    later = add_node(page, "SideStepApplyAdapter", 40, 400)
    assert name in page.evaluate(lists, [later])[0]


# ----- Compare Adapters: the grid of play buttons -----


def test_compare_grid_fills_as_renders_finish_and_survives_a_reload(page, comfy_server, canvas):
    fresh(page, comfy_server, canvas)
    node = add_node(page, "SideStepCompareAdapters")
    rows, strengths = ["step_100", "final"], [0.5, 0.8, 1.0]
    cells = [[{"filename": f"{r}_{s}.flac", "subfolder": f"sidestep/compare/web_{canvas}", "type": "output"}
              for s in strengths] for r in rows]
    buttons = f"{PANEL.format(id=node)} button.sidestep-cell"
    send(page, "executing", str(node))
    send(page, "sidestep.compare", {"node": str(node), "event": "plan", "rows": rows, "strengths": strengths,
                                    "cost": "6 render(s) × about 2.0 s ≈ 12s",
                                    "cells": [[None] * 3 for _ in rows]})
    page.wait_for_function("(sel) => document.querySelectorAll(sel).length === 6", arg=buttons, timeout=10_000)
    assert page.eval_on_selector_all(buttons, "bs => bs.every(b => b.disabled)")  # nothing rendered yet
    assert page.locator(f"{PANEL.format(id=node)} .sidestep-cost").inner_text().startswith("6 render(s)")
    send(page, "sidestep.compare", {"node": str(node), "event": "cell", "row": 1, "col": 2, "audio": cells[1][2]})
    page.wait_for_function("(sel) => !document.querySelector(sel + \"[data-row='1'][data-col='2']\").disabled",
                           arg=buttons, timeout=10_000)
    assert page.eval_on_selector_all(buttons, "bs => bs.filter(b => !b.disabled).length") == 1
    heads = page.eval_on_selector_all(f"{PANEL.format(id=node)} th.sidestep-row", "e => e.map(x => x.textContent)")
    assert heads == rows
    assert page.locator(buttons).first.is_visible()

    # the finished grid is kept with the workflow and drawn again after a reload
    send(page, "executed", {"node": str(node), "display_node": str(node), "prompt_id": "web",
                            "output": {"text": ["6 renders"], "sidestep_grid": [
                                {"rows": rows, "strengths": strengths, "cost": "6 render(s)", "cells": cells}]}})
    page.wait_for_function("(sel) => [...document.querySelectorAll(sel)].every(b => !b.disabled)", arg=buttons,
                           timeout=10_000)
    page.wait_for_function("(f) => Object.keys(localStorage).some(k => k.startsWith('Comfy.Workflow.Draft')"
                           " && localStorage.getItem(k).includes(f))", arg=f"web_{canvas}", timeout=10_000)
    page.reload()
    page.wait_for_function("() => window.app?.graph?.nodes?.length > 0", timeout=120_000)
    page.wait_for_function("(sel) => document.querySelectorAll(sel).length === 6 && [...document"
                           ".querySelectorAll(sel)].every(b => !b.disabled && b.dataset.url)", arg=buttons,
                           timeout=30_000)
    urls = page.eval_on_selector_all(buttons, "bs => bs.map(b => decodeURIComponent(b.dataset.url))")
    assert "final_0.8.flac" in urls[4]
