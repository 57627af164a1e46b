"""The server's persistent state: jobs, queue order, history, output files and settings in SQLite.

One database file (``server.sqlite3``) in the data folder, in WAL mode with ``synchronous=NORMAL``:
a commit survives the process being killed (SIGKILL, a crash), and readers never wait for the
worker's writes. Every job is one row whose ``status`` moves pending -> running -> success /
error / interrupted (or pending -> cancelled); the queue is the pending rows ordered by
``number`` (ComfyUI's convention: a job queued "at the front" gets a number below every other),
history is the finished rows. On start-up a job still marked running was cut off by a crash: it
is marked interrupted and can be queued again (InvokeAI's ``session_queue`` does the same on
start-up, marking in-progress items cancelled).

One connection shared by the event loop and the worker thread, behind a lock; every statement is
short, so the lock is never held for long.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    client_id TEXT,
    source TEXT NOT NULL,
    prompt TEXT NOT NULL,
    workflow TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outputs TEXT NOT NULL DEFAULT '{}',
    messages TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, number);
CREATE TABLE IF NOT EXISTS files (
    kind TEXT NOT NULL,
    subfolder TEXT NOT NULL,
    filename TEXT NOT NULL,
    path TEXT NOT NULL,
    job_id TEXT,
    node_id TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (kind, subfolder, filename)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

FINISHED = ("success", "error", "interrupted")
JOB_COLUMNS = ("seq, id, number, status, client_id, source, prompt, workflow, extra_data, outputs_to_execute, "
               "created, started, finished, outputs, messages, timings, error, runs")


@dataclass
class Job:
    """One row of the jobs table, JSON columns decoded."""

    seq: int
    id: str
    number: int
    status: str
    client_id: str | None
    source: str
    prompt: Any
    workflow: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    created: float
    started: float | None
    finished: float | None
    outputs: dict[str, Any]
    messages: list[Any]
    timings: dict[str, Any]
    error: dict[str, Any] | None
    runs: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Job:
        (seq, job_id, number, status, client_id, source, prompt, workflow, extra, outs_exec, created,
         started, finished, outputs, messages, timings, error, runs) = row
        return cls(seq, job_id, number, status, client_id, source, json.loads(prompt), json.loads(workflow),
                   json.loads(extra), json.loads(outs_exec), created, started, finished, json.loads(outputs),
                   json.loads(messages), json.loads(timings), json.loads(error) if error else None, runs)

    @property
    def folder(self) -> str:
        """The job's output subfolder (server-chosen, never derived from client input)."""
        return f"job-{self.seq:06d}"

    def queue_item(self) -> list[Any]:
        """ComfyUI's 5-list: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.id, self.prompt, self.extra_data, self.outputs_to_execute]


class Store:
    """Thread-safe access to the server's SQLite database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- start-up ---------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Mark jobs left running by a crash as interrupted; returns their ids."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()]
            error = json.dumps({"exception_type": "ServerRestart",
                                "exception_message": "the server stopped while this job was running; "
                                                     "queue it again with POST /api/jobs/{id}/requeue"})
            db.execute("UPDATE jobs SET status = 'interrupted', finished = ?, error = ? WHERE status = 'running'",
                       (time.time(), error))
        return ids

    # -- queue ------------------------------------------------------------------------------------
    def add_job(self, job_id: str, *, prompt: Any, workflow: dict[str, Any], extra_data: dict[str, Any],
                outputs: list[str], client_id: str | None, source: str, front: bool = False,
                number: int | None = None) -> int:
        """Queue a job; returns its number. Raises KeyError when the id is taken."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                raise KeyError(job_id)
            if number is None:
                if front:
                    low = db.execute("SELECT MIN(number) FROM jobs WHERE status = 'pending'").fetchone()[0]
                    number = (low if low is not None else 0) - 1
                else:
                    high = db.execute("SELECT MAX(number) FROM jobs").fetchone()[0]
                    number = (high if high is not None else -1) + 1
            db.execute(
                "INSERT INTO jobs (id, number, status, client_id, source, prompt, workflow, extra_data, "
                "outputs_to_execute, created) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, number, client_id, source, json.dumps(prompt), json.dumps(workflow),
                 json.dumps(extra_data), json.dumps(outputs), time.time()),
            )
        return number

    def claim_next(self) -> Job | None:
        """Move the first pending job to running (one transaction, so no job runs twice)."""
        with self._tx() as db:
            row = db.execute(
                f"UPDATE jobs SET status = 'running', started = ?, runs = runs + 1 WHERE seq = "
                f"(SELECT seq FROM jobs WHERE status = 'pending' ORDER BY number, seq LIMIT 1) "
                f"RETURNING {JOB_COLUMNS}", (time.time(),)
            ).fetchone()
        return Job.from_row(row) if row else None

    def finish(self, job_id: str, status: str, *, outputs: dict[str, Any], messages: list[Any],
               timings: dict[str, Any], error: dict[str, Any] | None) -> None:
        """Record a job's end (success, error or interrupted) and what it produced."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, outputs = ?, messages = ?, timings = ?, error = ? "
                "WHERE id = ?",
                (status, time.time(), json.dumps(outputs), json.dumps(messages), json.dumps(timings),
                 json.dumps(error) if error else None, job_id),
            )

    def requeue(self, job_id: str) -> int | None:
        """Queue an interrupted or failed job again at the back; returns its new number, or None."""
        with self._tx() as db:
            high = db.execute("SELECT MAX(number) FROM jobs").fetchone()[0]
            cur = db.execute(
                "UPDATE jobs SET status = 'pending', number = ?, started = NULL, finished = NULL, "
                "outputs = '{}', messages = '[]', timings = '{}', error = NULL "
                "WHERE id = ? AND status IN ('interrupted', 'error', 'cancelled')", ((high or 0) + 1, job_id))
            return (high or 0) + 1 if cur.rowcount else None

    def cancel_pending(self, ids: list[str] | None) -> list[str]:
        """Remove pending jobs from the queue (all of them when ``ids`` is None)."""
        with self._tx() as db:
            if ids is None:
                rows = db.execute("SELECT id FROM jobs WHERE status = 'pending'").fetchall()
            else:
                marks = ",".join("?" * len(ids))
                rows = db.execute(f"SELECT id FROM jobs WHERE status = 'pending' AND id IN ({marks})",
                                  tuple(ids)).fetchall()
            done = [r[0] for r in rows]
            db.executemany("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?",
                           [(time.time(), i) for i in done])
        return done

    def delete_history(self, ids: list[str] | None) -> int:
        """Forget finished jobs (their output files stay on disk and viewable)."""
        with self._tx() as db:
            if ids is None:
                cur = db.execute("DELETE FROM jobs WHERE status IN ('success', 'error', 'interrupted')")
            else:
                marks = ",".join("?" * len(ids))
                cur = db.execute(
                    f"DELETE FROM jobs WHERE status IN ('success', 'error', 'interrupted') AND id IN ({marks})",
                    tuple(ids))
            return cur.rowcount

    def job(self, job_id: str) -> Job | None:
        rows = self._all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def jobs(self, statuses: tuple[str, ...], *, newest_first: bool = False, limit: int = -1,
             offset: int = 0) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        order = "finished DESC, seq DESC" if newest_first else "number, seq"
        rows = self._all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY {order} "
                         "LIMIT ? OFFSET ?", (*statuses, limit, offset))
        return [Job.from_row(r) for r in rows]

    def history(self, max_items: int | None, offset: int = 0) -> list[Job]:
        """Finished jobs, oldest first; ``max_items`` keeps the newest ones (as ComfyUI does)."""
        marks = ",".join("?" * len(FINISHED))
        rows = self._all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) "
                         "ORDER BY finished DESC, seq DESC LIMIT ? OFFSET ?",
                         (*FINISHED, -1 if max_items is None else max_items, offset))
        return [Job.from_row(r) for r in reversed(rows)]

    def count(self, statuses: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(statuses))
        return int(self._all(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses)[0][0])

    # -- files ------------------------------------------------------------------------------------
    def add_file(self, kind: str, subfolder: str, filename: str, path: Path, job_id: str | None = None,
                 node_id: str | None = None) -> None:
        """Remember a file the server wrote or received: the only files ``/view`` serves."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (kind, subfolder, filename, str(path), job_id, node_id, time.time()))

    def file(self, kind: str, subfolder: str, filename: str) -> Path | None:
        rows = self._all("SELECT path FROM files WHERE kind = ? AND subfolder = ? AND filename = ?",
                         (kind, subfolder, filename))
        return Path(rows[0][0]) if rows else None

    def file_names(self, kind: str) -> list[str]:
        return [r[0] for r in self._all("SELECT filename FROM files WHERE kind = ? AND subfolder = '' "
                                        "ORDER BY filename", (kind,))]

    # -- settings and counters --------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._all("SELECT key, value FROM settings")}

    def set_settings(self, values: dict[str, Any]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in values.items()])

    def meta(self, key: str, default: Any = None) -> Any:
        rows = self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
