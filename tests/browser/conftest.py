"""The pack as a user meets it: a real ComfyUI server (the pack linked into its custom_nodes, the PyPI front end
``comfyui-frontend-package``) driven by a real browser (Debian's chromium through Playwright).

Runs when ``COMFYUI_DIR`` points at a ComfyUI checkout whose requirements are installed and a chromium and the
``playwright`` package are present (``tools/install_comfyui_test_env.sh`` sets all of this up); skipped with the
reason otherwise, and failed instead in CI (``CI=true``). Screenshots of failed tests are kept in
``$SIDESTEP_TEST_ARTIFACTS`` (default ``tests/browser/artifacts/``), with the browser console and the server log.

Fixtures for any browser test: ``comfy_server`` (session: the server, the tiny model set, test songs in
``input/sidestep_dataset``), ``browser`` (session), ``page`` (a fresh tab, not yet on the app: call
``ui.open_app(page, comfy_server, vue=...)``) and ``canvas`` (parametrizes a test over ``"classic"`` and ``"vue"``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comfyui"))
import comfy_harness as H  # noqa: E402

HERE = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("SIDESTEP_TEST_ARTIFACTS") or HERE / "artifacts")
CHROMIUM = os.environ.get("SIDESTEP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}


def missing() -> str:
    """Why the browser suite cannot run here ("" when it can)."""
    if not os.environ.get("COMFYUI_DIR"):
        return ("COMFYUI_DIR is not set: the browser tests run a ComfyUI server from a checkout "
                "(tools/install_comfyui_test_env.sh sets one up)")
    if not os.path.isfile(CHROMIUM):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set SIDESTEP_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return ""


def pytest_collection_modifyitems(config, items):
    why = missing()
    if not why:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    H.fail_skips_in_ci(item, report, HERE)
    if report.when == "call" and report.failed:
        page = item.funcargs.get("page") if hasattr(item, "funcargs") else None
        saved = _keep_artifacts(item, page)
        if saved:
            report.sections.append(("browser artifacts", f"kept in {saved}"))


def _keep_artifacts(item, page) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid.split("::", 1)[-1])[:120]
    folder = ARTIFACTS / name
    folder.mkdir(parents=True, exist_ok=True)
    if page is not None:
        try:
            page.screenshot(path=str(folder / "screenshot.png"), full_page=True)
        except Exception as exc:  # a crashed page: keep what there is
            (folder / "screenshot-error.txt").write_text(repr(exc))
        (folder / "console.txt").write_text("\n".join(getattr(page, "sidestep_console", [])))
    server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
    if server is not None:
        (folder / "comfyui.log").write_text(server.log_tail(200_000))
    return str(folder)


def pytest_terminal_summary(terminalreporter):
    if ARTIFACTS.is_dir() and any(ARTIFACTS.iterdir()):
        terminalreporter.write_line(f"browser test artifacts (screenshots, console, server log): {ARTIFACTS}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A ComfyUI server for the whole session: the tiny model set (cached between runs, see comfy_harness), two
    short test songs with captions in ``input/sidestep_dataset`` and ``models/loras/my_style.safetensors``."""
    comfyui_dir = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
    standins = tmp_path_factory.mktemp("comfy_standins")
    stood_in = H.write_standins(standins)
    models = H.write_model_set()
    base = tmp_path_factory.mktemp("browser_comfy_base")
    H.write_dataset(base / "input" / "sidestep_dataset")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    shutil.copyfile(H.write_test_lora(), loras / "my_style.safetensors")  # the adapter apply_saved_adapter loads
    server = H.ComfyServer(comfyui_dir, base, models, standins if stood_in else None).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab (its own context, so no state leaks between tests) that records the console."""
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.sidestep_console = []
    tab.on("console", lambda m: tab.sidestep_console.append(f"{m.type}: {m.text}"))
    tab.on("pageerror", lambda e: tab.sidestep_console.append(f"pageerror: {e}"))
    yield tab
    context.close()


@pytest.fixture(params=["classic", "vue"])
def canvas(request) -> str:
    """The canvas to test on: ``classic`` (LiteGraph) or ``vue`` (Nodes 2.0, ``Comfy.VueNodes.Enabled``)."""
    return request.param
