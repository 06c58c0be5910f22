"""Peak extra memory and seconds per call of the per-round update statistics (each update's norm and its
cosine to the sample-weighted mean update) on the CNN of McMahan et al. 2017 (1,663,370 parameters) at 10,
50 and 100 clients per round: before (the stacking implementation, a K x P float64 matrix of all updates,
kept below as the baseline) and after (the streaming `workbench.updates.update_statistics`). Every
measurement runs in a fresh interpreter; the ratios before/after are printed in one table, with how far
the two disagree.

Memory is the peak above what the process held once the client states existed. On CPU: peak RSS, after
resetting the high-water mark (Linux: write 5 to /proc/self/clear_refs, read VmHWM), with a fixed glibc
mmap threshold (MALLOC_MMAP_THRESHOLD_=65536) so that every tensor over 64 KiB gets fresh pages and none
hides in memory an earlier free left resident. On CUDA: torch.cuda.max_memory_allocated. Time is measured
in separate interpreters with the default allocator settings, after one warm-up call, before and after
interleaved and repeated; medians are printed, and the minima (on a shared machine other work only ever adds
time).

    .venv/bin/python benchmarks/update_memory.py            # 10, 50 and 100 clients (minutes on 2 cores)
    .venv/bin/python benchmarks/update_memory.py --quick    # 10 clients
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import torch

from workbench.models import build_model
from workbench.updates import update_statistics

State = Mapping[str, torch.Tensor]
SHAPE, NUM_CLASSES = (1, 28, 28), 10


def stacked_statistics(global_state: State, states: Sequence[State],
                       weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """The baseline: workbench.updates.update_statistics as it was, all updates stacked in float64."""
    if not states:
        return [], []
    deltas = torch.stack([_flat_delta(s, global_state) for s in states])
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    mean = (w[:, None] * deltas).sum(0) / w.sum()
    norms = deltas.norm(dim=1)
    mean_norm = mean.norm()
    denominator = norms * mean_norm
    cosines = torch.where(denominator > 0, deltas @ mean / denominator.clamp_min(1e-300),
                          torch.zeros_like(norms))
    return norms.tolist(), cosines.tolist()


def _flat_delta(state: State, reference: State) -> torch.Tensor:
    return torch.cat([(state[k].double() - reference[k].double()).flatten()
                      for k in reference if reference[k].is_floating_point()])


IMPLEMENTATIONS: dict[str, Callable] = {"before": stacked_statistics, "after": update_statistics}


def client_round(num_clients: int, device: torch.device) -> tuple[dict, list[dict], list[int]]:
    """The CNN's global state and one state per client: a shared step plus a client's own step of its own
    size (so the cosines spread), and sample counts of 100-1200."""
    model = build_model("cnn", SHAPE, NUM_CLASSES, torch.Generator().manual_seed(0)).to(device)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    common = {k: 1e-3 * torch.randn(v.shape, generator=g).to(device) for k, v in global_state.items()}
    weights = torch.randint(100, 1201, (num_clients,), generator=g).tolist()
    states = []
    for client in range(num_clients):
        spread = 0.5 + 2.0 * client / max(1, num_clients - 1)
        states.append({k: v + common[k] + spread * 1e-3 * torch.randn(v.shape, generator=g).to(device)
                       for k, v in global_state.items()})
    return global_state, states, weights


def _kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def measure_memory(implementation: str, num_clients: int, device: torch.device) -> dict:
    global_state, states, weights = client_round(num_clients, device)
    torch.ones(1 << 20).sum()  # start the intra-op thread pool outside the count
    statistics = IMPLEMENTATIONS[implementation]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        norms, drifts = statistics(global_state, states, weights)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _kib("VmRSS")
        norms, drifts = statistics(global_state, states, weights)
        peak = (_kib("VmHWM") - before) * 1024
    return {"peak_bytes": peak, "norms": norms, "drifts": drifts}


def measure_time(implementation: str, num_clients: int, device: torch.device, min_seconds: float) -> dict:
    global_state, states, weights = client_round(num_clients, device)
    statistics = IMPLEMENTATIONS[implementation]

    def call():
        statistics(global_state, states, weights)
        if device.type == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up: thread pool, allocator, CUDA kernels
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return {"seconds": elapsed / calls, "calls": calls}


def in_fresh_interpreter(mode: str, implementation: str, num_clients: int, args) -> dict:
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--worker", mode, implementation, str(num_clients),
               "--device", args.device, "--min-time", str(args.min_time), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 clients per round only")
    parser.add_argument("--sizes", default="10,50,100", help="clients per round")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="each timing repeats a call until this many seconds have passed (mean per call)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 by default: on a loaded machine two threads that wait on "
                             "each other at every one of the thousands of small kernels make timings erratic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "IMPLEMENTATION", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.worker:
        mode, implementation, num_clients = args.worker[0], args.worker[1], int(args.worker[2])
        if mode == "memory":
            print(json.dumps(measure_memory(implementation, num_clients, device)))
        else:
            print(json.dumps(measure_time(implementation, num_clients, device, args.min_time)))
        return
    if device.type == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit("peak RSS needs Linux /proc/self/clear_refs (or run on CUDA)")
    sizes = [10] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    args.min_time = min(args.min_time, 0.5) if args.quick else args.min_time
    global_state, _, _ = client_round(1, torch.device("cpu"))
    num_parameters = sum(v.numel() for v in global_state.values())
    largest = max(v.numel() for v in global_state.values())
    memory_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"# CNN, {num_parameters:,} parameters (largest tensor {largest:,}); torch {torch.__version__}, "
          f"device {device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# memory: {memory_kind} above the client states; for scale, one K x P float64 matrix is "
          f"K x {num_parameters * 8 / 2**20:.1f} MiB, three float32 buffers of the largest tensor "
          f"{3 * largest * 4 / 2**20:.1f} MiB")
    rows = []
    for size in sizes:
        row = {"clients": size}
        for implementation in IMPLEMENTATIONS:
            row[implementation] = memory = in_fresh_interpreter("memory", implementation, size, args)
            memory["seconds"] = []
            print(f"  {size:3} clients  {implementation:6}  peak {memory['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
        for rep in range(repeats):
            order = list(IMPLEMENTATIONS) if rep % 2 == 0 else list(IMPLEMENTATIONS)[::-1]
            for implementation in order:
                timing = in_fresh_interpreter("time", implementation, size, args)
                row[implementation]["seconds"].append(timing["seconds"])
                print(f"  {size:3} clients  {implementation:6}  rep {rep + 1}  {timing['seconds'] * 1e3:9.1f} ms "
                      f"per call ({timing['calls']} calls)", flush=True)
        before, after = row["before"], row["after"]
        row["norm_rel"] = max(abs(a - b) / b for a, b in zip(after["norms"], before["norms"]))
        row["drift_abs"] = max(abs(a - b) for a, b in zip(after["drifts"], before["drifts"]))
        row["drift_range"] = (min(before["drifts"]), max(before["drifts"]))
        rows.append(row)
    print(f"\n# load average {os.getloadavg()[0]:.1f} at end; 'after vs before' is the largest disagreement "
          "over the clients (relative for norms, absolute for cosines)")
    header = ["clients", "peak before (MiB)", "peak after (MiB)", "before/after", "ms before", "ms after",
              "before/after", "min ms before", "min ms after", "norms after vs before",
              "cosines after vs before (range)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        before, after = row["before"], row["after"]
        median_before, median_after = (statistics.median(v["seconds"]) * 1e3 for v in (before, after))
        print(f"| {row['clients']} | {before['peak_bytes'] / 2**20:.1f} | {after['peak_bytes'] / 2**20:.1f} | "
              f"{before['peak_bytes'] / max(after['peak_bytes'], 1):.0f} | {median_before:.1f} | {median_after:.1f} | "
              f"{median_before / median_after:.2f} | {min(before['seconds']) * 1e3:.1f} | "
              f"{min(after['seconds']) * 1e3:.1f} | {row['norm_rel']:.1e} | "
              f"{row['drift_abs']:.1e} ({row['drift_range'][0]:.2f} to {row['drift_range'][1]:.2f}) |")


if __name__ == "__main__":
    main()
