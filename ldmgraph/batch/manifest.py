"""The batch manifest: ``manifest.jsonl`` in the output folder, one JSON line per finished row.

A line is appended (and flushed to disk) as each row finishes, so an interrupted batch keeps every
row it finished. Fields: ``row``, ``status`` ("ok" | "failed"), ``key`` (digest of the workflow and
the row's values), ``params``, ``seed``, ``outputs`` (file names in the output folder),
``seconds``, ``worker``, ``attempts``, ``error`` and ``retried`` (errors of earlier attempts). A
row's latest line wins; a torn last line (the process killed mid-write) is ignored.

The manifest is checked before any row runs (:meth:`Manifest.check`): it must be absent or a
regular file. A symbolic link planted there is never followed (it could point at any file the user
can write), and a FIFO or a folder would block or fail after the first row had run.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ldmgraph.graph.errors import LdmGraphError

MANIFEST_NAME = "manifest.jsonl"


class ManifestError(LdmGraphError):
    """The output folder's manifest is not a regular file (a link, FIFO, folder or device)."""


class Manifest:
    """Append-only JSONL record of a batch's finished rows, read back to resume."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / MANIFEST_NAME
        self._handle: Any = None

    def check(self) -> None:
        """Raise ManifestError unless the manifest is absent or a regular file (links not followed)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ManifestError(f"{self.path}: [output_not_writable] cannot inspect the manifest ({exc.strerror})") from exc
        if not stat.S_ISREG(info.st_mode):
            kind = ("a symbolic link" if stat.S_ISLNK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
                    else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file")
            raise ManifestError(f"{self.path}: [output_not_writable] the batch manifest is {kind}; remove it or "
                                "choose another --output-dir (nothing ran)")

    def latest(self) -> dict[int, dict[str, Any]]:
        """Each row's latest record (unreadable lines skipped)."""
        records: dict[int, dict[str, Any]] = {}
        self.check()
        if not self.path.exists():
            return records
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("row"), int):
                    records[record["row"]] = record
        return records

    def finished(self, output_dir: Path) -> dict[int, str]:
        """Rows whose latest record is "ok" and whose outputs are all still there: row -> key."""
        done = {}
        for number, record in self.latest().items():
            outputs = record.get("outputs") or []
            if record.get("status") == "ok" and all((output_dir / name).is_file() for name in outputs):
                done[number] = str(record.get("key"))
        return done

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and push it to disk before returning."""
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.check()
            if self.path.is_file() and self.path.stat().st_size:
                _end_torn_line(self.path)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(self.path, flags, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check
                os.close(fd)
                raise ManifestError(f"{self.path}: [output_not_writable] the batch manifest is not a regular file")
            self._handle = os.fdopen(fd, "a", encoding="utf-8")
        self._handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _end_torn_line(path: Path) -> None:
    """If the last line was cut short by a kill, end it so the next record starts on its own line."""
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            handle.write(b"\n")
