"""Safe file handling for nodes: bounded reads of regular files, atomic writes, folder-confined
and portable names.

Outputs are written to a temporary name in the same folder, flushed, then renamed, so a failed or
cancelled run never leaves a half-written file (POSIX ``rename`` is atomic within a filesystem).
They get the mode ``0666 & ~umask``, as any file the user's programs create. Inputs are read only
from regular files and never past a bound, so ``/dev/zero`` or a FIFO named as a file is an error,
not an endless read or a wait.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import tempfile
from pathlib import Path

from . import codes
from .errors import FileTooLargeError, NotAFileError, UnsafePathError

MAX_INPUT_FILE_BYTES = 256 * 1024**2  # an input image or PNG workflow file
MAX_PREFIX_CHARS = 200  # leaves room for "_00001_.png" within the usual 255-byte name limit
_RESERVED_CHARS = re.compile(r'[<>:"|?*\\\x00-\x1f\x7f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, in words ("a regular file", "a FIFO", ...)."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` (links followed) is a regular file, else what it is ("a FIFO", ...).

    Raises ``OSError`` (``FileNotFoundError``, ...) when it cannot be looked at.
    """
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else file_kind(mode)


def read_regular_file(path: str | os.PathLike[str], limit: int = MAX_INPUT_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened non-blocking, so a FIFO does not wait for a writer; the type is checked on the open file
    (no race with a swapped path); the read stops at ``limit + 1`` bytes whatever ``st_size`` says
    (0 for devices). Raises :class:`NotAFileError`, :class:`FileTooLargeError` or ``OSError``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFileError(f"{path} is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise FileTooLargeError(f"{path} is {info.st_size} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileTooLargeError(f"{path} is larger than the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def input_file_problem(folder: str | os.PathLike[str], name: object) -> tuple[str, str] | None:
    """``(code, message)`` when ``name`` is not a regular file inside the input ``folder``."""
    if not isinstance(name, str):
        return None  # the literal's own type check reports it
    try:
        path = safe_join(folder, name)
    except UnsafePathError as exc:
        return codes.UNSAFE_PATH, (f"{exc}; name a file inside the input folder {folder}, pass its folder "
                                   "with --input-dir, or name the file itself on the command line (--set NAME=PATH)")
    try:
        kind = not_a_regular_file(path)
    except OSError:
        return codes.FILE_NOT_FOUND, (f"file {name!r} not found in the input folder {folder}; "
                                      "put it there or pass --input-dir")
    if kind is not None:
        return codes.NOT_A_FILE, f"{name!r} in the input folder {folder} is {kind}, not a regular file"
    return None


def check_file_name_prefix(prefix: object) -> tuple[str, str] | None:
    """``(code, reason)`` when an output file-name prefix is not portable or leaves its folder.

    A prefix is one or more ``/``-separated parts (subfolders, then the file's stem). Refused:
    an empty prefix or part, more than 200 characters, ``.`` / ``..``, a leading dot (a hidden
    file), a leading ``~`` (a shell would expand it), control characters (newline, tab, ...), the
    characters Windows reserves (``<>:"|?*\\``), a trailing space or dot, Windows device names
    (``CON``, ``NUL``, ...), an absolute path, and text that is not valid Unicode.
    """
    if not isinstance(prefix, str) or not prefix:
        return codes.BAD_FILE_NAME, "the file name prefix is empty; give a name such as 'ldmgraph'"
    if len(prefix) > MAX_PREFIX_CHARS:
        return codes.BAD_FILE_NAME, (f"the file name prefix has {len(prefix)} characters; "
                                     f"use at most {MAX_PREFIX_CHARS}")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        return codes.BAD_FILE_NAME, "the file name prefix is not valid Unicode (a lone surrogate)"
    if prefix.startswith("/") or (len(prefix) > 1 and prefix[1] == ":"):
        return codes.UNSAFE_PATH, f"file name prefix {prefix!r} must be relative to the output folder"
    for part in prefix.split("/"):
        reason = _part_problem(part)
        if reason is not None:
            code = codes.UNSAFE_PATH if part == ".." else codes.BAD_FILE_NAME
            return code, f"file name prefix {prefix!r}: {reason}"
    return None


def _part_problem(part: str) -> str | None:
    if part in ("", ".", ".."):
        return f"the part {part!r} is not a file or folder name" if part else "it has an empty part ('//' or a '/' at the end)"
    if part.startswith("."):
        return f"{part!r} starts with a dot, which would make a hidden file; remove the dot"
    if part.startswith("~"):
        return f"{part!r} starts with '~', which a shell would expand to a home folder"
    bad = _RESERVED_CHARS.search(part)
    if bad is not None:
        return f"{part!r} contains the character {bad.group()!r}, which is not portable in file names"
    if part.endswith((" ", ".")):
        return f"{part!r} ends with a space or a dot, which Windows drops"
    if part.split(".")[0].upper() in _WINDOWS_RESERVED:
        return f"{part!r} is a device name on Windows"
    return None


def output_folder_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written in ``folder`` (created on demand), or None when they can.

    The folder must be a writable folder, or not exist yet under a writable folder: not a file, not
    under a file, not read-only. (A full disk can only show when writing.)
    """
    path = Path(os.path.abspath(folder))
    for candidate in (path, *path.parents):
        try:
            mode = os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            return f"cannot look at {candidate}: {exc.strerror or exc}"
        if not stat.S_ISDIR(mode):
            where = "is" if candidate == path else f"lies under {candidate}, which is"
            return f"the output folder {path} {where} {file_kind(mode)}, not a folder"
        if not os.access(candidate, os.W_OK | os.X_OK):
            return f"the folder {candidate} is not writable, so {path} cannot be written"
        return None
    return f"no part of {path} exists"


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


@functools.cache
def _file_mode() -> int:
    """0666 less the process's umask (read once: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(folder: Path, data: bytes, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ldmgraph-", suffix=suffix + ".tmp", dir=folder)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())  # mkstemp makes 0600; outputs follow the umask
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
    problem = check_file_name_prefix(prefix)
    if problem is not None:
        raise UnsafePathError(problem[1])
    target_dir = safe_join(base, f"{prefix}_00000_{suffix}").parent
    stem = Path(prefix).name
    try:
        return _write_new(target_dir, stem, suffix, data)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # name the file: "No space left on device" alone says too little
        where = str(target_dir / f"{stem}_NNNNN_{suffix}")
        if exc.errno is None:
            raise OSError(f"{exc} (writing {where})") from exc
        raise type(exc)(exc.errno, exc.strerror, where) from exc


def _write_new(target_dir: Path, stem: str, suffix: str, data: bytes) -> Path:
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
