"""Byzantine-robust aggregation: the coordinate-wise median and trimmed mean of Yin et al. (2018), Krum and
Multi-Krum of Blanchard et al. (2017); all unweighted, all drop stragglers, none keeps state."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from workbench.client import ClientUpdate
from workbench.config import ExperimentConfig
from workbench.strategies.base import State, StrategyBase, check_num_updates

# ----- the math: pure functions on stacked values (leading axis = client) -----


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median over the leading (client) axis (Yin, Chen, Ramchandran, Bartlett, ICML 2018,
    Algorithm 1, Option I). For an even count n it is the mean of the two middle values, (v_(n/2) + v_(n/2+1)) / 2
    (the usual definition; `torch.median` would return the lower one). Computed in float64, returned in the
    input's dtype."""
    if values.shape[0] == 0:
        raise ValueError("coordinate_median needs at least one value per coordinate")
    ordered = values.double().sort(dim=0).values
    n = ordered.shape[0]
    middle = ordered[(n - 1) // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return middle.to(values.dtype)


def num_trimmed(num_values: int, trim_fraction: float) -> int:
    """How many values the beta-trimmed mean drops at each end of every coordinate: floor(beta n)
    (Yin et al. 2018, Definition 2)."""
    return math.floor(trim_fraction * num_values)


def coordinate_trimmed_mean(values: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """The coordinate-wise beta-trimmed mean over the leading (client) axis (Yin et al., ICML 2018, Definition 2
    and Algorithm 1, Option II): in every coordinate, drop the floor(beta n) largest and the floor(beta n)
    smallest of the n values and average the n - 2 floor(beta n) that remain. Computed in float64, returned in
    the input's dtype."""
    n = values.shape[0]
    b = num_trimmed(n, trim_fraction)
    if not 0 <= trim_fraction < 0.5 or 2 * b >= n:
        raise ValueError(f"coordinate_trimmed_mean: trim_fraction={trim_fraction} drops 2 * floor(beta n) = {2 * b} "
                         f"of n={n} values, leaving none (need 0 <= beta < 0.5 and 2 floor(beta n) < n)")
    kept = values.double().sort(dim=0).values[b:n - b]
    return kept.mean(dim=0).to(values.dtype)


def pairwise_squared_distances(vectors: torch.Tensor) -> torch.Tensor:
    """||v_i - v_j||^2 for every pair of rows of `vectors` (n x d), in float64. Row by row on differences rather
    than through the Gram matrix, so that close updates do not lose their distance to cancellation."""
    vectors = vectors.double()
    return torch.stack([((vectors - row) ** 2).sum(dim=1) for row in vectors])


def krum_scores(vectors: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Krum's score of every row (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, Section 4):
    s(i) = sum of ||v_i - v_j||^2 over the n - f - 2 rows j != i closest to v_i. Needs n >= 2f + 3."""
    n = vectors.shape[0]
    if n < 2 * num_byzantine + 3:
        raise ValueError(f"krum_scores needs n >= 2f + 3 updates, got n={n} with f={num_byzantine}")
    distances = pairwise_squared_distances(vectors)
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool, device=distances.device), math.inf)
    closest = others.sort(dim=1).values[:, :n - num_byzantine - 2]
    return closest.sum(dim=1)


def krum_select(scores: torch.Tensor, num_selected: int) -> list[int]:
    """The rows of the `num_selected` lowest scores, best first (Multi-Krum, Blanchard et al. 2017, Section 4;
    `num_selected` = 1 is Krum). Ties go to the earlier row (a stable sort), so the choice is reproducible."""
    return [int(i) for i in torch.argsort(scores, stable=True)[:num_selected]]


# ----- from updates to stacked tensors and back -----


def float_keys(global_state: State) -> list[str]:
    """The tensors robust aggregation combines; every other one (integer buffers) keeps the global value."""
    return [k for k, v in global_state.items() if v.is_floating_point()]


def stacked(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.state[key] for u in updates])


def flattened_updates(global_state: State, updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """One row per update: its floating-point tensors minus the global model's, flattened and joined, in
    float64 (the vectors Krum compares; distances are the same as between the models themselves)."""
    keys = float_keys(global_state)
    return torch.stack([torch.cat([(u.state[k].double() - global_state[k].double()).reshape(-1) for k in keys])
                        for u in updates])


def combine(global_state: State, updates: Sequence[ClientUpdate], reduce) -> dict[str, torch.Tensor]:
    """`reduce(stacked values)` for every floating-point tensor, in its dtype; the rest as the global model."""
    return {k: reduce(stacked(updates, k)).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in global_state.items()}


def median_of(global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median model of the updates (see `coordinate_median`)."""
    return combine(global_state, updates, coordinate_median)


def mean_of(global_state: State, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The unweighted mean model of the updates (Multi-Krum's average), in float64 then each tensor's dtype."""
    return combine(global_state, updates, lambda values: values.double().mean(dim=0))


# ----- the strategies -----


@dataclass(frozen=True)
class Median(StrategyBase):
    """Coordinate-wise median (Yin et al., ICML 2018, Option I): every coordinate of the next global model is
    the median of the clients' values, unweighted as in the paper (mean of the two middle values for an even
    count). Stragglers are dropped."""

    name: str = "median"
    secure_aggregation_refusal = ("it takes each coordinate's median over the individual updates, and secure "
                                  "aggregation shows the server only their sum")
    keeps_partial_work: bool = False

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Median":
        return cls()

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if not updates:
            return dict(global_state)
        return median_of(global_state, updates)


def check_trim_fraction(trim_fraction: float, clients_per_round: int) -> None:
    """Refuse a trim fraction that would drop every update of a full round: 2 floor(beta K) >= K."""
    dropped = 2 * num_trimmed(clients_per_round, trim_fraction)
    if not 0 <= trim_fraction < 0.5 or dropped >= clients_per_round:
        raise ValueError(f"strategy.trim_fraction={trim_fraction} with federation.clients_per_round="
                         f"{clients_per_round} drops 2 * floor(beta K) = {dropped} of {clients_per_round} updates "
                         f"per coordinate, leaving none (need 0 <= trim_fraction < 0.5 and 2 floor(beta K) < K: "
                         f"lower trim_fraction or raise clients_per_round)")


@dataclass(frozen=True)
class TrimmedMean(StrategyBase):
    """Coordinate-wise beta-trimmed mean (Yin et al., ICML 2018, Option II): in every coordinate the
    floor(beta n) largest and smallest client values are dropped and the rest averaged, unweighted.
    Stragglers are dropped; beta applies to the n updates that arrived (a round with fewer updates trims
    fewer: floor(beta n) each side)."""

    trim_fraction: float = 0.1
    name: str = "trimmed_mean"
    secure_aggregation_refusal = ("it sorts each coordinate over the individual updates to trim both ends, and "
                                  "secure aggregation shows the server only their sum")
    keeps_partial_work: bool = False
    _last: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"strategy.trim_fraction must be >= 0 and < 0.5, got {self.trim_fraction} "
                             f"(at least the fraction of malicious clients; try 0.1-0.3)")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "TrimmedMean":
        check_trim_fraction(config.strategy.trim_fraction, config.federation.clients_per_round)
        return cls(trim_fraction=config.strategy.trim_fraction)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        self._last.clear()
        if not updates:
            return dict(global_state)
        self._last["trimmed_per_side"] = float(num_trimmed(len(updates), self.trim_fraction))
        return combine(global_state, updates, lambda values: coordinate_trimmed_mean(values, self.trim_fraction))

    def round_metrics(self) -> dict[str, float]:
        """trimmed_per_side: floor(beta n) values dropped at each end of every coordinate this round."""
        return dict(self._last)


def check_krum_config(config: ExperimentConfig) -> None:
    """Refuse, at preparation, a config whose full rounds cannot run (Multi-)Krum: K >= 2f + 3
    (Blanchard et al. 2017, Proposition 1), and Multi-Krum's m <= K - f."""
    f = config.strategy.num_byzantine
    check_num_updates(config, 2 * f + 3, f"Krum with strategy.num_byzantine={f} (n >= 2f + 3)",
                      "strategy.num_byzantine")
    m, per_round = config.strategy.num_selected, config.federation.clients_per_round
    if config.strategy.name == "multi_krum" and m > per_round - f:
        raise ValueError(f"strategy.num_selected={m} is more than federation.clients_per_round - "
                         f"strategy.num_byzantine = {per_round} - {f} = {per_round - f}: Multi-Krum would average "
                         f"updates it cannot trust (lower num_selected; 0 = n - f)")


@dataclass(frozen=True)
class MultiKrum(StrategyBase):
    """Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, Section 4): score every update by
    the sum of squared distances to its n - f - 2 closest others (`krum_scores`), and average, unweighted,
    the m best-scored models (`num_selected`; 0 = n - f; a round's m is capped at n - f of the updates that
    arrived). Stragglers are dropped.

    A round with fewer than 2f + 3 accepted updates (stragglers dropped) cannot be scored; it then falls back to
    the coordinate-wise median of what arrived (`coordinate_median`, robust to fewer than half malicious), says
    so with a `RuntimeWarning`, and reports `krum_fallback` = 1 in its round metrics (0 on a scored round).
    """

    num_byzantine: int = 2
    num_selected: int = 0
    name: str = "multi_krum"
    secure_aggregation_refusal = ("it scores every individual update by its distances to the others, and secure "
                                  "aggregation shows the server only their sum")
    keeps_partial_work: bool = False
    _last: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_byzantine < 0 or self.num_selected < 0:
            raise ValueError(f"strategy.num_byzantine and strategy.num_selected must be >= 0, got "
                             f"{self.num_byzantine} and {self.num_selected}")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "MultiKrum":
        check_krum_config(config)
        return cls(num_byzantine=config.strategy.num_byzantine, num_selected=config.strategy.num_selected)

    def selected_count(self, num_updates: int) -> int:
        """m of a round with `num_updates` updates: num_selected (0 = n - f), at most n - f."""
        cap = num_updates - self.num_byzantine
        return min(self.num_selected, cap) if self.num_selected else cap

    def select(self, global_state: State, updates: Sequence[ClientUpdate]) -> list[int]:
        """The positions in `updates` of the models Multi-Krum averages this round, best first."""
        scores = krum_scores(flattened_updates(global_state, updates), self.num_byzantine)
        return krum_select(scores, self.selected_count(len(updates)))

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  rng: np.random.Generator) -> dict[str, torch.Tensor]:
        self._last.clear()
        if not updates:
            return dict(global_state)
        needed = 2 * self.num_byzantine + 3
        if len(updates) < needed:
            warnings.warn(f"{self.name}: only {len(updates)} updates arrived (stragglers dropped), fewer than the "
                          f"2f + 3 = {needed} that strategy.num_byzantine={self.num_byzantine} needs; this round "
                          f"uses the coordinate-wise median of them instead", RuntimeWarning, stacklevel=2)
            self._last["krum_fallback"] = 1.0
            return median_of(global_state, updates)
        chosen = self.select(global_state, updates)
        self._last.update(self.describe([updates[i] for i in chosen]))
        return mean_of(global_state, [updates[i] for i in chosen])

    def describe(self, chosen: Sequence[ClientUpdate]) -> dict[str, float]:
        return {"krum_fallback": 0.0, "krum_num_selected": float(len(chosen))}

    def round_metrics(self) -> dict[str, float]:
        """krum_fallback (1: too few updates, the median was used), and on a scored round what was chosen."""
        return dict(self._last)


@dataclass(frozen=True)
class Krum(MultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017, Section 4): the next global model is the single update with the
    lowest score; `krum_selected_client` in the round metrics names it. Multi-Krum with m = 1, including
    its fallback to the median on rounds with fewer than 2f + 3 updates."""

    num_selected: int = 1
    name: str = "krum"

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> "Krum":
        check_krum_config(config)
        return cls(num_byzantine=config.strategy.num_byzantine)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_selected != 1:
            raise ValueError(f"Krum selects exactly one update, got num_selected={self.num_selected} "
                             f"(use strategy.name='multi_krum' to average several)")

    def describe(self, chosen: Sequence[ClientUpdate]) -> dict[str, float]:
        return {"krum_fallback": 0.0, "krum_selected_client": float(chosen[0].client)}
