"""A real two-node Ray cluster on this machine: a head (`ray start --head` on 127.0.0.1) and a second node
(`ray start --address`), each with its own CPU and temp dir, token authentication on with the test's own
token; an experiment joins it through `execution.ray_address` in a driver process of its own, both nodes run
clients, the numbers match the sequential executor, and both nodes are stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import max_diff, stop_process_group

from workbench.config import ExperimentConfig
from workbench.simulation import prepare, run

pytestmark = [pytest.mark.ray]

OVERRIDES = {"federation.num_clients": 10, "federation.clients_per_round": 6, "federation.rounds": 2,
             "training.local_epochs": 2, "training.batch_size": 7, "training.lr": 0.05, "device": "cpu",
             "strategy.name": "scaffold", "model.name": "mlp", "execution.executor": "ray"}

DRIVER = r"""
import json, sys, torch
from workbench.config import ExperimentConfig
from workbench.execution import build_executor, close_pools
from workbench.config import ExperimentConfig
from workbench.simulation import prepare, run
cfg = ExperimentConfig().with_overrides(json.loads(sys.argv[1]))
federation = prepare(cfg)
e = cfg.execution
executor = build_executor("ray", federation.model, ray_address=e.ray_address, cpus_per_client=e.cpus_per_client,
                          clients_per_round=cfg.federation.clients_per_round)
history = run(federation, executor=executor)
torch.save(federation.model.state_dict(), sys.argv[2])
print(json.dumps({"status": history.status, "updates_per_node": executor.updates_per_node,
                  "settings": federation.execution}))
close_pools()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own: its raylet, GCS and workers are its process group,
    so stopping the group stops the node and nothing of it outlives the test."""
    with open(log, "w") as out:
        return subprocess.Popen([ray_cli(), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_for_nodes(address: str, count: int, env: dict[str, str], nodes: list[subprocess.Popen],
                   logs: list[Path]) -> None:
    """Until the cluster at `address` has `count` alive nodes (asked through `ray status`), at most 180 s."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for node, log in zip(nodes, logs):
            assert node.poll() is None, f"a Ray node exited: {log.read_text()[-2000:]}"
        status = subprocess.run([ray_cli(), "status", f"--address={address}"], capture_output=True, text=True,
                                env=env, timeout=60)
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(1)
    pytest.fail(f"the cluster did not reach {count} nodes in 180 s: {status.stdout[-2000:]} {status.stderr[-2000:]}")


@pytest.fixture
def cluster(tmp_path):
    # Ray's socket paths live under the temp dir and may not exceed 107 bytes: pytest's folders are too deep
    short = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    nodes = [start_node(["--head", f"--port={port}", "--include-dashboard=false",
                         f"--temp-dir={short / 'head'}"], logs[0], env)]
    try:
        # the second node retries until the head answers: one wait for both
        nodes.append(start_node([f"--address={address}", f"--temp-dir={short / 'worker'}"], logs[1], env))
        wait_for_nodes(address, 2, env, nodes, logs)
        yield address, env
    finally:
        for node in reversed(nodes):
            # `ray start --block` waits for its raylet and GCS to drain on SIGTERM (~15 s); nothing of the
            # node needs a clean exit (its temp dir is removed below), so SIGKILL follows after 2 s
            stop_process_group(node, grace_s=2.0)
        shutil.rmtree(short, ignore_errors=True)
    for node in nodes:
        assert node.poll() is not None


def test_an_experiment_on_a_two_node_cluster_uses_both_nodes_and_matches_sequential(cluster, tmp_path):
    address, env = cluster
    overrides = {**OVERRIDES, "execution.ray_address": address}
    weights = tmp_path / "ray.pt"
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides), str(weights)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert driver.returncode == 0, driver.stderr[-4000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert report["status"] == "FINISHED"
    assert report["settings"]["ray_address"] == address and report["settings"]["num_actors"] == 2
    per_node = report["updates_per_node"]
    assert len(per_node) == 2 and all(n >= 1 for n in per_node.values()), per_node  # both nodes ran clients
    assert sum(per_node.values()) == 12  # 6 clients per round, 2 rounds
    reference = prepare(ExperimentConfig().with_overrides({**OVERRIDES, "execution.executor": "sequential"}))
    run(reference)
    assert max_diff(reference.model.state_dict(), torch.load(weights)) < 1e-5
