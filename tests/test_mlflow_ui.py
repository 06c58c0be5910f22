"""How the MLflow UI shows a workbench experiment, and what a run's record says: the experiment opens as
training runs (not MLflow 3's GenAI view) with the key metrics as columns, in a real browser on an
`mlflow ui` started here; one-value partition statistics are params, not metrics; a resumed run that
finishes carries no error of the attempt it continued; a dataset description becomes an MLflow dataset
input.

The browser test needs Debian's `chromium` and pip's `playwright` (as tests/test_browser.py). It saves its
screenshot in the test's tmp folder; with WORKBENCH_UPDATE_SCREENSHOTS=1 also as docs/mlflow_ui_runs.png (the
README's picture), so that running the suite leaves the working tree as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import stop_process_group
import requests
from mlflow.tracking import MlflowClient

from workbench.partition import describe
from workbench.simulation import Callback, prepare, run
from workbench.tracking import MlflowCallback, get_or_create_experiment, resume
from workbench.tracking.callback import PREVIOUS_ERROR_TAG, log_dataset_input
from workbench.tracking.record import PARTITION_STAT_PREFIX, logged_partition_stats
from workbench.tracking.store import ui_url

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "mlflow_ui_runs.png"
TEST_ACCURACY_HEADER = '.ag-header-cell[col-id="metrics.`test_accuracy`"]'
#: how long a page may take to show what is awaited (the first load of MLflow's UI bundle takes seconds)
WAIT_MS = 90_000
VIEWPORT = {"width": 1800, "height": 520}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(tracking_uri: str, folder: Path, timeout_s: float = 180):
    """`mlflow ui` on the store, on a free port of 127.0.0.1, in its own process group; yields its URL and
    stops the group afterwards."""
    port = free_port()
    log = open(folder / "mlflow-ui.log", "wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"mlflow ui exited: {(folder / 'mlflow-ui.log').read_text()[-2000:]}"
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                assert time.monotonic() < deadline, f"mlflow ui did not answer within {timeout_s} s"
                time.sleep(0.5)
        yield base
    finally:
        stop_process_group(process)
        log.close()


def test_fresh_run_records_partition_statistics_as_params_not_metrics(tiny_config, tracking_uri, tmp_path):
    config = tiny_config.with_overrides({"partition.scheme": "dirichlet", "partition.alpha": 0.3,
                                         "federation.rounds": 2})
    tracker = MlflowCallback(tracking_uri, experiment="stats")
    run(config, [tracker])
    client = MlflowClient(tracking_uri)
    logged = client.get_run(tracker.run_id)
    assert not [key for key in logged.data.metrics if key.startswith("partition")]
    for key in logged.data.metrics:  # every metric is a round's: one point per round, none at step 0
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == [1, 2], key
    # MLflow lists a run's metrics in the order they were first logged; its compare view plots the first
    assert list(logged.data.metrics)[0] == "test_accuracy"

    # the statistics, recomputed here from the same partition (same config and seed)
    federation = prepare(config)
    labels = federation.dataset.y_train.numpy()
    expected = describe(labels, federation.clients, federation.dataset.num_classes).summary()
    stats = logged_partition_stats(logged.data.params)
    assert stats == expected  # exact: each number is written so that it reads back the same
    sizes = np.array([len(c) for c in federation.clients])
    assert logged.data.params[f"{PARTITION_STAT_PREFIX}num_clients"] == "8"
    assert logged.data.params[f"{PARTITION_STAT_PREFIX}num_samples"] == str(sizes.sum()) == str(len(labels))
    assert stats["size_max"] == sizes.max() and stats["size_min"] == sizes.min()
    summary = json.loads(Path(client.download_artifacts(tracker.run_id, "partition/summary.json",
                                                        str(tmp_path))).read_text())
    assert {k: summary[k] for k in stats} == stats


class StopAt(Callback):
    """Ctrl-C (or a crash) at the end of one round."""

    def __init__(self, round_: int, error: BaseException):
        self.round, self.error = round_, error

    def on_round_end(self, result, federation):
        if result.round == self.round:
            raise self.error


def test_resumed_run_that_finishes_keeps_no_error_of_the_attempt_it_continued(tiny_config, tracking_uri):
    config = tiny_config.with_overrides({"federation.rounds": 5})
    tracker = MlflowCallback(tracking_uri, experiment="resume-tags")
    with pytest.raises(KeyboardInterrupt):
        run(config, [tracker, StopAt(2, KeyboardInterrupt())])
    client = MlflowClient(tracking_uri)
    run_id = tracker.run_id
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "KeyboardInterrupt: "

    # the resumed attempt crashes in round 4: its own error is the run's error, the first one is history
    with pytest.raises(RuntimeError, match="disk full"):
        resume(run_id, tracking_uri, callbacks=[StopAt(4, RuntimeError("disk full"))])
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "RuntimeError: disk full"
    assert failed.data.tags[PREVIOUS_ERROR_TAG] == "KeyboardInterrupt: "
    assert failed.data.tags["resumed_from_round"] == "2"

    assert resume(run_id, tracking_uri).status == "FINISHED"
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert "error" not in finished.data.tags
    assert finished.data.tags[PREVIOUS_ERROR_TAG] == "RuntimeError: disk full"
    assert finished.data.tags["resumed_from_round"] == "4"
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_accuracy")) == [1, 2, 3, 4, 5]


def test_experiments_are_marked_as_training_and_carry_a_runs_view_with_key_metrics(tracking_uri):
    client = MlflowClient(tracking_uri)
    created = client.get_experiment(get_or_create_experiment(client, tracking_uri, "new"))
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(created.tags["mlflow.sharedViewState.fl-workbench"])
    assert view["name"] == "FL runs: key metrics" and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    assert {"metrics.`test_accuracy`", "metrics.`test_loss`", "metrics.`train_loss`",
            "params.`strategy.name`"} <= set(columns)

    # an experiment made before (or by plain MLflow) gets the tags it lacks; a kind a user chose stays
    old = client.create_experiment("old")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert get_or_create_experiment(client, tracking_uri, "old") == old
    assert get_or_create_experiment(client, tracking_uri, "chosen") == chosen
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.fl-workbench" in client.get_experiment(old).tags
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"

    assert ui_url("7") == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                           "&viewStateShareKey=fl-workbench")
    assert ui_url("7", "abc", base_url="http://h:1/") == ("http://h:1/#/experiments/7/runs/abc"
                                                          "?workflowType=machine_learning")
    assert ui_url("7", ["a", "b"]) == ("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22a%22%2C%22b%22%5D"
                                       "&experiments=%5B%227%22%5D&workflowType=machine_learning")


def test_dataset_description_is_logged_as_an_mlflow_dataset_input(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, tracking_uri, "data")).info.run_id
    described = {"name": "clinics", "digest": "0123456789abcdef", "source_type": "code",
                 "source": "defined in notebook", "schema": '{"mlflow_tensorspec": {}}',
                 "profile": '{"num_train": 120, "num_test": 30}'}
    log_dataset_input(client, run_id, described)
    [logged] = client.get_run(run_id).inputs.dataset_inputs
    assert {k: getattr(logged.dataset, k) for k in described} == described
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}

    with pytest.raises(ValueError, match=r"lacks digest, source .*describe_dataset"):
        log_dataset_input(client, run_id, {"name": "clinics", "source_type": "code"})


def test_mlflow_ui_opens_the_runs_as_training_runs_with_metric_columns(tiny_config, tracking_uri, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run `make system-deps` (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (no browser download needed)")
    histories, run_ids = {}, []
    for strategy in ("fedavg", "fedprox"):
        tracker = MlflowCallback(tracking_uri, experiment="fl-ui")
        histories[strategy] = run(tiny_config.with_overrides({"strategy.name": strategy}), [tracker])
        run_ids.append(tracker.run_id)
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("fl-ui").experiment_id
    final_accuracy = {repr(h.metric("test_accuracy")[-1][1]) for h in histories.values()}
    screenshot = tmp_path / "mlflow_ui_runs.png"

    with mlflow_ui(tracking_uri, tmp_path) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            # What a plain link to the experiment gives in a browser that never flipped MLflow's switch:
            # the GenAI view. This is what the URL below has to overcome.
            plain = browser.new_context(viewport=VIEWPORT).new_page()
            plain.goto(f"{base}/#/experiments/{experiment_id}")
            expect(plain, "MLflow no longer opens an experiment in its GenAI view by default: check whether "
                          "ui_url still needs workflowType").to_have_url(re.compile(r"workflowType=genai"),
                                                                         timeout=WAIT_MS)
            plain.context.close()

            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(ui_url(experiment_id, base_url=base))
            expect(page.locator(TEST_ACCURACY_HEADER)).to_be_visible(timeout=WAIT_MS)
            assert f"/#/experiments/{experiment_id}/runs?" in page.url
            assert "workflowType=machine_learning" in page.url
            for name in ("test_accuracy", "test_loss", "train_loss", "client_accuracy_p10"):
                expect(page.locator(f'.ag-header-cell[col-id="metrics.`{name}`"]')).to_have_count(1, timeout=WAIT_MS)
            cells = page.locator('.ag-cell[col-id="metrics.`test_accuracy`"]')
            expect(cells).to_have_count(2, timeout=WAIT_MS)
            assert set(cells.all_inner_texts()) == final_accuracy
            for genai_only in ("Sessions", "Judges", "Evaluation runs"):  # the GenAI view's navigation
                expect(page.get_by_text(genai_only, exact=True)).to_have_count(0)
            # A clean picture: the assistant panel and the shared-view banner closed, as a user would.
            assistant_close = page.get_by_role("button", name="Close", exact=True)
            if assistant_close.count():
                assistant_close.first.click()
            banner_close = page.get_by_role("button", name="Hide banner")
            if banner_close.count():
                banner_close.first.click()
            for name in ("strategy.name", "resolved_partition_scheme", "partition.alpha"):
                expect(page.locator(f'.ag-header-cell[col-id="params.`{name}`"]')).to_be_visible(timeout=WAIT_MS)
            page.screenshot(path=str(screenshot))

            # Comparing the two runs: the default plot is a per-round metric (it was a partition statistic)
            page.goto(ui_url(experiment_id, run_ids, base_url=base))
            expect(page.get_by_text("Comparing 2 Runs", exact=False)).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("Metrics:", exact=True)).to_be_visible(timeout=WAIT_MS)
            lines = [line.strip() for line in page.locator("body").inner_text().splitlines() if line.strip()]
            assert lines[lines.index("Metrics:") + 1] == "test_accuracy"
        finally:
            if not screenshot.exists() and "page" in locals():
                page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed
            browser.close()

    assert 10_000 < screenshot.stat().st_size < 300_000
    if os.environ.get("WORKBENCH_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(screenshot, DOCS_SCREENSHOT)
