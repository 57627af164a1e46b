"""Safe file handling for nodes: atomic writes and folder-confined names.

Outputs are written to a temporary name in the same folder, flushed, then renamed, so a failed or
cancelled run never leaves a half-written file (POSIX ``rename`` is atomic within a filesystem).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UnsafePathError


def safe_join(folder: str | os.PathLike[str], name: str) -> Path:
    """Join a file name from a workflow to its folder, refusing anything that escapes it.

    Absolute paths, ``..`` components, drive letters, NUL bytes and symlinks pointing outside the
    folder are refused with :class:`UnsafePathError`.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"invalid file name {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"file name {name!r} must be relative to {folder}")
    parts = name.replace("\\", "/").split("/")
    if any(part == ".." for part in parts):
        raise UnsafePathError(f"file name {name!r} may not contain '..'")
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"file name {name!r} escapes the folder {folder}")
    return target


def _write_temp(folder: Path, data: bytes, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ldmgraph-", suffix=suffix + ".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (replaces an existing file)."""
    target = Path(path)
    tmp = _write_temp(target.parent, data, target.suffix)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_new(folder: str | os.PathLike[str], prefix: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` as ``{prefix}_{counter:05d}_{suffix}`` in ``folder``, never overwriting a file.

    The counter starts after the highest existing one; a hard link claims the name atomically, so
    two concurrent writers never get the same file.
    """
    base = Path(folder)
    prefix_path = safe_join(base, f"{prefix}_00000_{suffix}") if prefix else None
    if prefix_path is None:
        raise UnsafePathError("filename prefix may not be empty")
    target_dir = prefix_path.parent
    stem = Path(prefix).name
    tmp = _write_temp(target_dir, data, suffix)
    try:
        counter = _next_counter(target_dir, stem, suffix)
        while True:
            final = target_dir / f"{stem}_{counter:05d}_{suffix}"
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                counter += 1
            except OSError:  # filesystems without hard links: best effort
                if final.exists():
                    counter += 1
                    continue
                os.replace(tmp, final)
                return final
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _next_counter(folder: Path, stem: str, suffix: str) -> int:
    highest = 0
    head, tail = f"{stem}_", f"_{suffix}"
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(head) and name.endswith(tail):
            middle = name[len(head) : len(name) - len(tail)]
            if middle.isdigit():
                highest = max(highest, int(middle))
    return highest + 1
