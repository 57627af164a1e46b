"""A pool of long-lived Ray actors, each holding a :class:`RowRunner` (executor and model cache).

``RayWorkerPool(...).submit(doc, params) -> concurrent.futures.Future[RowOutput]`` is the whole
interface: the batch command submits its rows, and any other front end (the HTTP server's queue)
can submit its jobs the same way. One actor per worker: one per GPU where the cluster has GPUs, else one per ``threads`` CPUs; each
reserves ``threads`` CPUs and runs torch with that many threads (the local backend with the same
count gives the same bytes).

Scheduling (a dispatcher thread in the driver):
- each actor has at most ``depth`` runs in flight, so it never waits on the driver between rows;
- a free actor takes, in order: a job whose models it already holds (same ``model_key``), else a
  job of the models held by the fewest actors, so a checkpoint is loaded by as few workers as
  possible and each loads it once;
- an actor that dies (``ray.kill``, a crashed process, a lost node) is dropped (and, with
  ``respawn``, replaced by a new one); its jobs go back to the front of the queue for another
  worker; a job that fails (or dies with its worker) twice fails its future with every error
  (with ``retry_errors=False`` only a death is retried: an error of the job itself is final).
  No job is lost, and no job's result is delivered twice.

Streamed jobs (``submit(..., on_event=f)``, what the HTTP server uses): the actor runs the job with
Ray's streaming generator (``num_returns="streaming"``), yielding each executor event and each
node's output files as they happen, and the dispatcher hands them to ``f`` in order as they
arrive: no polling and no extra actor, and a dead actor ends the stream with the same
``RayActorError`` as a plain call. ``cancel(future)`` reaches a running job through a second
concurrency group of the actor (``control``, one thread), so it is not queued behind the job.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import json
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import LdmGraphError

from .runner import RowFailure, RowOutput, failure_detail

DEFAULT_DEPTH = 2
DEFAULT_MAX_ATTEMPTS = 2
POLL_SECONDS = 0.02


class RowFailed(LdmGraphError):
    """A job failed on every attempt; ``errors`` lists each attempt's error, ``worker`` the last worker."""

    def __init__(self, errors: list[str], worker: str, detail: dict[str, Any] | None = None) -> None:
        self.errors = list(errors)
        self.worker = worker
        self.detail = detail  # the last failure as plain data (runner.failure_detail); None for a death
        super().__init__(errors[-1] if errors else "failed")


class RayUnavailable(LdmGraphError):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass
class _Job:
    doc_ref: Any
    params: dict[str, Any]
    prefix: str
    model_key: str
    future: concurrent.futures.Future[RowOutput]
    errors: list[str] = field(default_factory=list)
    avoid: set[str] = field(default_factory=set)  # workers that failed it
    on_event: Callable[[Any], None] | None = None  # set for a streamed job
    outputs: list[str] | None = None
    run_id: int = 0
    slot: _Slot | None = None  # where it runs now
    cancelled: bool = False


@dataclass
class _Slot:
    name: str
    actor: Any
    models: set[str] = field(default_factory=set)
    inflight: int = 0
    alive: bool = True
    worker: str = ""
    loads: int = 0
    rows: int = 0
    current: int = 0  # run id of the streamed job it runs


class RayWorkerPool:
    """Long-lived Ray actors running workflow jobs (see the module docstring)."""

    def __init__(
        self,
        env: Environment,
        *,
        workers: int | None = None,
        address: str | None = None,
        plugin_dirs: Sequence[str] = (),
        write_dir: Path | None = None,
        threads: int = 1,
        depth: int = DEFAULT_DEPTH,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_errors: bool = True,
        respawn: bool = False,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        ray = _import_ray()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = cluster_address(address)
            try:
                ray.init(address=address, **dict(init_kwargs or {}))
            except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
                where = "a new local cluster" if address == "local" else f"the Ray cluster at {address}"
                raise RayUnavailable(f"cannot start or reach {where}: {type(exc).__name__}: {exc}") from exc
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        options = {"num_gpus": 1, "num_cpus": threads} if gpus else {"num_cpus": threads}
        actor_class = ray.remote(**options, max_restarts=0, max_task_retries=0,
                                 concurrency_groups={"control": 1})(_BatchActor)
        self.depth, self.max_attempts, self.retry_errors, self.respawn = depth, max_attempts, retry_errors, respawn
        self._new_actor = lambda name: actor_class.remote(env, list(plugin_dirs), write_dir, name, threads)
        self.slots = [_Slot(f"w{i}", self._new_actor(f"w{i}")) for i in range(count)]
        self.respawned = 0
        self.last_death: str | None = None
        self._runs = itertools.count(1)
        self._pending: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._inflight: dict[Any, tuple[_Job, _Slot]] = {}
        self._docs: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ldmgraph-ray-pool", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------
    def submit(self, doc: Mapping[str, Any], params: Mapping[str, Any] | None = None, *, prefix: str = "",
               model_key: str = "", outputs: list[str] | None = None,
               on_event: Callable[[Any], None] | None = None) -> concurrent.futures.Future[RowOutput]:
        """Queue one run of ``doc`` with ``params`` as parameter overrides; returns its future.

        ``prefix`` is put before each output file's name; ``model_key`` (e.g. from
        :func:`ldmgraph.batch.plan.model_key`) lets jobs go to a worker that holds their models;
        ``outputs`` runs only those output nodes. With ``on_event``, the job is streamed: ``on_event``
        gets ``("files", node_id, [(name, bytes)])`` and ``("event", Event)`` items as the job runs
        (from the dispatcher thread, in order; a retried job streams again from the start), and the
        files are not repeated in the result. The future's result is a :class:`RowOutput`; a job
        that failed on every attempt raises :class:`RowFailed`.
        """
        future: concurrent.futures.Future[RowOutput] = concurrent.futures.Future()
        job = _Job(self._doc_ref(doc), dict(params or {}), prefix, model_key, future, on_event=on_event,
                   outputs=list(outputs) if outputs else None)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._pending.setdefault(model_key, deque()).append(job)
            self._lock.notify()
        return future

    def cancel(self, future: concurrent.futures.Future[RowOutput]) -> bool:
        """Cancel a job: dropped if still queued, stopped at its next cancellation point if running.

        A running streamed job then fails with ``detail["kind"] == "cancelled"`` and is not
        retried; True if the job was found queued or running.
        """
        if future.cancel():
            return True
        with self._lock:
            running = [(job, slot) for job, slot in self._inflight.values() if job.future is future]
            for job, slot in running:
                job.cancelled = True
                if job.on_event is not None and slot.alive:
                    slot.actor.cancel.options(concurrency_group="control").remote(job.run_id)
        return bool(running)

    def live_workers(self) -> int:
        """How many actors are alive (what the server fills with jobs)."""
        with self._lock:
            return sum(slot.alive for slot in self.slots)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop each actor's cached outputs and/or models, between its jobs (the server's ``POST /free``)."""
        with self._lock:
            for slot in self.slots:
                if slot.alive:
                    slot.actor.free.remote(unload_models, free_memory)

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker: name, process, alive, rows finished, models loaded from disk, rows running now."""
        with self._lock:
            return [{"name": s.name, "worker": s.worker, "alive": s.alive, "rows": s.rows, "model_loads": s.loads,
                     "running": s.inflight} for s in self.slots]

    @property
    def actors(self) -> list[Any]:
        """The actor handles (for inspection, or ``ray.kill`` in a fault test)."""
        return [slot.actor for slot in self.slots]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every actor has started (its executor is built; models load on first use)."""
        names = self._ray.get([slot.actor.ready.remote() for slot in self.slots], timeout=timeout)
        with self._lock:
            for slot, name in zip(self.slots, names, strict=True):
                slot.worker = slot.worker or name

    def shutdown(self) -> None:
        """Stop the dispatcher, cancel queued jobs, end the actors (and Ray, if the pool started it)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()
        for job in self._drain_pending() + [job for job, _ in self._inflight.values()]:
            if not job.future.done() and not job.future.cancel():
                job.future.set_exception(RuntimeError("the pool was shut down"))
        self._inflight.clear()
        for slot in self.slots:
            try:
                self._ray.kill(slot.actor)
            except Exception:  # noqa: BLE001, S110 - already dead
                pass
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> RayWorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- dispatcher --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._assign()
                if not self._inflight:
                    self._lock.wait(timeout=1.0)
                    continue
                refs = list(self._inflight)
            ready, _ = self._ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                self._finish(ref)

    def _assign(self) -> None:
        """Give each live actor with room a job (lock held)."""
        live = [s for s in self.slots if s.alive]
        if not live:
            for lost in self._drain_pending():
                if not lost.future.cancelled():
                    lost.future.set_exception(RowFailed(lost.errors + ["no live Ray worker is left"], ""))
            return
        for slot in itertools.chain.from_iterable(itertools.repeat(live, self.depth)):
            if slot.inflight >= self.depth:
                continue
            job = self._take(slot)
            if job is None:
                continue
            if job.on_event is None:
                ref = slot.actor.run.remote(job.doc_ref, job.params, job.prefix)
            else:
                job.run_id = slot.current = next(self._runs)
                ref = slot.actor.run_events.options(num_returns="streaming").remote(
                    job.doc_ref, job.params, job.prefix, job.outputs, job.run_id)
            job.slot = slot
            self._inflight[ref] = (job, slot)
            slot.inflight += 1
            slot.models.add(job.model_key)

    def _take(self, slot: _Slot) -> _Job | None:
        """The next job for this actor: one of its models first, else of the least-held models.

        A job this actor failed goes to another one while there is another; jobs cancelled while
        queued are dropped here.
        """
        while True:
            held = [key for key in self._pending if key in slot.models]
            others = sorted((key for key in self._pending if key not in slot.models),
                            key=lambda k: sum(k in s.models for s in self.slots if s.alive))
            job = self._pop_first(held + others, slot.name)
            if job is None or job.errors or job.future.set_running_or_notify_cancel():
                return job

    def _pop_first(self, keys: list[str], name: str) -> _Job | None:
        for key in keys:
            queue = self._pending[key]
            for index, job in enumerate(queue):
                if name in job.avoid and any(s.alive and s.name not in job.avoid for s in self.slots):
                    continue  # another live worker has not failed it yet
                del queue[index]
                if not queue:
                    del self._pending[key]
                return job
        return None

    def _finish(self, ref: Any) -> None:
        with self._lock:
            job, slot = self._inflight[ref]
        result: RowOutput | RowFailure
        try:
            if job.on_event is None:
                result = self._ray.get(ref)
            else:
                kind, *rest = self._ray.get(next(ref))
                if kind != "result":
                    self._relay(job, (kind, *rest))
                    return  # still running: the stream stays in flight
                result = rest[0]
        except self._ray.exceptions.RayActorError as exc:
            result = self._died(slot, exc)
        except StopIteration:
            result = self._died(slot, RuntimeError("its stream ended without a result"))
        except Exception as exc:  # noqa: BLE001 - e.g. the result could not be deserialised
            result = RowFailure(f"{type(exc).__name__}: {exc}", slot.worker or slot.name)
        with self._lock:
            del self._inflight[ref]
            slot.inflight -= 1
            job.slot = None
            slot.worker = result.worker or slot.worker
            slot.loads = max(slot.loads, result.model_loads)
            if isinstance(result, RowOutput):
                slot.rows += 1
                result.attempts, result.retried = len(job.errors) + 1, list(job.errors)
                job.future.set_result(result)
                return
            job.errors.append(f"{result.worker}: {result.error}")
            job.avoid.add(slot.name)
            final = job.cancelled or (result.detail is not None and not self.retry_errors)
            if final or len(job.errors) >= self.max_attempts:
                job.future.set_exception(RowFailed(job.errors, result.worker, result.detail))
                return
            self._pending[job.model_key] = self._pending.get(job.model_key, deque())
            self._pending[job.model_key].appendleft(job)
            self._pending.move_to_end(job.model_key, last=False)

    def _relay(self, job: _Job, item: tuple[Any, ...]) -> None:
        assert job.on_event is not None
        try:
            job.on_event(item)
        except Exception:  # noqa: BLE001, S110 - a failing listener must not stop the dispatcher
            pass

    def _died(self, slot: _Slot, exc: BaseException) -> RowFailure:
        """Drop a dead actor (and start a new one in its place, with ``respawn``)."""
        with self._lock:
            if slot.alive:
                slot.alive = False
                slot.models.clear()
                if self.respawn and not self._closed:
                    self.respawned += 1
                    name = f"w{len(self.slots)}"
                    self.slots.append(_Slot(name, self._new_actor(name)))
        text = str(exc).splitlines()[0] if str(exc) else ""
        self.last_death = f"worker {slot.name} ({slot.worker or 'starting'}) died: {type(exc).__name__}: {text}"
        return RowFailure(self.last_death, slot.worker or slot.name)

    def _drain_pending(self) -> list[_Job]:
        jobs = [job for queue in self._pending.values() for job in queue]
        self._pending.clear()
        return jobs

    def _doc_ref(self, doc: Mapping[str, Any]) -> Any:
        """One object in Ray's store per distinct workflow document (sent to each actor once)."""
        text = json.dumps(doc, sort_keys=True, default=str)
        with self._lock:
            ref = self._docs.get(text)
            if ref is None:
                ref = self._docs[text] = self._ray.put(dict(doc))
                if len(self._docs) > 64:
                    self._docs.popitem(last=False)
            else:
                self._docs.move_to_end(text)
            return ref


class _BatchActor:
    """The Ray actor: one :class:`RowRunner` for its whole life.

    Its methods run one at a time (Ray's default concurrency group), except ``cancel``, which runs
    on the ``control`` group's own thread so that it reaches the job running now.
    """

    def __init__(self, env: Environment, plugin_dirs: list[str], write_dir: Path | None, name: str,
                 threads: int) -> None:
        from .runner import RowRunner

        self.runner = RowRunner(env, plugin_dirs, write_dir=write_dir, name=name, threads=threads)
        self.running: tuple[int, Any] | None = None  # (run id, CancelToken) of the streamed job

    def ready(self) -> str:
        return self.runner.worker

    def run(self, doc: dict[str, Any], params: dict[str, Any], prefix: str) -> RowOutput | RowFailure:
        return self.runner.try_run(doc, params, prefix)

    def run_events(self, doc: dict[str, Any], params: dict[str, Any], prefix: str, outputs: list[str] | None,
                   run_id: int) -> Iterator[tuple[Any, ...]]:
        """A streamed run (a Ray streaming generator): its items as they happen, then ``("result", ...)``.

        The job runs on a thread of its own, since the executor reports through a callback and a
        generator can only yield from its own frame; the items pass through a queue.
        """
        from ldmgraph.graph.context import CancelToken

        items: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        token = CancelToken()
        self.running = (run_id, token)

        def work() -> None:
            try:
                result: RowOutput | RowFailure = self.runner.try_run(doc, params, prefix, token, outputs=outputs,
                                                                      emit=items.put)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from a node is this job's error too
                result = RowFailure(f"{type(exc).__name__}: {exc}", self.runner.worker, self.runner.model_loads,
                                    failure_detail(exc))
            items.put(("result", result))

        thread = threading.Thread(target=work, name=f"ldmgraph-run-{run_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                yield item
                if item[0] == "result":
                    return
        finally:
            self.running = None
            thread.join()

    def cancel(self, run_id: int) -> bool:
        """Cancel the streamed run ``run_id`` if it is the one running (runs in the ``control`` group)."""
        running = self.running
        if running is None or running[0] != run_id:
            return False
        running[1].cancel()
        return True

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop cached outputs and/or loaded models (between jobs)."""
        if unload_models or free_memory:
            self.runner.executor.cache.clear()
        if unload_models:
            self.runner.executor.resources.clear()
        gc.collect()

    def stats(self) -> dict[str, Any]:
        """The worker's name, its model loads, and the CPU seconds its process has used."""
        import time

        return {"worker": self.runner.worker, "model_loads": self.runner.model_loads,
                "cpu_seconds": time.process_time()}


def cluster_address(address: str | None) -> str:
    """The cluster a pool joins: the one it was told (``address``, else ``$RAY_ADDRESS``), else a new,
    private local cluster (``"local"``), stopped with the pool.

    Never Ray's own default: without an address, ``ray.init`` joins the cluster named in the address
    file of Ray's temporary folder (left by an earlier ``ray start``, and still there when that
    cluster was stopped by killing its processes), and with a stale file it waits minutes for a
    cluster that is gone.
    """
    return address or os.environ.get("RAY_ADDRESS") or "local"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable('the Ray backend needs Ray: pip install "ldmgraph[ray]"') from exc
    return ray
