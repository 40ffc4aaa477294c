"""Driving ComfyUI's front end as a user does, for the browser tests. Not a test module.

Everything goes through the app's own paths: settings through ComfyUI's settings API, templates through the
Templates dialog (its cards load a template the way a user's click does), queueing through the Run button.
"""

from __future__ import annotations

import json
import time
from typing import Any

PACK_NAME = "ComfyUI-SideStep"
VUE_SETTING = "Comfy.VueNodes.Enabled"


def set_setting(server, key: str, value: Any) -> None:
    status, body = server.post(f"/settings/{key}", value)
    assert status == 200, (status, body)


def open_app(page, server, *, vue: bool = False, timeout_ms: int = 120_000) -> None:
    """Open the app on the chosen canvas (the setting is stored on the server before the page loads, as when a
    user switches it and reloads) and wait until the graph and the extensions are ready."""
    set_setting(server, VUE_SETTING, vue)
    page.goto(server.url)
    page.wait_for_function("() => window.app?.graph && window.app.extensionManager?.setting", timeout=timeout_ms)
    page.wait_for_function("() => document.querySelector('[data-testid=queue-button]')", timeout=timeout_ms)
    assert page.evaluate(f"() => app.extensionManager.setting.get('{VUE_SETTING}')") is vue


def open_template(page, name: str, module: str = PACK_NAME, timeout_ms: int = 60_000) -> None:
    """Open a template as a user does: the Templates dialog, the pack's category, the template's card."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(module, exact=True).click()
    card = page.get_by_test_id(f"template-workflow-{name}")
    card.wait_for(timeout=timeout_ms)
    count = template_node_count(page, name, module)
    loaded = "(n) => app.graph?.nodes?.length === n && !document.querySelector('[role=dialog]')"
    deadline = time.time() + timeout_ms / 1000
    while True:  # a click before the dialog has fetched its template index does nothing: click again
        if card.is_visible():
            card.click()
        try:
            page.wait_for_function(loaded, arg=count, timeout=5_000)
            break
        except Exception:
            if time.time() > deadline:
                raise
    settle(page)


def template_node_count(page, name: str, module: str) -> int:
    return page.evaluate("async ([m, n]) => (await (await fetch(`/api/workflow_templates/${m}/${n}.json`)).json())"
                         ".nodes.length", [module, name])


def settle(page, frames: int = 10) -> None:
    """Let the canvas (and Vue's node components) draw and measure a few frames."""
    page.evaluate("(n) => new Promise(r => { let i = 0; const f = () => (++i >= n ? r() : requestAnimationFrame(f));"
                  " requestAnimationFrame(f); })", frames)
    page.wait_for_timeout(300)


_READ_NODES = """() => app.graph.nodes.map(n => ({
  id: n.id, type: n.type, title: n.title, mode: n.mode,
  registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
  bounding: Array.from(n.getBounding ? n.getBounding() : n.boundingRect),
  widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, type: w.type,
                                      control: w.linkedWidgets?.[0]?.value ?? null,
                                      is_control: n.widgets.some(o => o.linkedWidgets?.includes(w))})),
}))"""


def read_nodes(page) -> list[dict]:
    """Every node of the live graph: type, whether the front end knows it, its bounding box (graph units) and its
    widgets with their current values (a seed's control value under ``control``)."""
    return page.evaluate(_READ_NODES)


def widget_values(node: dict) -> dict[str, Any]:
    """The node's widget values by name, each seed's control value as ``<seed>.control_after_generate``."""
    values: dict[str, Any] = {}
    for w in node["widgets"]:
        if w["is_control"]:
            continue
        values[w["name"]] = w["value"]
        if w["control"] is not None:
            values[f"{w['name']}.control_after_generate"] = w["control"]
    return values


def dom_node_boxes(page) -> dict[int, list[float]]:
    """Nodes 2.0: each node's drawn box on screen, ``{id: [x, y, w, h]}``, from its DOM element."""
    boxes = page.evaluate("() => [...document.querySelectorAll('[data-node-id]')].filter(e => e.classList"
                          ".contains('lg-node')).map(e => { const r = e.getBoundingClientRect();"
                          " return [Number(e.dataset.nodeId), r.x, r.y, r.width, r.height]; })")
    return {b[0]: b[1:] for b in boxes}


def overlaps(boxes: dict[Any, list[float]], margin: float = 0.0) -> list[tuple]:
    """Pairs of boxes ``[x, y, w, h]`` that overlap by more than ``margin`` in both directions."""
    found = []
    items = sorted(boxes.items())
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1:]:
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > margin and dy > margin:
                found.append((a, b, round(dx), round(dy)))
    return found


def set_widget(page, node_id: int, name: str, value: Any) -> None:
    """Change a widget the way its editor does (value + callback), so extensions and the graph see the change."""
    ok = page.evaluate("""([id, name, value]) => {
      const n = app.graph.getNodeById(id); const w = n?.widgets?.find(w => w.name === name);
      if (!w) return false;
      w.value = value; w.callback?.(value, app.canvas, n); n.onWidgetChanged?.(name, value, null, w);
      app.graph.setDirtyCanvas(true, true); return true; }""", [node_id, name, value])
    assert ok, f"node {node_id} has no widget {name!r}"


def open_for_a_run(page, server, canvas: str, template: str, values: dict[str, dict[str, Any]],
                   run_name: str) -> dict[str, int]:
    """Open ``template`` on ``canvas``, set ``values`` ({node type: {widget: value}}) and Train Adapter's
    ``output_name`` to ``run_name`` (a run per canvas: the other canvas's finished run would be reused instead of
    trained); the template's node ids by type."""
    open_app(page, server, vue=canvas == "vue")
    open_template(page, template)
    ids = {n["type"]: n["id"] for n in read_nodes(page)}
    for node_type, widgets in values.items():
        for name, value in widgets.items():
            set_widget(page, ids[node_type], name, value)
    set_widget(page, ids["SideStepTrainAdapter"], "output_name", run_name)
    return ids


def queue_from_ui(page, server, timeout: float = 1200.0) -> dict:
    """Press Run and wait for the prompt it queued to finish; returns its /history entry."""
    before = set(server.get("/history") or {})
    page.get_by_test_id("queue-button").click()
    started = time.time()
    prompt_id = None
    while time.time() < started + timeout:
        new = [k for k in (server.get("/history") or {}) if k not in before]
        if new:
            prompt_id = new[0]
            break
        if server.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI died:\n{server.log_tail()}")
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"] and time.time() > started + 30:
            errors = page.evaluate("() => document.querySelector('[role=dialog]')?.innerText ?? ''")
            raise AssertionError(f"nothing was queued after pressing Run: {errors[:3000]}\n"
                                 + "\n".join(page.sidestep_console[-30:]))
        time.sleep(1)
    if not prompt_id:  # stop it, or it would hold the session's server for the tests after this one
        server.post("/queue", {"clear": True})
        server.post("/interrupt", {})
        raise AssertionError(f"the prompt did not finish in {timeout:.0f} s:\n{server.log_tail()}")
    return server.get(f"/history/{prompt_id}")[prompt_id]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:6000]


def wait_idle(server, timeout: float = 300.0) -> None:
    """Until the server's queue is empty (nothing running, nothing pending)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.5)
    raise AssertionError(f"the queue is still busy after {timeout:.0f} s: {queue}")
