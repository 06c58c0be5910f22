"""Seconds per round of every executor against the plain sequential loop and a centralized large-batch
pass over the same samples (the limit proxy), on the FedAvg standard workload of McMahan et al. 2017:
MNIST-shaped generated data, 100 clients of 600 samples, E = 1, B = 10, SGD; the 2NN and the CNN at 10, 50
and 100 clients per round. Variants are interleaved and repeated in one run; medians are printed with the
ratios fast/limit and sequential/fast.

    .venv/bin/python benchmarks/round_speed.py            # the full table (many minutes on 2 cores)
    .venv/bin/python benchmarks/round_speed.py --quick    # 10 clients per round, fewer repeats

With Ray installed (`pip install 'fl-workbench[ray]'`), the Ray executor (one actor of one CPU per core on a
local instance) runs beside the others; its start-up (ray.init, actors, first round) is printed on its own and a
third table gives its seconds per round against the processes executor's.

A second table prices the strategies: whole rounds (`simulation.run_round`: plan, train, finish, aggregate,
measure; no evaluation) of SCAFFOLD and FedAdam against FedAvg's on the same executor, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import ExperimentConfig, TrainingConfig
from workbench.execution import (ClientTask, ProcessExecutor, RayExecutor, SequentialExecutor, VectorizedExecutor,
                                 close_pools, usable_cpus)
from workbench.models import build_model
from workbench.simulation import Federation, run_round
from workbench.data import Dataset
from workbench.strategies import aggregate_by_samples, base_objective, build_strategy

NUM_CLIENTS, SAMPLES_PER_CLIENT, SHAPE, NUM_CLASSES = 100, 600, (1, 28, 28), 10
TRAINING = TrainingConfig(local_epochs=1, batch_size=10, lr=0.05)
OBJECTIVE = base_objective(TRAINING, 1)


def mnist_shaped(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """60,000 learnable 28x28 images: a random prototype per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (NUM_CLIENTS * SAMPLES_PER_CLIENT,), generator=g)
    prototypes = torch.rand(NUM_CLASSES, *SHAPE, generator=g)
    x = prototypes[y] + 0.5 * torch.randn(len(y), *SHAPE, generator=g)
    return x, y


def cohort(size: int, round_: int) -> list[ClientTask]:
    g = torch.Generator().manual_seed(1000 + round_)
    clients = torch.randperm(NUM_CLIENTS, generator=g)[:size].sort().values.tolist()
    return [ClientTask(c, torch.arange(c * SAMPLES_PER_CLIENT, (c + 1) * SAMPLES_PER_CLIENT), TRAINING.local_epochs,
                       False, 7919 * round_ + c) for c in clients]


def centralized_pass(model, x, y, tasks, batch_size: int) -> None:
    """One epoch of plain SGD over the cohort's samples in large batches: the same arithmetic as the
    round (same samples, same model), with none of its per-client overhead."""
    indices = torch.cat([t.indices for t in tasks])
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAINING.lr)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def timed(fn, min_seconds: float = 0.0) -> float:
    """Seconds per call of `fn`: the mean over as many calls as fill `min_seconds` (at least one), so
    that sub-second rounds are not single noisy samples."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


def import_seconds() -> float:
    """What a worker pays to import torch and workbench (excluded from the start-up target)."""
    code = ("import time; t = time.perf_counter(); import workbench.execution.processes; "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 clients per round only, 2 repeats")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--sizes", default="10,50,100")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="each timing repeats a round until this many seconds have passed (mean per round)")
    parser.add_argument("--limit-batch", type=int, default=100, help="batch size of the centralized pass")
    parser.add_argument("--strategies", default="fedavg,scaffold,fedadam",
                        help="strategies priced in the second table (the first is the baseline)")
    parser.add_argument("--only", default="", metavar="LABELS",
                        help="time only these variants (comma-separated labels, e.g. processes,ray: then only the "
                             "Ray table is printed)")
    parser.add_argument("--no-ray", action="store_true", help="leave the Ray executor out even when Ray is installed")
    parser.add_argument("--vectorized-max", type=int, default=10,
                        help="largest cohort for the vectorized executor on CPU (it is slow there)")
    args = parser.parse_args()
    sizes = [10] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = min(2, args.repeats) if args.quick else args.repeats
    models = args.models.split(",")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"# {usable_cpus()} CPU cores, torch {torch.__version__}, device {device}, "
          f"load average {os.getloadavg()[0]:.1f} at start")

    x, y = mnist_shaped()
    x, y = x.to(device), y.to(device)
    nets = {name: build_model(name, SHAPE, NUM_CLASSES, torch.Generator().manual_seed(0)).to(device)
            for name in models}

    # --- start-up: a fresh pool, its first round, and what imports cost in it ---
    if not on_gpu:
        imports = import_seconds()
        started = time.perf_counter()
        probe = ProcessExecutor(nets[models[0]])
        probe._pool.wait_ready()
        ready = time.perf_counter() - started
        boot = max(probe._pool.boot_s)
        global_state = {k: v.detach().clone() for k, v in nets[models[0]].state_dict().items()}
        first = timed(lambda: probe.run_cohort(global_state, cohort(10, 0), x, y, OBJECTIVE))
        second = timed(lambda: probe.run_cohort(global_state, cohort(10, 0), x, y, OBJECTIVE))
        print(f"# start-up ({models[0]}, 10 clients): workers ready {ready:.2f} s, of which interpreter start "
              f"and imports in the slowest worker {boot:.2f} s (imports alone, one process on its own: "
              f"{imports:.2f} s); first round {first:.2f} s, next {second:.2f} s; start-up excluding imports "
              f"= ready - boot + first - next = {ready - boot + first - second:.2f} s")

    with_ray = not args.no_ray and ray_installed()
    if with_ray:
        started = time.perf_counter()
        probe = RayExecutor(nets[models[0]], cpus_per_client=1)  # starts the local Ray instance
        connected = time.perf_counter() - started
        global_state = {k: v.detach().clone() for k, v in nets[models[0]].state_dict().items()}
        first = timed(lambda: probe.run_cohort(global_state, cohort(10, 0), x, y, OBJECTIVE))
        second = timed(lambda: probe.run_cohort(global_state, cohort(10, 0), x, y, OBJECTIVE))
        print(f"# Ray start-up ({models[0]}, 10 clients): ray.init of a local instance {connected:.2f} s; first "
              f"round (actors start, data and model reach them) {first:.2f} s, next {second:.2f} s; start-up = "
              f"init + first - next = {connected + first - second:.2f} s")

    variants: dict[str, object] = {}

    def executors(name):
        model = nets[name]
        made = {"sequential t1": (SequentialExecutor(model), 1)}
        if usable_cpus() > 1:
            made["sequential t2"] = (SequentialExecutor(model), 2)
        if not on_gpu:
            made["processes"] = (ProcessExecutor(model), 1)
            if ProcessExecutor(model).uses_kernel:
                made["processes, no fused kernel"] = (ProcessExecutor(model, use_kernel=False), 1)
        made["vectorized"] = (VectorizedExecutor(model), usable_cpus())
        if with_ray:
            made["ray"] = (RayExecutor(model, cpus_per_client=1), 1)
        return made

    results: dict[tuple[str, int, str], list[float]] = {}
    for rep in range(repeats):
        for name in models:
            variants = executors(name)
            global_state = {k: v.detach().clone() for k, v in nets[name].state_dict().items()}
            for size in sizes:
                tasks = cohort(size, rep + 1)
                # the sequential loop's thread setting is compared at the smallest cohort only (time)
                plan = [(label, ex, threads) for label, (ex, threads) in variants.items()
                        if not (label == "vectorized" and not on_gpu and size > args.vectorized_max)
                        and not (label == "sequential t2" and size > min(sizes))]
                plan += [(f"limit t{t}", None, t) for t in sorted({1, usable_cpus()})]
                if args.only:
                    plan = [step for step in plan if step[0] in args.only.split(",")]
                shift = rep % len(plan)  # rotate the order each repeat: no variant always runs first
                for label, executor, threads in plan[shift:] + plan[:shift]:
                    torch.set_num_threads(threads)
                    if executor is None:
                        scratch = build_model(name, SHAPE, NUM_CLASSES, torch.Generator().manual_seed(0)).to(device)
                        seconds = timed(lambda: centralized_pass(scratch, x, y, tasks, args.limit_batch),
                                        args.min_time)
                    else:
                        seconds = timed(lambda: aggregate_by_samples(global_state, executor.run_cohort(
                            global_state, tasks, x, y, OBJECTIVE)), args.min_time)
                    if on_gpu:
                        torch.cuda.synchronize()
                    results.setdefault((name, size, label), []).append(seconds)
                    print(f"  rep {rep + 1} {name:4} {size:3} clients  {label:28} {seconds:8.3f} s", flush=True)
    if args.only:
        print_ray_table(results, models, sizes)
        close_pools()
        return
    strategy_costs = price_strategies(args, nets, x, y, device, min(sizes), repeats)

    print(f"\n# seconds per round, median of {repeats} (load average {os.getloadavg()[0]:.1f} at end); on a shared "
          "machine compare the minima too (other work only ever adds time):")
    for (name, size, label), values in results.items():
        print(f"#   {name:4} {size:3} clients  {label:28} min {min(values):8.3f} s")
    header = ["model", "clients", "sequential (best threads)", "fast (auto)", "other variants", "limit (best)",
              "fast/limit", "sequential/fast"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    fast_label = "vectorized" if on_gpu else "processes"
    for name in models:
        for size in sizes:
            med = {label: statistics.median(v) for (n, s, label), v in results.items() if (n, s) == (name, size)}
            seq_label = min((l for l in med if l.startswith("sequential")), key=med.get)
            limit_label = min((l for l in med if l.startswith("limit")), key=med.get)
            others = ", ".join(f"{l} {v:.2f}" for l, v in med.items()
                               if l not in (seq_label, limit_label, fast_label) and not l.startswith(("limit", "seq")))
            fast = med[fast_label]
            print(f"| {name} | {size} | {med[seq_label]:.2f} ({seq_label[-2:]}) | {fast:.2f} | {others} | "
                  f"{med[limit_label]:.2f} ({limit_label[-2:]}) | {fast / med[limit_label]:.2f} | "
                  f"{med[seq_label] / fast:.2f} |")
    if with_ray and not on_gpu:
        print_ray_table(results, models, sizes)
    print_strategy_table(strategy_costs, args.strategies.split(","))
    close_pools()


def print_ray_table(results: dict[tuple[str, int, str], list[float]], models: list[str], sizes: list[int]) -> None:
    print("\n# the Ray executor against the processes executor (the same workers: one per core, whole clients, "
          "the fused kernel where it applies), seconds per round: median (min)")
    print("| model | clients | processes | ray | ray/processes (medians) |")
    print("|---|---|---|---|---|")
    for name in models:
        for size in sizes:
            runs = {label: v for (n, s, label), v in results.items() if (n, s) == (name, size)}
            if not {"processes", "ray"} <= set(runs):
                continue
            med = {label: statistics.median(v) for label, v in runs.items()}
            print(f"| {name} | {size} | {med['processes']:.3f} ({min(runs['processes']):.3f}) | {med['ray']:.3f} "
                  f"({min(runs['ray']):.3f}) | {med['ray'] / med['processes']:.2f} |")


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def benchmark_federation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                         strategy: str, size: int) -> Federation:
    """The benchmark's workload as a `Federation` (100 clients of 600 samples), for whole rounds."""
    config = ExperimentConfig().with_overrides({
        "federation.num_clients": NUM_CLIENTS, "federation.clients_per_round": size, "federation.rounds": 10**6,
        "evaluation.every": 10**6, "training.local_epochs": TRAINING.local_epochs,
        "training.batch_size": TRAINING.batch_size, "training.lr": TRAINING.lr, "strategy.name": strategy})
    dataset = Dataset("mnist_shaped", x, y, x[:10], y[:10], NUM_CLASSES)
    clients = [np.arange(c * SAMPLES_PER_CLIENT, (c + 1) * SAMPLES_PER_CLIENT) for c in range(NUM_CLIENTS)]
    return Federation(config, dataset, clients, copy.deepcopy(model), build_strategy(config), device, {})


def price_strategies(args, nets, x, y, device, size: int, repeats: int) -> dict[tuple[str, str, str], list[float]]:
    """Seconds per whole round of each strategy on each executor (the fast one and the reference)."""
    on_gpu = device.type == "cuda"
    costs: dict[tuple[str, str, str], list[float]] = {}
    strategies = args.strategies.split(",")
    for rep in range(repeats):
        for name, model in nets.items():
            executors = {"sequential": SequentialExecutor(model),
                         "vectorized" if on_gpu else "processes": (VectorizedExecutor if on_gpu else ProcessExecutor)(model)}
            for executor_name, executor in executors.items():
                torch.set_num_threads(1 if executor_name == "sequential" and not on_gpu else usable_cpus())
                order = strategies[rep % len(strategies):] + strategies[:rep % len(strategies)]
                for strategy in order:
                    federation = benchmark_federation(model, x, y, device, strategy, size)
                    run_round(federation, executor, 1)  # state (variates, moments) exists from here on
                    rounds = iter(range(2, 10**6))
                    seconds = timed(lambda: run_round(federation, executor, next(rounds)), args.min_time)
                    costs.setdefault((name, executor_name, strategy), []).append(seconds)
                    print(f"  rep {rep + 1} {name:4} {size:3} clients  {executor_name:12} {strategy:10} "
                          f"{seconds:8.3f} s", flush=True)
    return costs


def print_strategy_table(costs: dict[tuple[str, str, str], list[float]], strategies: list[str]) -> None:
    baseline, others = strategies[0], strategies[1:]
    header = ["model", "executor", *(f"{s} (s)" for s in strategies), *(f"{s}/{baseline}" for s in others)]
    print("\n# whole rounds per strategy, median seconds and the ratio to " + baseline)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, executor in dict.fromkeys((n, e) for n, e, _ in costs):
        med = {s: statistics.median(costs[(name, executor, s)]) for s in strategies}
        cells = [f"{med[s]:.3f}" for s in strategies] + [f"{med[s] / med[baseline]:.2f}" for s in others]
        print(f"| {name} | {executor} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
