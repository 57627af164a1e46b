"""The local backend's worker: one child process that runs the server's jobs, one at a time.

Why a process and not a thread of the server: the executor runs Python between its torch calls,
and a thread doing that holds the interpreter lock half of the time, so the event loop answering
``POST /prompt`` and the websockets waited for it (measured with 4 clients submitting while jobs
ran: the submit latency's 95th percentile fell from 77 ms to 12 ms when the worker was held back).
In a process of its own the worker competes only for a CPU, which the operating system shares
preemptively, and it runs at a lower scheduling priority (``nice`` +5) so that request handling
goes first when the CPUs are busy; jobs still get every idle cycle.

The child holds one :class:`ldmgraph.batch.runner.RowRunner` (an executor and its model cache) for
its life, so a second job on the same checkpoint loads nothing. It streams each job over a pipe as
it runs, like a Ray actor of :class:`ldmgraph.batch.ray_pool.RayWorkerPool` (whose interface this
class has, for :class:`~.remote.RemoteWorker`): every executor event, in order. Being on the same
machine, it writes a job's files straight into the job's output folder (no bytes over the pipe);
the server finds them there when the node's ``done`` event arrives.
``cancel`` reaches the running job through the child's reader thread. Anything that escapes a job
(a node raising ``SystemExit``) ends the child after telling the server why: the job is recorded
failed (``WorkerDied``), a new child starts, and ``/system_stats`` counts the restart. If the
server dies, the child sees its pipe close and exits.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import multiprocessing
import os
import pickle
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmgraph.batch.ray_pool import RowFailed
from ldmgraph.batch.runner import RowFailure, RowOutput
from ldmgraph.graph.context import Environment

WORKER_NICE = 5


@dataclass
class _Run:
    run_id: int
    doc: Any
    params: dict[str, Any]
    outputs: list[str] | None
    on_event: Callable[[Any], None] | None
    future: concurrent.futures.Future[RowOutput]
    output_dir: Path | None = None


class ProcessPool:
    """One child process running streamed jobs (see the module docstring)."""

    def __init__(self, env: Environment, plugin_dirs: Sequence[str] = (), threads: int | None = None) -> None:
        self._args = (env, list(plugin_dirs), threads)
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._runs = itertools.count(1)
        self._pending: deque[_Run] = deque()
        self._current: _Run | None = None
        self._closed = False
        self.respawned = 0
        self.last_death: str | None = None
        self.worker = ""
        self.jobs = 0
        self.model_loads = 0
        self._spawn()

    # -- the interface of RayWorkerPool that RemoteWorker uses ----------------------------------------
    shares_files = True  # the child writes a job's files straight into the folder given to submit

    def submit(self, doc: Any, params: dict[str, Any] | None = None, *, outputs: list[str] | None = None,
               on_event: Callable[[Any], None] | None = None, output_dir: Path | None = None,
               **_: Any) -> concurrent.futures.Future[RowOutput]:
        future: concurrent.futures.Future[RowOutput] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            self._pending.append(_Run(next(self._runs), doc, dict(params or {}), outputs, on_event, future,
                                      output_dir))
            self._dispatch()
        return future

    def cancel(self, future: concurrent.futures.Future[RowOutput]) -> bool:
        with self._lock:
            for run in list(self._pending):
                if run.future is future:
                    self._pending.remove(run)
                    future.cancel()
                    return True
            current = self._current
        if current is None or current.future is not future:
            return False
        self._send(("cancel", current.run_id))
        return True

    def live_workers(self) -> int:
        return 0 if self._closed else 1

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self._send(("free", unload_models, free_memory))

    def worker_stats(self) -> list[dict[str, Any]]:
        return [{"name": "local", "worker": self.worker, "alive": self._process.is_alive(), "rows": self.jobs,
                 "model_loads": self.model_loads, "running": int(self._current is not None)}]

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the worker process did not start in {timeout} s")

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            runs = list(self._pending)
            self._pending.clear()
        for run in runs:
            run.future.cancel()
        self._send(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._connection.close()

    # -- the child and its pipe ---------------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        self._ready.clear()
        self._process = self._context.Process(target=child_main, args=(child, *self._args), daemon=True,
                                              name="ldmgraph-worker")
        self._process.start()
        child.close()
        self._connection = parent
        threading.Thread(target=self._read, args=(parent, self._process), name="ldmgraph-worker-pipe",
                         daemon=True).start()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            try:
                self._connection.send(message)
            except (OSError, ValueError):  # the child is gone: the reader thread handles it
                pass

    def _dispatch(self) -> None:
        """Send the next job if the child is idle and ready (lock held)."""
        if self._current is not None or not self._pending or not self._ready.is_set():
            return
        run = self._current = self._pending.popleft()
        if not run.future.set_running_or_notify_cancel():
            self._current = None
            self._dispatch()
            return
        self._send(("run", run.run_id, run.doc, run.params, run.outputs, run.output_dir))

    def _read(self, connection: Any, process: Any) -> None:
        reason = "the worker process ended"
        try:
            while True:
                message = connection.recv()
                kind = message[0]
                if kind == "ready":
                    self.worker = message[1]
                    with self._lock:
                        self._ready.set()
                        self._dispatch()
                elif kind == "item":
                    run = self._current
                    if run is not None and run.run_id == message[1] and run.on_event is not None:
                        try:
                            run.on_event(message[2])
                        except Exception:  # noqa: BLE001, S110 - a failing listener must not stop the pipe
                            pass
                elif kind == "result":
                    self._finish(message[1], message[2])
                elif kind == "dying":
                    reason = message[1]
        except (EOFError, OSError):
            pass
        process.join(10)
        if self._closed:
            return
        self._died(f"{reason} (exit code {process.exitcode})")

    def _finish(self, run_id: int, result: RowOutput | RowFailure) -> None:
        with self._lock:
            run = self._current
            if run is None or run.run_id != run_id:
                return
            self._current = None
            self.model_loads = max(self.model_loads, result.model_loads)
            self.jobs += isinstance(result, RowOutput)
            self._dispatch()
        if isinstance(result, RowOutput):
            run.future.set_result(result)
        else:
            run.future.set_exception(RowFailed([f"{result.worker}: {result.error}"], result.worker, result.detail))

    def _died(self, reason: str) -> None:
        """The child died: its job fails (``detail`` None: a death), a new child starts."""
        with self._lock:
            run, self._current = self._current, None
            self.last_death = reason
            self.respawned += 1
            self._spawn()  # first: a job submitted when this one's failure is known waits for the new child
        if run is not None and not run.future.done():
            run.future.set_exception(RowFailed([f"{self.worker or 'local'}: the worker died: {reason}"],
                                               self.worker))


def child_main(connection: Any, env: Environment, plugin_dirs: list[str], threads: int | None) -> None:
    """The child process: run the jobs the server sends, streaming each one back."""
    from ldmgraph.batch.runner import RowRunner
    from ldmgraph.graph.context import CancelToken

    try:
        os.nice(WORKER_NICE)
    except OSError:  # not permitted here: run at the server's priority
        pass
    runner = RowRunner(env, plugin_dirs, name="local", threads=threads)
    send_lock = threading.Lock()
    inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    tokens: dict[int, CancelToken] = {}

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            connection.send(message)

    def read() -> None:
        try:
            while True:
                message = connection.recv()
                if message[0] == "cancel":
                    token = tokens.get(message[1])
                    if token is not None:
                        token.cancel()
                else:
                    inbox.put(message)
        except (EOFError, OSError):
            os._exit(0)  # the server is gone: so is its worker

    threading.Thread(target=read, name="ldmgraph-worker-pipe", daemon=True).start()
    send(("ready", runner.worker))
    while True:
        message = inbox.get()
        if message[0] == "stop":
            return
        if message[0] == "free":
            if message[1] or message[2]:
                runner.executor.cache.clear()
            if message[1]:
                runner.executor.resources.clear()
            gc.collect()
            continue
        _, run_id, doc, params, outputs, output_dir = message
        token = tokens[run_id] = CancelToken()
        try:
            result = runner.try_run(doc, params, "", token, outputs=outputs, emit=_emitter(send, run_id),
                                    output_dir=output_dir)
        except BaseException as exc:  # noqa: BLE001 - escaped a job (SystemExit): this worker ends, as a thread would
            send(("dying", f"{type(exc).__name__}: {exc}"))
            os._exit(70)
        finally:
            tokens.pop(run_id, None)
        send(("result", run_id, result))


def _emitter(send: Callable[[tuple[Any, ...]], None], run_id: int) -> Callable[[tuple[Any, ...]], None]:
    """Send a run's stream items; an event whose extra payload cannot be pickled goes without it."""
    from ldmgraph.graph.events import Event

    def emit(item: tuple[Any, ...]) -> None:
        try:
            send(("item", run_id, item))
        except (pickle.PicklingError, TypeError, AttributeError):
            event = item[1] if item[0] == "event" else None
            if isinstance(event, Event):
                plain = Event(event.kind, event.node_id, event.node_type, event.index, event.total, event.k,
                              event.n, event.seconds)
                send(("item", run_id, ("event", plain)))

    return emit
