"""How much MLflow tracking adds to the wall time of `make demo`'s runs (issue 4: at most 5%).

Runs the demo's FedAvg and FedProx configs with and without `MlflowCallback`, interleaved (untracked,
tracked, tracked, untracked, ...) so that drift in machine load hits both sides alike, against a fresh
local SQLite store (migrated before timing starts). Prints two ratios:

- wall: sum(tracked run time) / sum(untracked run time) - 1, the end-to-end cost (noisy on a busy machine);
- in callback: time spent inside the tracking callback / tracked run time (insensitive to load).

    .venv/bin/python benchmarks/tracking_overhead.py              # the demo: 40 rounds, 2 algorithms
    .venv/bin/python benchmarks/tracking_overhead.py --rounds 10 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mlflow.tracking import MlflowClient

from workbench.cli import DEMO_OVERRIDES
from workbench.config import ExperimentConfig
from workbench.simulation import Callback, prepare, run
from workbench.tracking import MlflowCallback, local_store_uri


class Timed(Callback):
    """Wraps a callback and adds up the time spent in it."""

    def __init__(self, inner: Callback):
        self.inner, self.seconds = inner, 0.0

    def _timed(self, method, *args):
        started = time.perf_counter()
        try:
            method(*args)
        finally:
            self.seconds += time.perf_counter() - started

    def on_run_start(self, federation):
        self._timed(self.inner.on_run_start, federation)

    def on_round_end(self, result, federation):
        self._timed(self.inner.on_round_end, result, federation)

    def on_run_end(self, history, federation, error):
        self._timed(self.inner.on_run_end, history, federation, error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DEMO_OVERRIDES["federation.rounds"])
    parser.add_argument("--repeats", type=int, default=1, help="untracked/tracked pairs per algorithm")
    args = parser.parse_args()
    base = ExperimentConfig().with_overrides({**DEMO_OVERRIDES, "federation.rounds": args.rounds})
    with tempfile.TemporaryDirectory() as folder:
        uri = local_store_uri(folder)
        MlflowClient(uri).search_experiments()  # migrations: once per store, not per run
        # Start the worker pool before timing: otherwise the first run, untracked, pays its start-up.
        run(base.with_overrides({"federation.rounds": 1}))
        walls = {True: 0.0, False: 0.0}
        in_callback = 0.0
        print(f"{'algorithm':10s} {'tracked':>8s} {'seconds':>9s} {'in callback':>12s}")
        for repeat in range(args.repeats):
            for name in ("fedavg", "fedprox"):
                config = base.with_overrides({"strategy.name": name})
                order = (False, True) if repeat % 2 == 0 else (True, False)
                for is_tracked in order:
                    federation = prepare(config)  # as `workbench demo` does, outside the timed run
                    callbacks = [Timed(MlflowCallback(uri, experiment="overhead", state_dir=folder))] if is_tracked else []
                    started = time.perf_counter()
                    run(federation, callbacks)
                    seconds = time.perf_counter() - started
                    walls[is_tracked] += seconds
                    spent = callbacks[0].seconds if callbacks else 0.0
                    in_callback += spent
                    print(f"{name:10s} {str(is_tracked):>8s} {seconds:9.2f} {spent:12.3f}")
    print(f"\ntracking overhead, wall: {walls[True] / walls[False] - 1:+.2%} "
          f"(tracked {walls[True]:.1f} s vs untracked {walls[False]:.1f} s)")
    print(f"tracking overhead, in callback: {in_callback / walls[True]:.2%} of tracked run time")


if __name__ == "__main__":
    main()
