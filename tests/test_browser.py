"""The notebook workbench in a real browser: JupyterLab started here on 127.0.0.1, Debian's Chromium
driven by Playwright opens 01_quickstart.ipynb, runs it, presses Run in the panel, waits for the live view
to show two rounds, runs another cell meanwhile, presses Stop, and checks the MLflow run ended KILLED.

Needs Debian's `chromium` and pip's `playwright` (`make system-deps` and the `test` extra install them;
no browser download). The screenshot is saved in the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import stop_process_group
from mlflow.tracking import MlflowClient

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "01_quickstart.ipynb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Rounds of a fraction of a second, and so many of them (hours of work) that the run is still going when
#: Stop is pressed however fast the machine: every step before Stop has a timeout of a minute or two, so
#: the test cannot get there after the run could have finished (with 100 rounds, a fast machine finished
#: them before the test pressed Stop, and the run ended FINISHED).
BROWSER_PARAMETERS = {"EXPERIMENT": "browser", "NUM_CLIENTS": 8, "CLIENTS_PER_ROUND": 4, "ROUNDS": 1_000_000,
                      "LOCAL_EPOCHS": 2, "SEED": 57, "START_RUN": False}


def step(message: str) -> None:
    """Progress on stderr (pytest -s shows it live): where a slow browser test spends its time."""
    print(f"[browser test {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def copy_with_parameters(source: Path, folder: Path, values: dict) -> Path:
    """The notebook with `values` appended to its parameters cell (as papermill would inject them)."""
    notebook = json.loads(source.read_text())
    [cell] = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    source_text = "".join(cell["source"])
    cell["source"] = source_text + "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    target = folder / source.name
    target.write_text(json.dumps(notebook, indent=1))
    return target


@pytest.fixture
def jupyterlab(tmp_path, tracking_uri):
    """JupyterLab on a free port of 127.0.0.1 in a folder holding a copy of the notebook; stopped after
    the test with its kernels and its whole process group."""
    folder = tmp_path / "lab"
    folder.mkdir()
    copy_with_parameters(NOTEBOOK, folder, BROWSER_PARAMETERS)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "WORKBENCH_STATE_DIR": str(tmp_path / "state"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
           "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MPLBACKEND", None)
    log = open(tmp_path / "jupyterlab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={folder}",
         "--ServerApp.open_browser=False", "--LabApp.news_url=None",
         # window.jupyterapp: lets the test run JupyterLab commands as its menus do.
         "--LabApp.expose_app_in_browser=True"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-3000:]}"
            try:
                api(base, token, "/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 90 s"
                time.sleep(0.5)
        start_notebook_kernel(base, token, NOTEBOOK.name)
        yield base, token
    finally:
        try:
            for kernel in api(base, token, "/api/kernels") or []:
                api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass  # the server is already gone; its process group goes below anyway
        stop_process_group(process)
        log.close()


def start_notebook_kernel(base: str, token: str, path: str) -> None:
    """Start the notebook's kernel through the server's API: the page then opens onto a running session, so
    JupyterLab never races its own kernel start-up (on a loaded machine it would ask which kernel to start,
    and drop the cells sent before the kernel's websocket is up). `wait_for_kernel` waits for it to answer."""
    api(base, token, "/api/sessions", method="POST",
        body={"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}})


#: True once the focused notebook's kernel is connected and idle (JupyterLab's own session state).
KERNEL_READY = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
        && widget.sessionContext.session.kernel;
    return Boolean(kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle');
}"""


def wait_for_kernel(page, timeout_s: float = 600) -> None:
    """Wait until the notebook's kernel answers (the event, not a guess at how long start-up takes; the
    timeout only catches a kernel that never starts)."""
    page.wait_for_function(KERNEL_READY, timeout=timeout_s * 1000, polling=200)


def answer_kernel_dialog(page) -> None:
    """When starting its kernel takes JupyterLab too long (a loaded machine), it asks which kernel to
    start: take the one it offers, as a user would."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        text = dialog.first.inner_text()
        step(f"JupyterLab asks: {' '.join(text.split())[:100]!r}")
        if "Select Kernel" in text:
            dialog.first.locator(".jp-mod-accept").click()


def run_all_cells(page, timeout_s: float = 600) -> None:
    """Run every cell, retrying while the kernel is not really ready (JupyterLab reports it idle
    before its websocket is up, and a run sent then is lost): done when the panel's Run button shows."""
    run_button = page.locator(".workbench-experiment-panel button", has_text=re.compile(r"^\s*Run\s*$"))
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "the notebook never ran (kernel not ready?)"
        answer_kernel_dialog(page)
        # The notebook commands act on the focused notebook: focus it as a user's click would.
        try:
            page.locator(".jp-NotebookPanel .jp-Cell").first.click(timeout=10_000)
        except Exception:  # playwright's TimeoutError: a dialog came up meanwhile
            step("could not focus the notebook: trying again")
            continue
        # Fire and forget: the command's promise never settles when the kernel drops the request.
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            run_button.wait_for(state="visible", timeout=120_000)
            return
        except Exception:  # playwright's TimeoutError: send the run again
            step("no panel yet: running all cells again")
            assert time.monotonic() < deadline, "the notebook never ran (kernel not ready?)"


def test_quickstart_panel_runs_and_stops_in_a_real_browser(jupyterlab, tracking_uri, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run `make system-deps` (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (no browser download needed)")
    base, token = jupyterlab
    screenshot = tmp_path / "quickstart_panel.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            step("JupyterLab is up; opening the notebook")
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.locator(".jp-NotebookPanel .jp-Notebook").wait_for(state="visible", timeout=120_000)
            page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for()
            page.wait_for_function("window.jupyterapp && window.jupyterapp.commands.hasCommand("
                                   "'notebook:run-all-cells')")
            news = page.get_by_role("button", name="No", exact=True)  # "get notified about Jupyter news?"
            if news.is_visible():
                news.click()
            step("waiting for the kernel")
            wait_for_kernel(page)
            step("running all cells")
            run_all_cells(page)
            step("the panel is shown; pressing Run")

            panel = page.locator(".workbench-experiment-panel")
            expect(panel.locator("select").first).to_be_visible()  # the generated controls
            expect(page.locator(".jp-OutputArea-output", has_text="Traceback")).to_have_count(0)
            expect(page.locator(".jp-Cell", has_text="no run yet: press Run")).to_have_count(1)

            panel.locator("button", has_text=re.compile(r"^\s*Run\s*$")).click()
            caption = panel.locator(".workbench-live-caption")
            expect(caption).to_have_text(re.compile(r"live view up to round ([2-9]|\d\d+)$"), timeout=120_000)
            step("the live view shows 2 rounds; running another cell")
            image = panel.locator("img").first
            assert image.evaluate("img => img.complete && img.naturalWidth > 300")

            # The kernel answers while the run goes on: run the cell that lists the rounds so far.
            cell = page.locator(".jp-CodeCell", has_text='panel.history.metric("test_accuracy")')
            cell.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            expect(cell.locator(".jp-OutputArea-output")).to_contain_text("[(1, ", timeout=60_000)
            expect(panel.locator("button", has_text=re.compile(r"^\s*Stop\s*$"))).to_be_enabled()

            step("pressing Stop")
            panel.locator("button", has_text=re.compile(r"^\s*Stop\s*$")).click()
            expect(panel).to_contain_text("KILLED", timeout=60_000)
            expect(panel.locator("button", has_text=re.compile(r"^\s*Resume\s*$"))).to_be_enabled()
            shown_round = int(re.search(r"(\d+)$", caption.inner_text()).group(1))
            panel.scroll_into_view_if_needed()
            page.locator(".jp-Cell", has=panel).scroll_into_view_if_needed()
            page.screenshot(path=str(screenshot))
        finally:
            if not screenshot.exists() and "page" in locals():
                page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed
            browser.close()

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("browser")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "KILLED"
    steps = sorted(m.step for m in client.get_metric_history(logged.info.run_id, "test_accuracy"))
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)) and steps[-1] >= shown_round
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("WORKBENCH_SCREENSHOT_DIR"):
        shutil.copy(screenshot, os.environ["WORKBENCH_SCREENSHOT_DIR"])
