"""The batch driver: skip finished rows, hand the rest to a backend, write outputs and the manifest.

Backends yield ``(row, RowOutput | RowFailed)`` pairs as rows finish. The driver alone writes the
output folder (unless workers write into a shared one) and the manifest, one line per finished
row, so a row's files and its manifest line come from one place and a row is recorded once.
Output names are fixed by the row number (``row00042_txt2img_00001_.png``), so a row that runs
again (retried, or re-run after an interruption) replaces its files instead of adding new ones.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ldmgraph.graph.context import Environment
from ldmgraph.graph.files import atomic_write_bytes, safe_join

from .manifest import Manifest
from .plan import PlannedRow, UnplannedRow, group_by_model
from .ray_pool import RayWorkerPool, RowFailed
from .runner import RowFailure, RowOutput, RowRunner

Outcome = tuple[PlannedRow, "RowOutput | RowFailed"]
CHUNK = 256
"""Rows are handed to the backend (and grouped by checkpoint) this many at a time, so a table of a
million rows streams through without being held whole."""


def row_prefix(number: int) -> str:
    """The prefix of a row's output files: ``row00042_``."""
    return f"row{number:05d}_"


class Backend(Protocol):
    """Runs rows and yields each as it finishes."""

    def run(self, doc: Mapping[str, Any], rows: Sequence[PlannedRow]) -> Iterator[Outcome]: ...

    def model_loads(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class LocalBackend:
    """One executor in this process, rows in checkpoint groups: each model loads once."""

    def __init__(self, env: Environment, plugin_dirs: Sequence[str] = (), threads: int | None = None) -> None:
        self.runner = RowRunner(env, plugin_dirs, name="local", threads=threads)

    def run(self, doc: Mapping[str, Any], rows: Sequence[PlannedRow]) -> Iterator[Outcome]:
        for row in group_by_model(rows):
            out = self.runner.try_run(doc, row.params, row_prefix(row.number))
            yield row, (RowFailed([out.error], out.worker) if isinstance(out, RowFailure) else out)

    def model_loads(self) -> dict[str, int]:
        return {self.runner.worker: self.runner.model_loads}

    def close(self) -> None:
        self.runner.close()


class RayBackend:
    """Rows submitted to a :class:`RayWorkerPool`, yielded in the order they finish."""

    def __init__(self, pool: RayWorkerPool) -> None:
        self.pool = pool

    def run(self, doc: Mapping[str, Any], rows: Sequence[PlannedRow]) -> Iterator[Outcome]:
        futures = {self.pool.submit(doc, row.params, prefix=row_prefix(row.number), model_key=row.model_key): row
                   for row in group_by_model(rows)}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield futures[future], future.result()
                except RowFailed as exc:
                    yield futures[future], exc
        finally:
            for future in futures:
                future.cancel()

    def model_loads(self) -> dict[str, int]:
        return {s["worker"] or s["name"]: s["model_loads"] for s in self.pool.worker_stats()}

    def close(self) -> None:
        self.pool.shutdown()


@dataclass
class BatchSummary:
    """Counts of a batch run, updated as rows finish (so an interrupted run can still report)."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    seconds: float = 0.0
    manifest: str = ""
    model_loads: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.failed == 0 and self.done + self.skipped == self.total, "rows": self.total,
                "skipped": self.skipped, "succeeded": self.ok, "failed": self.failed, "retried": self.retried,
                "seconds": round(self.seconds, 3), "manifest": self.manifest, "model_loads": self.model_loads}


def run_batch(doc: Mapping[str, Any], rows: Iterable[PlannedRow | UnplannedRow], backend: Backend,
              output_dir: Path, *, resume: bool = True, progress: bool = True,
              summary: BatchSummary | None = None, total: int | None = None) -> BatchSummary:
    """Run the rows not yet finished (per the manifest) and record each as it finishes.

    `rows` may be a stream (see `plan.plan_lazily`); `total` is its length when it has none. The
    manifest is checked before anything runs (a regular file or absent; never a link, FIFO or folder).
    """
    summary = summary if summary is not None else BatchSummary()
    output_dir = Path(output_dir)
    manifest = Manifest(output_dir)
    manifest.check()
    finished = manifest.finished(output_dir) if resume else {}
    total = total if total is not None else len(rows)  # type: ignore[arg-type]
    done_before = sum(1 for number, key in finished.items() if number <= total and key)
    summary.total, summary.manifest = total, str(manifest.path)
    bar = _bar(total - done_before, progress, done_before)
    started = time.perf_counter()
    try:
        stream = iter(rows)
        while chunk := list(itertools.islice(stream, CHUNK)):
            todo: list[PlannedRow] = []
            for row in chunk:
                if finished.get(row.number) == row.key:
                    summary.skipped += 1
                elif isinstance(row, UnplannedRow):
                    _finish(manifest, summary, bar, _unplanned_record(row))
                else:
                    todo.append(row)
            for row, result in backend.run(doc, todo):
                _finish(manifest, summary, bar, _record(row, result, output_dir), result)
    finally:
        summary.seconds = time.perf_counter() - started
        summary.model_loads = backend.model_loads()
        manifest.close()
        if bar is not None:
            bar.close()
    return summary


def _finish(manifest: Manifest, summary: BatchSummary, bar: Any, record: dict[str, Any],
            result: Any = None) -> None:
    manifest.append(record)
    if isinstance(result, RowOutput):
        summary.ok += 1
        summary.retried += result.attempts > 1
    else:
        summary.failed += 1
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"done={summary.ok} failed={summary.failed}", refresh=False)


def _unplanned_record(row: UnplannedRow) -> dict[str, Any]:
    return {"row": row.number, "key": row.key, "params": row.params, "status": "failed",
            "seed": row.params.get("seed"), "outputs": [], "seconds": None, "worker": None, "attempts": 0,
            "error": "invalid: " + "; ".join(row.problems), "retried": []}


def _record(row: PlannedRow, result: RowOutput | RowFailed, output_dir: Path) -> dict[str, Any]:
    """Write a finished row's files (when they came back as bytes) and return its manifest line."""
    record: dict[str, Any] = {"row": row.number, "key": row.key, "params": row.params}
    if isinstance(result, RowFailed):
        return {**record, "status": "failed", "seed": row.params.get("seed"), "outputs": [], "seconds": None,
                "worker": result.worker, "attempts": len(result.errors), "error": result.errors[-1],
                "retried": result.errors[:-1]}
    for name, data in result.files:
        if data is not None:
            atomic_write_bytes(safe_join(output_dir, name), data)
    return {**record, "status": "ok", "seed": result.parameters.get("seed", row.params.get("seed")),
            "outputs": result.names, "seconds": round(result.seconds, 4), "worker": result.worker,
            "attempts": result.attempts, "error": None, "retried": result.retried}


def _bar(total: int, enabled: bool, skipped: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    return tqdm(total=total, unit="row", desc=f"batch ({skipped} done before)" if skipped else "batch",
                file=sys.stderr, dynamic_ncols=True, disable=None)
