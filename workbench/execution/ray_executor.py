"""Client updates on a pool of Ray actors (a local Ray instance or a cluster), each holding a scratch model
and the training data, running the same `LocalTrainer` on whole clients as the processes executor.

Ray is optional: it is imported only when this executor is used, so the base install runs without it."""

from __future__ import annotations

import atexit
import collections
import copy
import dataclasses
import math
import pickle
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from workbench.client import ClientTask, ClientUpdate, LocalObjective, gradient_correction
from workbench.execution.base import (ClientDropped, batch_order, check_stop, default_threads, settle_failure,
                                      task_labels)
from workbench.execution.kernels import LocalTrainer, linear_chain
from workbench.execution.processes import model_payload, usable_cpus

#: how often the driver looks at `stop` (and the round's deadline) while every actor is busy
_POLL_S = 0.05
#: a failed client update is tried this often in all (once, then once more on another worker)
MAX_ATTEMPTS = 2
#: how long new actors may take to start before the cluster is taken to lack room for them
ACTOR_START_LIMIT_S = 120.0
INSTALL_HINT = "pip install 'fl-workbench[ray]'"


def import_ray() -> Any:
    """The `ray` module, or ValueError naming the config key and how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ValueError(f"execution.executor='ray' needs Ray, which is not installed here ({err}); install it "
                         f"with `{INSTALL_HINT}`, or choose execution.executor=processes or sequential") from err
    return ray


class ClientWorker:
    """A Ray actor's state: a scratch model and the training data, each received once and kept by key."""

    def __init__(self, threads: int):
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch's intra-op pool is set here, on purpose
        torch.set_num_threads(threads)
        self.device = torch.device("cuda") if self._has_gpu() else torch.device("cpu")
        self.model_key = self.data_key = self.state_key = None
        self.trainer: LocalTrainer | None = None
        self.names: list[str] = []
        self.x = self.y = None
        self.global_state: dict[str, torch.Tensor] = {}

    @staticmethod
    def _has_gpu() -> bool:
        import ray

        return bool(ray.get_gpu_ids()) and torch.cuda.is_available()

    def describe(self) -> dict[str, Any]:
        import os

        import ray

        return {"threads": torch.get_num_threads(), "pid": os.getpid(), "device": str(self.device),
                "node": ray.get_runtime_context().get_node_id()}

    def train(self, model: tuple, data: tuple, state: tuple, task: ClientTask, objective: LocalObjective,
              correction: list[torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], float, str]:
        """One client's update and the id of the node that computed it. `model`, `data`, `state` are
        (key, [object ref]): the ref is fetched only when the key differs from the one held (the list keeps
        Ray from fetching it for every call)."""
        import ray

        if model[0] != self.model_key:
            payload, use_kernel = ray.get(model[1][0])
            self.trainer = LocalTrainer(pickle.loads(payload).to(self.device), use_kernel=use_kernel)
            self.names = [name for name, _ in self.trainer.model.named_parameters()]
            self.model_key = model[0]
        if data[0] != self.data_key:
            x, y = ray.get(data[1][0])
            self.x, self.y, self.data_key = x.to(self.device), y.to(self.device), data[0]
        if state[0] != self.state_key:
            self.global_state = {k: v.to(self.device) for k, v in ray.get(state[1][0]).items()}
            self.state_key = state[0]
        indices = task.indices.to(self.device)
        if correction is not None:
            correction = [c.to(self.device) for c in correction]
        new_state, loss = self.trainer(self.global_state, self.x[indices], task_labels(self.y, task, objective),
                                       objective, num_epochs=task.num_epochs, generator=batch_order(task),
                                       correction=correction)
        return {k: v.cpu() for k, v in new_state.items()}, loss, ray.get_runtime_context().get_node_id()


class RayPool:
    """The session's Ray actors, kept between runs and resized to each cohort."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actors: list[Any] = []
        self.shape: tuple[float, float, int] | None = None  # (cpus, gpus, threads) the actors were made with
        self.started_ray = False
        self.address: str | None = None
        self._data: tuple | None = None
        self._data_ref: Any = None
        self.data_key = 0
        self.state_key = 0

    def connect(self, address: str) -> Any:
        """Ray, started (address "": a local instance with this machine's cores) or joined (`auto`,
        host:port) on first use; an instance already running in this process is reused."""
        ray = import_ray()
        if not ray.is_initialized():
            local = address == ""
            try:
                ray.init(address="local" if local else address, num_cpus=usable_cpus() if local else None,
                         include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            except ConnectionError as err:
                raise ValueError(f"execution.ray_address={address!r}: no Ray cluster answers there ({err}); start "
                                 "one with `ray start --head`, or leave ray_address empty for a local "
                                 "instance") from err
            self.started_ray = True
            self.address = address
        elif self.address is None:
            self.address = address
        return ray

    def capacity(self, ray: Any, cpus: float, gpus: float) -> int:
        """How many actors of `cpus` CPUs and `gpus` GPUs the cluster holds at once."""
        resources = ray.cluster_resources()
        fits = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
        if gpus > 0:
            fits = min(fits, math.floor(resources.get("GPU", 0) / gpus + 1e-9))
        return fits

    def resize(self, ray: Any, num_actors: int, cpus: float, gpus: float, threads: int) -> list[Any]:
        shape = (cpus, gpus, threads)
        if shape != self.shape:
            self.kill(ray)
            self.shape = shape
        for actor in self.actors[num_actors:]:
            ray.kill(actor)
        del self.actors[num_actors:]
        started = [self._new_actor(ray) for _ in range(num_actors - len(self.actors))]
        if started:
            ready, _ = ray.wait([actor.describe.remote() for actor in started], num_returns=len(started),
                                timeout=ACTOR_START_LIMIT_S)
            if len(ready) < len(started):
                for actor in started:
                    ray.kill(actor)
                raise RuntimeError(
                    f"Ray started {len(ready)} of {len(started)} actors of {cpus:g} CPUs and {gpus:g} GPUs within "
                    f"{ACTOR_START_LIMIT_S:g} s (cluster {ray.cluster_resources()}, free {ray.available_resources()});"
                    " other jobs may hold the resources: lower execution.cpus_per_client / gpus_per_client, or "
                    "federation.clients_per_round, or add nodes")
            self.actors += started
        return self.actors

    def _new_actor(self, ray: Any) -> Any:
        cpus, gpus, threads = self.shape
        return ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(ClientWorker).remote(threads)

    def replace(self, ray: Any, actor: Any) -> Any:
        """A fresh actor in the place of `actor` (dead, or killed because its client timed out)."""
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass
        fresh = self._new_actor(ray)
        self.actors = [fresh if a is actor else a for a in self.actors]
        return fresh

    def data_ref(self, ray: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[int, list]:
        """(key, [ref]) of (x, y) in the object store: put once per dataset, again only when it changes."""
        data = self._data
        if not (data is not None and data[0]() is x and data[1]() is y and data[2:] == (x._version, y._version)):
            self._data_ref = ray.put((x.detach().cpu(), y.detach().cpu()))
            self._data = (weakref.ref(x), weakref.ref(y), x._version, y._version)
            self.data_key += 1
        return self.data_key, [self._data_ref]

    def kill(self, ray: Any) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.shape = None

    def close(self) -> None:
        """Kill the actors; shut Ray down when workbench started it."""
        import sys

        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            self.actors, self.shape = [], None
            return
        self.kill(ray)
        self._data = self._data_ref = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray, self.address = False, None


_POOL = RayPool()


def ray_pool() -> RayPool:
    """The session's one Ray actor pool."""
    return _POOL


def close_ray_pool() -> None:
    with _POOL.lock:
        _POOL.close()


atexit.register(close_ray_pool)


class RayExecutor:
    """Clients spread over Ray actors of `cpus_per_client` CPUs (and `gpus_per_client` GPUs) each, every
    actor taking the next client when it is free and running `LocalTrainer` on it, so every update is
    computed exactly as the sequential executor computes it. The driver keeps the global model, the
    aggregation and the per-client strategy state.

    Faults are bounded: a client update that raises, or whose worker process dies, is tried once more on
    another actor (a dead actor is replaced); if that fails too, `on_client_failure` decides (`fail`: raise
    `ClientFailed`; `drop`: a `ClientDropped` in its place). With `round_timeout_s`, the clients not done
    when the round has run that long are dropped as timed out, and the actors still busy with them are
    replaced."""

    name = "ray"

    def __init__(self, model: nn.Module, *, address: str = "", cpus_per_client: float = 1.0,
                 gpus_per_client: float = 0.0, clients_per_round: int = 0, use_kernel: bool = True,
                 on_client_failure: str = "fail", round_timeout_s: float = 0.0):
        on_cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
        try:
            payload = model_payload(on_cpu)
        except ValueError as err:
            raise ValueError(f"execution.executor='ray': {err} (use execution.executor=sequential, or keep such "
                             "objects out of the model's attributes)") from err
        self._payload = (payload, use_kernel and linear_chain(model) is not None)
        self._names = [name for name, _ in model.named_parameters()]
        self._device = next(model.parameters()).device
        self.cpus_per_client, self.gpus_per_client = float(cpus_per_client), float(gpus_per_client)
        self.actor_threads = int(self.cpus_per_client) or 1
        self.address = address
        self.on_client_failure, self.round_timeout_s = on_client_failure, float(round_timeout_s)
        #: client updates computed per Ray node id, over this executor's life
        self.updates_per_node: collections.Counter[str] = collections.Counter()
        self._ray = _POOL.connect(address)
        self._capacity = _POOL.capacity(self._ray, self.cpus_per_client, self.gpus_per_client)
        if self._capacity < 1:
            resources = self._ray.cluster_resources()
            raise ValueError(f"execution.cpus_per_client={cpus_per_client:g} and execution.gpus_per_client="
                             f"{gpus_per_client:g}: no actor fits the Ray cluster (CPU {resources.get('CPU', 0):g}, "
                             f"GPU {resources.get('GPU', 0):g}); lower them or add nodes")
        self._model_ref = self._ray.put(self._payload)
        self._model_key = id(self)
        self.threads = default_threads(model)  # the driver: aggregation and evaluation
        planned = min(clients_per_round, self._capacity) if clients_per_round else self._capacity
        self.settings = {"executor": self.name, "ray_address": address, "num_actors": planned,
                         "cpus_per_client": self.cpus_per_client, "gpus_per_client": self.gpus_per_client,
                         "actor_threads": self.actor_threads, "fused_kernel": self._payload[1],
                         "on_client_failure": on_client_failure, "round_timeout_s": self.round_timeout_s}

    def why_not_supported(self, objective: LocalObjective) -> str | None:
        return None  # the actors run `train_locally` (or the kernel where it applies) on whole clients

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, objective: LocalObjective,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate | ClientDropped]:
        check_stop(stop)
        if not tasks:
            return []
        started = time.monotonic()
        ray = self._ray = _POOL.connect(self.address)
        with _POOL.lock:
            _POOL.resize(ray, min(len(tasks), self._capacity), self.cpus_per_client, self.gpus_per_client,
                         self.actor_threads)
            data = _POOL.data_ref(ray, x, y)
            _POOL.state_key += 1
            state = (_POOL.state_key, [ray.put({k: v.detach().cpu() for k, v in global_state.items()})])
            cohort = _Cohort(ray, tasks, self._names, ((self._model_key, [self._model_ref]), data, state),
                             objective)
            deadline = started + self.round_timeout_s if self.round_timeout_s else None
            try:
                cohort.assign()
                while cohort.pending:
                    check_stop(stop)
                    wait_s = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
                    done, _ = ray.wait(list(cohort.pending), num_returns=1, timeout=wait_s)
                    for ref in done:
                        row = cohort.collect(ref, self.on_client_failure)
                        if row is not None:
                            self.updates_per_node[cohort.nodes[row]] += 1
                            if on_update is not None:
                                on_update(tasks[row].client)
                        check_stop(stop)
                    if deadline is not None and time.monotonic() >= deadline:
                        cohort.time_out(self.round_timeout_s)
                        break
                    cohort.assign()
            except BaseException:
                cohort.abandon()
                raise
        outcomes: list[ClientUpdate | ClientDropped] = []
        for row, task in enumerate(tasks):
            result = cohort.outcomes[row]
            if isinstance(result, ClientDropped):
                outcomes.append(result)
                continue
            new_state, loss = result
            outcomes.append(ClientUpdate(task.client, {k: v.to(self._device) for k, v in new_state.items()},
                                         len(task.indices), task.num_epochs, loss, task.is_partial))
        return outcomes


class _Cohort:
    """One round's bookkeeping on the pool's actors (the caller holds the pool's lock): which task waits,
    which actor computes which task, how often each was tried, and each task's outcome."""

    def __init__(self, ray: Any, tasks: Sequence[ClientTask], names: list[str], refs: tuple,
                 objective: LocalObjective):
        self.ray, self.tasks, self.names, self.refs, self.objective = ray, tasks, names, refs, objective
        self.queue: collections.deque[int] = collections.deque(range(len(tasks)))
        self.idle: list[Any] = list(_POOL.actors)
        self.pending: dict[Any, tuple[Any, int]] = {}
        self.attempts = [0] * len(tasks)
        self.failed_on: dict[int, Any] = {}
        self.nodes: dict[int, str] = {}
        self.outcomes: dict[int, tuple[dict[str, torch.Tensor], float] | ClientDropped] = {}

    def assign(self) -> None:
        """Give waiting tasks to idle actors, in order; a retried task goes to another actor than the one it
        failed on, unless there is no other."""
        for row in list(self.queue):
            if not self.idle:
                return
            avoid = self.failed_on.get(row)
            actor = next((a for a in self.idle if a is not avoid), None)
            if actor is None and len(_POOL.actors) == 1:
                actor = self.idle[0]
            if actor is None:
                continue
            self.idle.remove(actor)
            self.queue.remove(row)
            self.submit(actor, row)

    def submit(self, actor: Any, row: int) -> None:
        task = self.tasks[row]
        correction = gradient_correction(task.payload, task.client_state, self.names)
        sent = dataclasses.replace(task, indices=task.indices.detach().cpu(), payload={}, client_state={})
        if correction is not None:
            correction = [c.detach().cpu() for c in correction]
        self.attempts[row] += 1
        self.pending[actor.train.remote(*self.refs, sent, self.objective, correction)] = (actor, row)

    def collect(self, ref: Any, policy: str) -> int | None:
        """The finished `ref`'s row when it brought an update, else None (retried, dropped, or raised
        `ClientFailed` by `policy`)."""
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        actor, row = self.pending.pop(ref)
        try:
            new_state, loss, node = self.ray.get(ref)
        except (RayActorError, WorkerCrashedError) as err:
            self.idle.append(_POOL.replace(self.ray, actor))
            self.failed(row, "worker_died", _first_line(err), None, policy)
            return None
        except RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            self.idle.append(actor)
            self.failed(row, "error", f"{type(cause).__name__}: {cause}", actor, policy)
            return None
        self.idle.append(actor)
        self.outcomes[row], self.nodes[row] = (new_state, loss), node
        return row

    def failed(self, row: int, reason: str, message: str, actor: Any, policy: str) -> None:
        """Try `row` again on another actor, or, after `MAX_ATTEMPTS`, settle it by `policy`."""
        if self.attempts[row] < MAX_ATTEMPTS:
            self.failed_on[row] = actor
            self.queue.appendleft(row)
            return
        dropped = ClientDropped(self.tasks[row].client, reason, message, self.attempts[row])
        self.outcomes[row] = settle_failure(policy, dropped)

    def time_out(self, limit_s: float) -> None:
        """Drop every client not done by the round's deadline; replace the actors still busy with one."""
        for ref, (actor, row) in list(self.pending.items()):
            _POOL.replace(self.ray, actor)
            self.outcomes[row] = ClientDropped(self.tasks[row].client, "timeout",
                                               f"not done within the round's {limit_s:g} s (execution."
                                               "round_timeout_s)", self.attempts[row])
        self.pending.clear()
        for row in self.queue:
            self.outcomes[row] = ClientDropped(self.tasks[row].client, "timeout",
                                               f"not started within the round's {limit_s:g} s (execution."
                                               "round_timeout_s)", self.attempts[row])
        self.queue.clear()

    def abandon(self) -> None:
        """Cancel what is in flight: each actor finishes its one client and is free again."""
        for ref in self.pending:
            try:
                self.ray.cancel(ref)
            except Exception:  # already finished, or its actor is gone: nothing to cancel
                pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()
