"""Worker processes of one intra-op thread each, kept between rounds (and runs), pulling clients from a
shared counter. The model's definition travels once per executor, by value (cloudpickle), so classes
defined in a notebook's `__main__` train there too; weights travel through shared-memory buffers."""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import signal
import site
import sys
import sysconfig
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Mapping, Sequence

import cloudpickle
import torch
import torch.multiprocessing as mp
from torch import nn

from workbench.client import ClientTask, ClientUpdate, LocalObjective, flipped_labels, gradient_correction
from workbench.execution.base import check_stop, default_threads
from workbench.execution.kernels import LocalTrainer, linear_chain

#: spawn: workers start from a clean interpreter (no copied locks or threads of a notebook or MLflow);
#: their `import torch` overlaps with the parent's work and is paid once per session, not per run.
START_METHOD = "spawn"
_POLL_S = 0.05
_START_TIMEOUT_S = 300.0
#: lines of a worker's last reported traceback quoted when it dies
_REPORT_LINES = 30


class WorkerDied(RuntimeError):
    """A worker process ended while the run needed it; the message says how (exit code or signal) and
    quotes the last traceback it reported."""


_BY_VALUE_LOCK = threading.Lock()


def _installed_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    folders = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    folders.append(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(f), "") for f in folders)


def user_modules(model: nn.Module) -> list[Any]:
    """The modules of `model`'s layer classes that are the user's own code: neither `__main__` (cloudpickle
    sends that by value anyway), torch, workbench, nor anything installed (stdlib, site-packages)."""
    installed, found = _installed_prefixes(), {}
    for layer in model.modules():
        name = type(layer).__module__
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if name == "__main__" or name.partition(".")[0] in ("torch", "workbench") or not file:
            continue
        if not os.path.realpath(file).startswith(installed):
            found[name] = module
    return list(found.values())


def model_payload(model: nn.Module) -> bytes:
    """`model` serialized for the workers. Classes defined in `__main__` or in the user's own modules go by
    value: a spawned worker cannot import `__main__`, may lack a folder added to `sys.path` after it
    started, and would keep the version of a module it imported before the notebook edited and reloaded
    it. Installed code (torch, workbench, site-packages) goes by reference, as does a user module whose
    classes cannot be pickled by value. Raises ValueError with the reason when the model cannot be sent."""
    modules = user_modules(model)
    if modules:
        with _BY_VALUE_LOCK:
            already = cloudpickle.list_registry_pickle_by_value()
            added = [m for m in modules if m.__name__ not in already]
            for module in added:
                cloudpickle.register_pickle_by_value(module)
            try:
                return cloudpickle.dumps(model)
            except Exception:  # e.g. a module-level lock its methods use: try by reference below
                pass
            finally:
                for module in added:
                    cloudpickle.unregister_pickle_by_value(module)
    try:
        return cloudpickle.dumps(model)
    except Exception as err:  # pickling raises TypeError, PicklingError, AttributeError, ... by object
        first_line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"the model ({type(model).__qualname__}) cannot be sent to worker processes: "
                         f"{type(err).__name__}: {first_line}") from err


def why_not_sendable(model: nn.Module) -> str | None:
    """Why `model` cannot be sent to worker processes (a weak reference, an open file or a lock among its
    attributes), or None when it can."""
    try:
        model_payload(model)
    except ValueError as err:
        return str(err)
    return None


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, from `multiprocessing.Process.exitcode` (negative: the signal that ended it)."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by signal {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _work(rank: int, inbox, outbox, counter, cancel, started_at: float) -> None:
    """A worker's life: serve the parent until it says close; whatever else ends it is reported first,
    so that the parent can say why the worker died."""
    # Ctrl-C (and a Jupyter kernel's interrupt or shutdown) reaches the whole process group; the parent
    # turns it into a KILLED run and closes the pool, so a worker printing its own traceback is noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        _serve(rank, inbox, outbox, counter, cancel, started_at)
    except BaseException:
        # the queue's feeder thread is joined at exit, so this report reaches the parent before it sees
        # the process gone
        outbox.put(("fatal", rank, traceback.format_exc()))
        raise


def _serve(rank: int, inbox, outbox, counter, cancel, started_at: float) -> None:
    """A worker's loop: keep the data, model and buffers it is sent; on a round, take clients from the
    shared counter until none are left (or the round is cancelled), writing each update into its row."""
    x = y = trainer = global_state = out = None
    names: list[str] = []
    corrections: dict[str, torch.Tensor] = {}
    # seconds from the parent's start() to here: interpreter start-up and imports
    outbox.put(("ready", rank, time.time() - started_at))
    parent = mp.parent_process()
    while True:
        try:
            message = inbox.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the parent was killed without closing the pool: don't linger
            continue
        kind = message[0]
        if kind == "close":
            return
        round_id = message[1] if kind == "round" else None
        try:
            if kind == "data":
                x, y = message[1], message[2]
            elif kind == "model":
                trainer = LocalTrainer(pickle.loads(message[1]), use_kernel=message[2])
                names = [name for name, _ in trainer.model.named_parameters()]
                outbox.put(("model_ready", rank))
            elif kind == "buffers":
                global_state, out = message[1], message[2]
            elif kind == "corrections":
                corrections = message[1]
            elif kind == "round":
                _, _, tasks, objective = message
                while not cancel.is_set():
                    with counter.get_lock():
                        i = counter.value
                        counter.value += 1
                    if i >= len(tasks):
                        break
                    row, indices, num_epochs, seed, flips_labels, corrected = tasks[i]
                    indices = torch.from_numpy(indices)
                    labels = flipped_labels(y[indices], objective.num_classes) if flips_labels else y[indices]
                    correction = [corrections[n][row] for n in names] if corrected else None
                    state, loss = trainer(global_state, x[indices], labels, objective, num_epochs=num_epochs,
                                          generator=torch.Generator().manual_seed(seed), correction=correction)
                    for key, value in state.items():
                        out[key][row].copy_(value)
                    outbox.put(("done", round_id, row, loss))
        except Exception:  # reported to the parent, which raises it; the worker stays usable
            outbox.put(("error", round_id, rank, traceback.format_exc()))
        if kind == "round":
            outbox.put(("idle", round_id, rank))


@contextlib.contextmanager
def _main_module_hidden():
    """Start workers without re-running the caller's script in them: spawn re-imports `__main__` so
    that functions defined there unpickle, but workers only run this module's `_work`, and a script
    without an `if __name__ == "__main__":` guard would otherwise start a pool inside every worker."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for key in saved:
            setattr(main, key, None) if key == "__spec__" else delattr(main, key)
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


class WorkerPool:
    """`num_workers` processes of one thread each, shared by every `ProcessExecutor` of that size."""

    def __init__(self, num_workers: int):
        ctx = mp.get_context(START_METHOD)
        self.num_workers = num_workers
        self.outbox = ctx.Queue()
        self.counter = ctx.Value("q", 0)
        self.cancel = ctx.Event()
        self.inboxes = [ctx.Queue() for _ in range(num_workers)]
        self.processes = [
            ctx.Process(target=_work, args=(rank, inbox, self.outbox, self.counter, self.cancel, time.time()),
                        name=f"workbench-worker-{rank}", daemon=True)
            for rank, inbox in enumerate(self.inboxes)
        ]
        with _main_module_hidden():
            for process in self.processes:
                process.start()
        self.lock = threading.Lock()
        self.is_ready = False
        #: seconds each worker spent starting its interpreter and importing torch and workbench
        self.boot_s: list[float] = []
        self.round_id = 0
        self._model_owner: Any = None
        #: the last traceback each worker reported (by rank), quoted if it dies
        self.reports: dict[int, str] = {}
        self._data: tuple[Any, ...] | None = None
        self._layout: tuple | None = None
        self._capacity = 0
        self.global_state: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self.corrections: dict[str, torch.Tensor] = {}

    @property
    def is_alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def wait_ready(self) -> None:
        if self.is_ready:
            return
        ready, deadline = 0, time.monotonic() + _START_TIMEOUT_S
        while ready < self.num_workers:
            try:
                message = self.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive("while starting")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker processes did not start within {_START_TIMEOUT_S:.0f} s")
                continue
            if message[0] == "ready":
                ready += 1
                self.boot_s.append(message[2])
            self._note(message)
        self.is_ready = True

    def _note(self, message: tuple) -> None:
        """Keep the traceback of a worker's `error` or `fatal` message, by rank."""
        if message[0] == "error":
            self.reports[message[2]] = message[3]
        elif message[0] == "fatal":
            self.reports[message[1]] = message[2]

    def _check_alive(self, doing: str) -> None:
        """Raise `WorkerDied` when a worker has ended: how it ended and the last traceback it reported."""
        dead = [(rank, p) for rank, p in enumerate(self.processes) if not p.is_alive()]
        if not dead:
            return
        while True:  # a dying worker's last words are in the queue: the feeder flushes before exit
            try:
                self._note(self.outbox.get_nowait())
            except queue.Empty:
                break
        lines = []
        for rank, process in dead:
            line = f"worker process {process.name} (pid {process.pid}) {describe_exit(process.exitcode)} {doing}"
            report = self.reports.get(rank)
            if report:
                tail = report.rstrip().splitlines()[-_REPORT_LINES:]
                line += "; the last traceback it reported:\n" + "\n".join(tail)
            else:
                line += "; it reported no error before it ended"
            lines.append(line)
        if any(process.exitcode == -signal.SIGKILL for _, process in dead):
            lines.append("(SIGKILL is what `kill -9` and the kernel's out-of-memory killer send; the system log "
                         "says which)")
        raise WorkerDied("\n".join(lines) + "\n(the next run starts fresh worker processes)")

    def _broadcast(self, message: tuple) -> None:
        for inbox in self.inboxes:
            inbox.put(message)

    def send_model(self, owner: Any, payload: bytes, use_kernel: bool, label: str = "the model") -> None:
        """Send a model (`model_payload`) to every worker and wait until each has rebuilt it, or raise
        RuntimeError with the traceback of one that could not."""
        if self._model_owner is owner:
            return
        self._model_owner = None
        self._broadcast(("model", payload, use_kernel))
        answered, errors = 0, []
        while answered < self.num_workers:
            try:
                message = self.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive("while rebuilding the model it was sent")
                continue
            self._note(message)
            if message[0] == "model_ready":
                answered += 1
            elif message[0] == "error":
                answered += 1
                errors.append(message[3])
        if errors:
            unimportable = any(e in errors[0] for e in ("ModuleNotFoundError", "Can't get attribute"))
            hint = (" (its module cannot be imported there: put it on PYTHONPATH, or define the class in the "
                    "notebook or script itself)") if unimportable else ""
            raise RuntimeError(f"the worker processes could not rebuild {label} sent to them{hint}:\n{errors[0]}")
        self._model_owner = owner

    def send_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Share (x, y) with the workers once per dataset: a copy in shared memory, not the caller's."""
        data = self._data
        if data is not None and data[0]() is x and data[1]() is y and data[2:] == (x._version, y._version):
            return
        shared_x = x.detach().clone().share_memory_()
        shared_y = y.detach().clone().share_memory_()
        self._broadcast(("data", shared_x, shared_y))
        self._data = (weakref.ref(x), weakref.ref(y), x._version, y._version)

    def send_state(self, global_state: Mapping[str, torch.Tensor], num_rows: int) -> None:
        """Copy the global model into the shared buffer; (re)allocate the update rows when the model's
        layout changes or the cohort outgrows them (so memory follows clients per round, not clients)."""
        layout = tuple((k, tuple(v.shape), v.dtype) for k, v in global_state.items())
        if layout != self._layout or num_rows > self._capacity:
            self.global_state = {k: torch.empty(s, dtype=d).share_memory_() for k, s, d in layout}
            self.out = {k: torch.empty((num_rows, *s), dtype=d).share_memory_() for k, s, d in layout}
            self._layout, self._capacity = layout, num_rows
            self._broadcast(("buffers", self.global_state, self.out))
        for key, value in global_state.items():
            self.global_state[key].copy_(value)

    def send_corrections(self, rows: Sequence[Sequence[torch.Tensor] | None], names: Sequence[str]) -> None:
        """Copy each row's gradient correction (SCAFFOLD's c - c_i, per parameter) into shared buffers,
        allocated like the update rows."""
        shapes = {n: (tuple(self.out[n].shape), self.out[n].dtype) for n in names}
        if set(self.corrections) != set(names) or any(
                tuple(self.corrections[n].shape) != s or self.corrections[n].dtype != d for n, (s, d) in shapes.items()):
            self.corrections = {n: torch.zeros(s, dtype=d).share_memory_() for n, (s, d) in shapes.items()}
            self._broadcast(("corrections", self.corrections))
        for row, correction in enumerate(rows):
            for n, value in zip(names, correction or ()):
                self.corrections[n][row].copy_(value)

    def run_round(self, tasks: list[tuple], objective: LocalObjective, stop: threading.Event | None,
                  on_update: Callable[[int], None] | None = None) -> dict[int, float]:
        """Train every task; return row -> mean loss. Raises `RunStopped` (after the workers have let go of
        the round) when `stop` is set, and RuntimeError when a worker fails. `on_update(row)` as each
        row's update is complete."""
        self.round_id += 1
        self.counter.value = 0
        self.cancel.clear()
        self._broadcast(("round", self.round_id, tasks, objective))
        losses: dict[int, float] = {}
        errors: list[str] = []
        idle = 0
        while idle < self.num_workers:
            if stop is not None and stop.is_set():
                self.cancel.set()  # workers check it before every client update
            try:
                message = self.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive("while training clients")
                continue
            self._note(message)
            kind = message[0]
            if kind == "done" and message[1] == self.round_id:
                losses[message[2]] = message[3]
                if on_update is not None:
                    on_update(message[2])
            elif kind == "idle" and message[1] == self.round_id:
                idle += 1
            elif kind == "error":
                errors.append(message[3])
                self.cancel.set()
        if errors:
            raise RuntimeError(f"a worker process failed while training a client:\n{errors[0]}")
        check_stop(stop)
        return losses

    def close(self) -> None:
        for inbox, process in zip(self.inboxes, self.processes):
            if process.is_alive():
                try:
                    inbox.put(("close",))
                except (OSError, ValueError):
                    pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


_POOLS: dict[int, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(num_workers: int) -> WorkerPool:
    """The session's pool of `num_workers` workers, started on first use and restarted if one died."""
    with _POOLS_LOCK:
        pool = _POOLS.get(num_workers)
        if pool is None or not pool.is_alive:
            if pool is not None:
                pool.close()
            pool = _POOLS[num_workers] = WorkerPool(num_workers)
        return pool


def close_pools() -> None:
    """Stop every worker process this session started (also run at interpreter exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


atexit.register(close_pools)


class ProcessExecutor:
    """Clients spread over `num_workers` processes of one intra-op thread each (default: one per core),
    each running `train_locally` (or the fused kernel for linear chains, `use_kernel`) on whole clients,
    so every update is computed exactly as the sequential executor computes it. CPU only."""

    name = "processes"

    def __init__(self, model: nn.Module, num_workers: int = 0, use_kernel: bool = True):
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"execution.executor='processes' runs on CPU, but the model is on {device} "
                             "(use execution.executor=vectorized or auto on a GPU)")
        try:  # `resolve_executor` falls back to `sequential` before it comes to this
            self._payload = model_payload(model)
        except ValueError as err:
            raise ValueError(f"execution.executor='processes': {err} (use execution.executor=sequential, or "
                             "keep such objects out of the model's attributes)") from err
        self._label = f"the model {type(model).__module__}.{type(model).__qualname__}"
        self._names = [name for name, _ in model.named_parameters()]
        self.num_workers = num_workers or usable_cpus()
        self.uses_kernel = use_kernel and linear_chain(model) is not None
        self._pool = shared_pool(self.num_workers)
        self.threads = default_threads(model)  # the run's own process: aggregation and evaluation
        self.settings = {"executor": self.name, "workers": self.num_workers, "worker_threads": 1,
                         "fused_kernel": self.uses_kernel}

    def why_not_supported(self, objective: LocalObjective) -> str | None:
        return None  # the workers run `train_locally` (or the kernel where it applies) on whole clients

    def run_cohort(
        self, global_state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
        x: torch.Tensor, y: torch.Tensor, objective: LocalObjective,
        stop: threading.Event | None = None, on_update: Callable[[int], None] | None = None,
    ) -> list[ClientUpdate]:
        check_stop(stop)
        if not tasks:
            return []
        if not self._pool.is_alive:
            self._pool = shared_pool(self.num_workers)
        pool = self._pool
        with pool.lock:
            try:
                pool.wait_ready()
                pool.send_model(self, self._payload, self.uses_kernel, self._label)
                pool.send_data(x, y)
                pool.send_state(global_state, len(tasks))
                corrections = [gradient_correction(task.payload, task.client_state, self._names) for task in tasks]
                if any(c is not None for c in corrections):
                    pool.send_corrections(corrections, self._names)
                work = [(row, task.indices.detach().cpu().numpy(), task.num_epochs, task.seed, task.flips_labels,
                         corrections[row] is not None) for row, task in enumerate(tasks)]
                losses = pool.run_round(work, objective, stop,
                                        on_update and (lambda row: on_update(tasks[row].client)))
                states = [{k: v[row].clone() for k, v in pool.out.items()} for row in range(len(tasks))]
            except (KeyboardInterrupt, RuntimeError):
                # the workers' state is unknown now: start over next time
                pool.close()
                raise
        return [ClientUpdate(task.client, states[row], len(task.indices), task.num_epochs, losses[row],
                             task.is_partial) for row, task in enumerate(tasks)]
