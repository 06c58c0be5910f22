"""Pure measurements of one round's client updates: norms, drift from the mean update, bytes moved."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def state_num_bytes(state: State) -> int:
    """Bytes on the wire for one copy of a model state (dense tensors, no compression)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def update_statistics(global_state: State, states: Sequence[State],
                      weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """Each update's norm ||w_k - w|| and its client drift: the cosine between the update w_k - w and
    the sample-weighted mean update (the direction FedAvg moves in; Karimireddy et al. 2020 call the
    spread of these directions client drift). An update or mean of zero length has cosine 0.

    Streamed key by key over the floating-point tensors of `global_state` (others are ignored), two
    sweeps over the clients per key: the weighted mean delta is accumulated into one buffer, then each
    client's delta is formed again in a second buffer for its squared norm and its dot with the mean.
    Extra memory is three buffers the size of the largest tensor, on the device of `global_state`,
    plus O(clients) scalars, however many clients and parameters there are; no input is changed.

    Precision: per key the arithmetic is float32 (float64 if the model has float64 tensors); the dot
    products are an elementwise product into the third buffer and a sum, because torch's pairwise sum
    keeps float32 error near 1e-7 where torch.dot on CPU reaches 5e-6 at the CNN's 1.6M weights. The
    per-key sums are added across keys in float64. Expect norms within 1e-6 relative and cosines within
    1e-6 absolute of a float64 computation (measured: 1e-7 on the CNN of McMahan et al. 2017 at 100
    clients, benchmarks/update_memory.py), times ||update|| / ||mean update|| where the updates nearly
    cancel (float32 rounding of the mean). Cosines that rounding pushes out of [-1, 1] are clamped."""
    if len(weights) != len(states):
        raise ValueError(f"update_statistics needs one weight per state, got {len(weights)} weights for "
                         f"{len(states)} states (pass each update's num_samples)")
    if not states:
        return [], []
    total = float(sum(weights))
    # all-zero weights leave no mean direction: every cosine is then 0, as for a mean of zero length
    scales = [float(w) / total if total else 0.0 for w in weights]
    floating = {k: t for k, t in global_state.items() if t.is_floating_point()}
    num_clients = len(states)
    squared_norms, dots, mean_squared_norm = [0.0] * num_clients, [0.0] * num_clients, 0.0
    if floating:
        first = next(iter(floating.values()))
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in floating.values()) else torch.float32
        size = max(t.numel() for t in floating.values())
        mean_buffer, delta_buffer, product_buffer = (torch.empty(size, dtype=dtype, device=first.device)
                                                     for _ in range(3))
        with torch.no_grad():
            for key, reference in floating.items():
                reference = reference.detach().to(first.device)
                count = reference.numel()
                mean = mean_buffer[:count].view(reference.shape).zero_()
                delta = delta_buffer[:count].view(reference.shape)
                product = product_buffer[:count].view(reference.shape)
                for state, scale in zip(states, scales):
                    _subtract(state[key], reference, out=delta)
                    mean.add_(delta, alpha=scale)
                # 0-dim results gathered per key and read once: one device sync per key, not per client
                sums = [torch.mul(mean, mean, out=product).sum()]
                for state in states:
                    _subtract(state[key], reference, out=delta)
                    sums.append(torch.mul(delta, delta, out=product).sum())
                    sums.append(torch.mul(delta, mean, out=product).sum())
                values = torch.stack(sums).tolist()
                mean_squared_norm += values[0]
                for k in range(num_clients):
                    squared_norms[k] += values[1 + 2 * k]
                    dots[k] += values[2 + 2 * k]
    mean_norm = math.sqrt(mean_squared_norm)
    norms = [math.sqrt(s) for s in squared_norms]
    cosines = []
    for norm, dot in zip(norms, dots):
        denominator = norm * mean_norm
        cosine = dot / denominator if denominator > 0 else 0.0
        cosines.append(1.0 if cosine > 1.0 else -1.0 if cosine < -1.0 else cosine)
    return norms, cosines


def _subtract(value: torch.Tensor, reference: torch.Tensor, out: torch.Tensor) -> None:
    """out = value - reference in out's precision and on out's device (reference is already there)."""
    if value.dtype == out.dtype and value.device == out.device:
        torch.sub(value, reference, out=out)
    else:
        out.copy_(value).sub_(reference)
