"""What several test modules share that is not a fixture."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a server the test started in its own session (`start_new_session=True`): SIGTERM to its whole
    process group, SIGKILL after `grace_s`, then SIGKILL to whatever of the group outlived its leader."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # children (workers, kernels) that outlived the group's leader
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def in_float64(federation):
    """The federation with its model and inputs in float64: executors then agree to rounding (1e-16) however
    many momentum steps a client takes, so a term one of them forgets cannot hide under float32 noise."""
    federation.model.double()
    federation.dataset = dataclasses.replace(federation.dataset, x_train=federation.dataset.x_train.double(),
                                             x_test=federation.dataset.x_test.double())
    return federation


def max_diff(a, b) -> float:
    """The largest absolute difference between two states with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
