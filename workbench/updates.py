"""Pure measurements of one round's client updates: norms, drift from the mean update, bytes moved."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def state_num_bytes(state: State) -> int:
    """Bytes on the wire for one copy of a model state (dense tensors, no compression)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def flat_delta(state: State, reference: State) -> torch.Tensor:
    """The update state - reference of the floating-point tensors, as one float64 vector."""
    return torch.cat([(state[k].double() - reference[k].double()).flatten()
                      for k in reference if reference[k].is_floating_point()])


def update_statistics(global_state: State, states: Sequence[State],
                      weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """Each update's norm ||w_k - w|| and its client drift: the cosine between the update w_k - w and
    the sample-weighted mean update (the direction FedAvg moves in; Karimireddy et al. 2020 call the
    spread of these directions client drift). An update or mean of zero length has cosine 0."""
    if not states:
        return [], []
    deltas = torch.stack([flat_delta(s, global_state) for s in states])
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    mean = (w[:, None] * deltas).sum(0) / w.sum()
    norms = deltas.norm(dim=1)
    mean_norm = mean.norm()
    denominator = norms * mean_norm
    cosines = torch.where(denominator > 0, deltas @ mean / denominator.clamp_min(1e-300),
                          torch.zeros_like(norms))
    return norms.tolist(), cosines.tolist()
