"""How much MLflow tracking adds to the wall time of `make demo`'s runs (issue 4: at most 5%).

Runs the demo's FedAvg and FedProx configs with and without `MlflowCallback`, interleaved (untracked,
tracked, tracked, untracked, ...) so that drift in machine load hits both sides alike, against a fresh
local SQLite store (migrated before timing starts). Prints:

- wall: tracked / untracked run time - 1: the median over the interleaved pairs (each tracked run against
  the untracked run next to it, so slow spells of a shared machine cancel out), from the fastest run of
  each kind per algorithm, and from the sums;
- CPU: seconds of CPU the tracking took (inside the callback on the run's thread, plus the publishing
  thread's own CPU time) as a share of the tracked run's wall time: insensitive to load.

    .venv/bin/python benchmarks/tracking_overhead.py              # the demo: 40 rounds, 2 algorithms
    .venv/bin/python benchmarks/tracking_overhead.py --rounds 10 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from mlflow.tracking import MlflowClient

from workbench.cli import DEMO_OVERRIDES
from workbench.config import ExperimentConfig
from workbench.simulation import Callback, prepare, run
from workbench.tracking import MlflowCallback, local_store_uri


class CpuTimedPool:
    """Wraps the callback's publishing thread pool and adds up the CPU time its jobs take on that thread."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def submit(self, fn, *args):
        def timed():
            started = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.seconds += time.thread_time() - started
        return self.inner.submit(timed)

    def shutdown(self, **options):
        self.inner.shutdown(**options)


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
        walls: dict[tuple[str, bool], list[float]] = {}
        in_callback = published = 0.0
        print(f"{'algorithm':10s} {'tracked':>8s} {'seconds':>9s} {'in callback':>12s} {'publisher CPU':>14s}")
        for repeat in range(args.repeats):
            for name in ("fedavg", "fedprox"):
                config = base.with_overrides({"strategy.name": name})
                order = (False, True) if repeat % 2 == 0 else (True, False)
                for is_tracked in order:
                    federation = prepare(config)  # as `workbench demo` does, outside the timed run
                    callbacks = []
                    if is_tracked:
                        tracker = MlflowCallback(uri, experiment="overhead", state_dir=folder)
                        tracker._publisher = pool = CpuTimedPool(tracker._publisher)
                        callbacks = [Timed(tracker)]
                    started = time.perf_counter()
                    run(federation, callbacks)
                    seconds = time.perf_counter() - started
                    walls.setdefault((name, is_tracked), []).append(seconds)
                    spent = callbacks[0].seconds if callbacks else 0.0
                    background = pool.seconds if callbacks else 0.0
                    in_callback += spent
                    published += background
                    print(f"{name:10s} {str(is_tracked):>8s} {seconds:9.2f} {spent:12.3f} {background:14.3f}",
                          flush=True)
    names = sorted({name for name, _ in walls})
    pairs = [tracked / untracked for name in names for tracked, untracked in zip(walls[name, True], walls[name, False])]
    print(f"\ntracking overhead, wall (median of {len(pairs)} pairs): {statistics.median(pairs) - 1:+.2%} "
          f"(pairs: {', '.join(f'{r - 1:+.1%}' for r in pairs)})")
    fastest = {t: sum(min(walls[name, t]) for name in names) for t in (False, True)}
    total = {t: sum(sum(walls[name, t]) for name in names) for t in (False, True)}
    print(f"tracking overhead, wall (fastest runs): {fastest[True] / fastest[False] - 1:+.2%} "
          f"(tracked {fastest[True]:.1f} s vs untracked {fastest[False]:.1f} s)")
    print(f"tracking overhead, wall (all runs):     {total[True] / total[False] - 1:+.2%} "
          f"(tracked {total[True]:.1f} s vs untracked {total[False]:.1f} s)")
    print(f"tracking CPU: {(in_callback + published) / total[True]:.2%} of tracked run time "
          f"(in callback {in_callback / total[True]:.2%}, publishing thread {published / total[True]:.2%})")


if __name__ == "__main__":
    main()
