"""The README's worked examples run as a user would run them: as a script, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- the block below runs as a script in tests/test_readme.py -->"


def marked_blocks() -> list[str]:
    """Every ```python block that follows the marker line."""
    pattern = re.escape(MARKER) + r"\s*```python\n(.*?)```"
    return re.findall(pattern, README.read_text(), flags=re.S)


def test_own_model_and_data_example_runs_and_records_both(tmp_path, tracking_uri):
    """The "Your own model and data" example: its classes are defined in the script's __main__, the default
    executor trains them in worker processes, MLflow records their names and origins, and `load_model`
    returns the script's class."""
    (block,) = marked_blocks()
    script = tmp_path / "example.py"
    script.write_text(block + "\nprint('model class', type(model).__name__, tracker.run_id)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "WORKBENCH_STATE_DIR": str(tmp_path / "state"),
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", result.stdout)[1])
    assert accuracy > 0.8  # three well-separated classes
    run_id = result.stdout.split("model class Tiny ")[1].split()[0]
    logged = MlflowClient(tracking_uri).get_run(run_id)
    params = logged.data.params
    assert params["model.name"] == "tiny" and params["data.name"] == "my_wine"
    assert "__main__" in params["model.source"] and params["model.class"].endswith("Tiny")
    assert params["resolved_executor"] == "processes"  # the notebook-defined class reached the workers
    (dataset,) = logged.inputs.dataset_inputs
    assert dataset.dataset.name == "my_wine" and len(dataset.dataset.digest) == 16


EVERY_EXECUTOR = """
import json
results = {}
for executor in ("auto", "processes", "sequential"):
    tracker = MlflowCallback(experiment="own-model-and-data")
    final = run(config.with_overrides({"execution.executor": executor}), [tracker]).final()
    reloaded = load_model(tracker.run_id)
    results[executor] = {"run_id": tracker.run_id, "test_loss": final["test_loss"],
                         "test_accuracy": final["test_accuracy"], "class": type(reloaded).__name__}
print("RESULTS", json.dumps(results))
"""


def test_a_notebook_defined_model_and_dataset_give_the_same_numbers_on_every_executor(tmp_path, tracking_uri):
    """The example's __main__ classes and data with auto, processes and sequential: the same final numbers,
    each run's record naming the model and the data, each model reloaded as the script's class; from another
    process (this one), where `Tiny` does not exist, load_model says what to register."""
    import json

    from workbench.tracking import load_model

    (block,) = marked_blocks()
    script = tmp_path / "every_executor.py"
    script.write_text(block + EVERY_EXECUTOR)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "WORKBENCH_STATE_DIR": str(tmp_path / "state"),
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    reference = results["sequential"]
    client = MlflowClient(tracking_uri)
    for executor, got in results.items():
        assert abs(got["test_loss"] - reference["test_loss"]) < 1e-5, executor
        assert got["test_accuracy"] == reference["test_accuracy"] and got["class"] == "Tiny"
        logged = client.get_run(got["run_id"])
        assert logged.data.params["model.name"] == "tiny" and logged.data.params["data.name"] == "my_wine"
        assert logged.data.params["resolved_executor"] == ("processes" if executor == "auto" else executor)
        assert [d.dataset.name for d in logged.inputs.dataset_inputs] == ["my_wine"]
    digests = {client.get_run(g["run_id"]).inputs.dataset_inputs[0].dataset.digest for g in results.values()}
    assert len(digests) == 1
    with pytest.raises(ValueError, match=r"workbench\.register_model\('tiny'"):
        load_model(reference["run_id"], tracking_uri)
