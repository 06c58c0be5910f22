"""Time every partition scheme for 60k and 1M labels across 100, 1,000 and 10,000 clients, the feature
skews on 60k MNIST-sized images, and one PartitionExplorer update (60k Fashion-MNIST, 100 clients).

    .venv/bin/python benchmarks/partition_speed.py [--repeat 3] [--skip-explorer]

Prints the best of `--repeat` wall times. Target: dirichlet, 1M labels, 10,000 clients < 1 s; an
explorer update < 300 ms. The machine's load average is printed too: on a shared machine it explains
most of the spread between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from workbench.config import PARTITION_SCHEMES, ExperimentConfig, PartitionConfig
from workbench.partition import apply_feature_skew, partition

SIZES = (60_000, 1_000_000)
CLIENTS = (100, 1_000, 10_000)
EXTRA = {"dirichlet a=0.01 min=5": PartitionConfig(scheme="dirichlet", alpha=0.01, min_size=5)}


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def time_schemes(repeat: int) -> None:
    rng = np.random.default_rng(0)
    configs = {s: PartitionConfig(scheme=s) for s in PARTITION_SCHEMES if s not in ("natural", "auto")} | EXTRA  # auto is one of them
    print(f"{'scheme':26s}" + "".join(f"{f'{n // 1000}k/{c}':>12s}" for n in SIZES for c in CLIENTS))
    labels = {n: rng.integers(0, 10, n) for n in SIZES}  # 10 classes, MNIST-like
    natural = {(n, c): np.array_split(np.arange(n), c) for n in SIZES for c in CLIENTS}
    for name, config in [*configs.items(), ("natural", PartitionConfig(scheme="natural"))]:
        cells = []
        for n in SIZES:
            for c in CLIENTS:
                t = best_time(lambda: partition(labels[n], c, config, np.random.default_rng(1),
                                                natural=natural[(n, c)]), repeat)
                cells.append(f"{t:11.3f}s")
        print(f"{name:26s}" + "".join(cells))
    t = best_time(lambda: partition(labels[1_000_000], 10_000, PartitionConfig(scheme="dirichlet"),
                                    np.random.default_rng(1)), repeat)
    print(f"\ndirichlet, 1M labels, 10,000 clients: {t:.3f} s = {t / 1.0:.2f} x the 1 s target")


def time_feature_skew(repeat: int) -> None:
    x = torch.randn(60_000, 1, 28, 28)
    print("\nfeature skew on 60k x 1 x 28 x 28 inputs (plus the iid partition they use):")
    for clients in (100, 10_000):
        for scheme in ("feature_noise", "rotation"):
            config = PartitionConfig(scheme=scheme)
            parts = partition(np.zeros(60_000, dtype=int), clients, config, np.random.default_rng(0))
            t = best_time(lambda: apply_feature_skew(x, parts, config, np.random.default_rng(1)), repeat)
            print(f"  {scheme:14s} {clients:>6d} clients {t:7.3f} s")


def time_explorer(repeat: int) -> None:
    from workbench.ui import PartitionExplorer

    config = ExperimentConfig().with_overrides({"data.name": "fashion_mnist", "partition.scheme": "dirichlet",
                                                "federation.num_clients": 100})
    try:
        explorer = PartitionExplorer(config)
    except Exception as err:  # noqa: BLE001 - report and go on: the other numbers stand alone
        print(f"\nexplorer: skipped ({err})")
        return
    if explorer.error:
        print(f"\nexplorer: skipped ({explorer.error})")
        return
    times = []
    changes = [("partition.alpha", a) for a in (0.05, 0.3, 3.0)] + [
        ("partition.scheme", s) for s in ("shards", "classes_per_client", "quantity", "mixture", "dirichlet")]
    for _ in range(repeat):
        for key, value in changes:
            explorer.controls[key].value = value
            assert not explorer.error, explorer.error
            times.append(explorer.last_update_s)
    print(f"\nexplorer update, {len(explorer.stats.sizes)} clients, {int(explorer.summary['num_samples']):,} "
          f"samples, {len(times)} changes: median {1000 * statistics.median(times):.0f} ms, "
          f"best {1000 * min(times):.0f} ms, worst {1000 * max(times):.0f} ms (target < 300 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-explorer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch threads 1\n")
    time_schemes(args.repeat)
    time_feature_skew(args.repeat)
    if not args.skip_explorer:
        time_explorer(args.repeat)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
