"""Each template opened from the Templates dialog, on both canvases: every node known, every widget value read back
by name from the live graph equal to what the generator meant (values that land one widget early are caught here),
thumbnails served, and no node drawn over another."""

from __future__ import annotations

import math

import pytest

import ui
from pack_files import generator

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

GEN = generator()
TEMPLATES = sorted(GEN.WORKFLOWS)


def same(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(got, want, rel_tol=1e-6)
    return got == want


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_opens_with_its_values(page, comfy_server, canvas, name):
    ui.open_app(page, comfy_server, vue=canvas == "vue")
    ui.open_template(page, name)
    workflow, intended = GEN.build(name)
    object_info = comfy_server.get("/object_info")
    nodes = {n["id"]: n for n in ui.read_nodes(page)}
    assert set(nodes) == {n["id"] for n in workflow["nodes"]}
    problems = []
    for node_id, want in intended.items():
        node = nodes[node_id]
        where = f"node {node_id} ({node['type']})"
        if not node["registered"]:
            problems.append(f"{where}: unknown to the front end (missing node)")
            continue
        if node["has_errors"]:
            problems.append(f"{where}: marked with errors")
        got = ui.widget_values(node)
        for key, value in want.items():
            if key not in got:
                problems.append(f"{where}: no widget {key!r} (widgets: {sorted(got)})")
            elif not same(got[key], value):
                problems.append(f"{where}: {key} = {got[key]!r}, the template means {value!r}")
        info = object_info.get(node["type"])
        if info:  # every widget that stands for an input of the node has a value in the template
            inputs = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
            problems += [f"{where}: widget {k!r} has no value in the template" for k in got
                         if k in inputs and k not in want]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_nodes_do_not_overlap(page, comfy_server, canvas, name):
    """No node lies over another as drawn: LiteGraph's bounding boxes on the classic canvas, the node elements'
    boxes on Nodes 2.0 (their sizes come from the widgets shown, so they differ)."""
    ui.open_app(page, comfy_server, vue=canvas == "vue")
    ui.open_template(page, name)
    if canvas == "vue":
        boxes = ui.dom_node_boxes(page)
        assert len(boxes) == len(ui.read_nodes(page))
    else:
        boxes = {n["id"]: n["bounding"] for n in ui.read_nodes(page)}
    types = {n["id"]: n["type"] for n in ui.read_nodes(page)}
    found = [(types[a], types[b], dx, dy) for a, b, dx, dy in ui.overlaps(boxes)]
    assert not found, f"overlapping nodes (a, b, overlap x, overlap y): {found}"


def test_templates_have_thumbnails(page, comfy_server):
    """The Templates dialog shows a thumbnail for each of the pack's templates (a .jpg beside the .json)."""
    failed = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 and
            "/workflow_templates/" in r.url else None)
    ui.open_app(page, comfy_server)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(ui.PACK_NAME, exact=True).click()
    for name in TEMPLATES:
        page.get_by_test_id(f"template-workflow-{name}").wait_for()
    page.wait_for_function("(names) => names.every(n => [...document.querySelectorAll("
                           "`[data-testid=template-workflow-${n}] img`)].some(i => i.complete && i.naturalWidth > 0))",
                           arg=TEMPLATES, timeout=30_000)
    assert not failed, failed
