"""The pure measurements of a round's updates: norms, drift (cosine to the mean update), bytes."""

import math

import pytest
import torch

from workbench.updates import state_num_bytes, update_statistics


def state(w, b):
    return {"linear.weight": torch.tensor(w, dtype=torch.float32), "linear.bias": torch.tensor(b)}


def test_norms_and_drift_of_known_updates():
    zero = state([[0.0, 0.0]], [0.0])
    same = [state([[3.0, 4.0]], [0.0]), state([[3.0, 4.0]], [0.0])]
    norms, drifts = update_statistics(zero, same, [1, 3])
    assert norms == pytest.approx([5.0, 5.0]) and drifts == pytest.approx([1.0, 1.0])
    # orthogonal updates of equal weight: each is 45 degrees from the mean
    norms, drifts = update_statistics(zero, [state([[1.0, 0.0]], [0.0]), state([[0.0, 1.0]], [0.0])], [1, 1])
    assert drifts == pytest.approx([math.sqrt(0.5)] * 2)
    # the mean is sample-weighted: the heavy client's update dominates, the light one points away from it
    norms, drifts = update_statistics(zero, [state([[1.0, 0.0]], [0.0]), state([[-1.0, 0.0]], [0.0])], [3, 1])
    assert drifts == pytest.approx([1.0, -1.0])
    # opposite updates that cancel: no mean direction, cosine 0 by convention
    norms, drifts = update_statistics(zero, [state([[1.0, 0.0]], [0.0]), state([[-1.0, 0.0]], [0.0])], [1, 1])
    assert drifts == [0.0, 0.0] and norms == pytest.approx([1.0, 1.0])
    assert update_statistics(zero, [], []) == ([], [])


def test_update_is_measured_from_the_global_model_and_ignores_integer_buffers():
    global_state = {**state([[1.0, 1.0]], [1.0]), "steps": torch.tensor(5)}
    moved = {**state([[1.0, 1.0]], [3.0]), "steps": torch.tensor(9)}
    norms, _ = update_statistics(global_state, [moved], [1])
    assert norms == pytest.approx([2.0])
    assert state_num_bytes(global_state) == 3 * 4 + 8
