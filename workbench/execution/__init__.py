"""How a cohort's updates are computed: the sequential reference, client-parallel worker processes, all
clients at once with stacked weights (torch.func), and Ray actors; `auto` picks the fast one that applies
(never Ray: that one is asked for)."""

from __future__ import annotations

import multiprocessing
import warnings

from torch import nn

from workbench.client import ClientTask
from workbench.execution.base import (DROP_REASONS, FAILURE_POLICIES, ClientDropped, ClientFailed, Executor,
                                      RunStopped, SequentialExecutor, batch_order, check_stop, default_threads,
                                      settle_failure, task_labels)
from workbench.execution.kernels import LocalTrainer, linear_chain, train_chain_locally
from workbench.execution import processes as _processes
from workbench.execution.processes import (ProcessExecutor, WorkerDied, describe_exit, model_payload, usable_cpus,
                                           user_modules, why_not_sendable)
from workbench.execution.ray_executor import RayExecutor, close_ray_pool, ray_pool
from workbench.execution.vectorized import VectorizedExecutor, batch_schedule, why_not_batchable

EXECUTORS = {"sequential": SequentialExecutor, "processes": ProcessExecutor, "vectorized": VectorizedExecutor,
             "ray": RayExecutor}

__all__ = ["ClientDropped", "ClientFailed", "DROP_REASONS", "FAILURE_POLICIES", "settle_failure",
           "ClientTask", "Executor", "RunStopped", "SequentialExecutor", "ProcessExecutor",
           "VectorizedExecutor", "RayExecutor", "EXECUTORS", "LocalTrainer", "WorkerDied", "batch_order", "batch_schedule",
           "build_executor", "check_stop", "close_pools", "default_threads", "describe_exit", "linear_chain",
           "model_payload", "ray_pool", "resolve_executor", "task_labels", "train_chain_locally", "usable_cpus",
           "user_modules", "why_not_batchable", "why_not_sendable"]


def close_pools() -> None:
    """Stop every worker process and Ray actor this session started, and the Ray instance if workbench
    started it (also run at interpreter exit)."""
    _processes.close_pools()
    close_ray_pool()


def resolve_executor(name: str, model: nn.Module) -> str:
    """The executor `name` stands for with this model on its device: `auto` is `vectorized` on a GPU
    (when the model can be batched), `processes` on a CPU with several cores (outside daemonic worker
    processes), else `sequential`.
    An explicit choice that cannot work here falls back, with a warning that says why; so does `auto` when
    the model cannot be sent to worker processes (`why_not_sendable`)."""
    device = next(model.parameters()).device
    reason = why_not_batchable(model)
    if name == "auto":
        if device.type != "cpu":
            return "vectorized" if reason is None else "sequential"
        # a daemonic process (a multiprocessing.Pool worker) may not start workers of its own
        if usable_cpus() == 1 or multiprocessing.current_process().daemon:
            return "sequential"
        return _sendable_or_sequential("auto", model)
    if name == "vectorized" and reason is not None:
        fallback = "processes" if device.type == "cpu" and usable_cpus() > 1 else "sequential"
        unsendable = why_not_sendable(model) if fallback == "processes" else None
        if unsendable is not None:
            fallback, reason = "sequential", f"{reason}; and {unsendable}"
        warnings.warn(f"execution.executor='vectorized' cannot batch this model ({reason}); "
                      f"using {fallback!r} instead", stacklevel=3)
        return fallback
    if name == "processes" and device.type != "cpu":
        fallback = "vectorized" if reason is None else "sequential"
        warnings.warn(f"execution.executor='processes' runs on CPU only, the model is on {device}; "
                      f"using {fallback!r} instead", stacklevel=3)
        return fallback
    if name == "processes":
        return _sendable_or_sequential(name, model)
    return name


def _sendable_or_sequential(name: str, model: nn.Module) -> str:
    unsendable = why_not_sendable(model)
    if unsendable is None:
        return "processes"
    warnings.warn(f"execution.executor={name!r}: {unsendable}; using 'sequential' instead", stacklevel=4)
    return "sequential"


def build_executor(name: str, model: nn.Module, *, workers: int = 0, ray_address: str = "",
                   cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, clients_per_round: int = 0,
                   on_client_failure: str = "fail", round_timeout_s: float = 0.0) -> Executor:
    """The executor called `name` (config key `execution.executor`, `auto` resolved by
    `resolve_executor`), working on copies of `model`; `workers` = processes for `processes`
    (0 = one per core); `ray_address`, `cpus_per_client`, `gpus_per_client`, `on_client_failure`,
    `round_timeout_s` for `ray`, whose actor pool is sized for `clients_per_round` (0 = as many actors as
    the cluster holds). The keywords are the `execution.*` keys of the same names."""
    resolved = resolve_executor(name, model)
    if resolved == "processes":
        return ProcessExecutor(model, workers)
    if resolved == "ray":
        return RayExecutor(model, address=ray_address, cpus_per_client=cpus_per_client,
                           gpus_per_client=gpus_per_client, clients_per_round=clients_per_round,
                           on_client_failure=on_client_failure, round_timeout_s=round_timeout_s)
    return EXECUTORS[resolved](model)
