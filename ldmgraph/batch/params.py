"""Parameter tables: rows of a CSV or JSONL file, times the product of ``--sweep`` value lists.

Each row is one run of the workflow; its columns are the workflow's declared parameters. A CSV
holds text, so each cell is typed by the inputs its parameter feeds: a parameter that only feeds
text inputs (prompts, file names, sampler names) keeps the cell as it is; any other takes the cell
as JSON when it parses (``42``, ``4.5``, ``true``) and as text otherwise, which validation then
rejects with the expected type. An empty CSV cell leaves the workflow's own value. JSONL rows are
JSON objects, typed already. Every problem is reported with the row (1 = the first data row) and
the column, before anything runs.

Tables are streamed, never held whole: :func:`open_rows` reads the file once to check its shape
and count its rows, and a :class:`RowSource` then yields rows lazily, each file row times the
product of the sweeps (the product is never built). What a hostile table can make us do is
bounded: the table must be a regular file (not a FIFO or a device), a line at most
``MAX_LINE_BYTES``, a cell at most ``MAX_CELL_CHARS`` and nested at most ``MAX_NESTING`` deep, the
whole batch at most ``--max-rows`` rows; problems are listed up to ``SHOWN_PROBLEMS`` and counted
beyond.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.graph.errors import LdmGraphError
from ldmgraph.graph.limits import json_nesting

TEXT_SOCKETS = frozenset({"STRING", "ENUM"})
MAX_PARAMS_BYTES = 1024 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
MAX_CELL_CHARS = 64 * 1024
MAX_NESTING = 32
MAX_ROWS = 1_000_000
"""Default of ``--max-rows``: a batch larger than this is refused before anything is read twice."""
SHOWN_PROBLEMS = 50


class Problems(list):  # type: ignore[type-arg]
    """A list of problem lines that keeps the first ``SHOWN_PROBLEMS`` and counts the rest (a table of a
    million bad rows costs no memory for its messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def append(self, line: str) -> None:  # type: ignore[override]
        if len(self) < SHOWN_PROBLEMS:
            super().append(line)
        else:
            self.dropped += 1


class BatchInputError(LdmGraphError):
    """The parameter table (or a sweep) is unusable; holds one line per problem, row and column named."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)[:SHOWN_PROBLEMS]
        more = getattr(problems, "dropped", 0) + len(problems) - len(self.problems)
        if more:
            self.problems.append(f"... and {more} more problem(s)")
        text = "\n".join(self.problems)
        super().__init__(text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``--json``."""
        return {"ok": False, "error": "BatchInputError", "problems": self.problems}


@dataclass
class Row:
    """One run: its number (1-based, the output and manifest name) and its parameter values."""

    number: int
    values: dict[str, Any]
    source: str  # where the values came from, for messages: "row 3" or "row 3, sweep seed=7"
    text_cells: dict[str, str] = field(default_factory=dict, repr=False)  # CSV cells, for messages


def text_parameters(doc: Mapping[str, Any], socket_of: Any) -> set[str]:
    """Names of the parameters whose every target is a text input (CSV cells stay text for them).

    ``socket_of(node_type, input_name)`` returns the input's socket name, or None when unknown.
    """
    nodes = doc.get("nodes", {}) if isinstance(doc, Mapping) else {}
    names = set()
    for name, param in (doc.get("parameters") or {}).items():
        sockets = [socket_of(nodes.get(t.get("node"), {}).get("type"), t.get("input"))
                   for t in param.get("targets", []) if isinstance(t, Mapping)]
        if sockets and all(s in TEXT_SOCKETS for s in sockets):
            names.add(name)
    return names


def read_rows(path: Path | None, sweeps: Sequence[str], declared: Sequence[str],
              text_params: set[str]) -> list[Row]:
    """The batch's rows as a list (small tables; the CLI streams them with :func:`open_rows`)."""
    return list(open_rows(path, sweeps, declared, text_params))


def open_rows(path: Path | None, sweeps: Sequence[str], declared: Sequence[str], text_params: set[str], *,
              constant: Mapping[str, Any] | None = None, max_rows: int = MAX_ROWS) -> RowSource:
    """Check the table's shape and the sweeps, count the rows, and return them as a stream.

    Raises :class:`BatchInputError` listing every unknown column, unreadable row and bad sweep.
    """
    problems = Problems()
    if path is not None:
        _check_regular_file(path, problems)
    sweep_lists = parse_sweeps(sweeps, declared, text_params, problems)
    if problems:
        raise BatchInputError(problems)
    file_rows = 1
    if path is not None:
        file_rows = sum(1 for _ in _stream_file(path, declared, text_params, problems))
        if not file_rows and not problems:
            problems.append(f"{path}: a header but no rows; add one row per run under the header")
    if problems:
        raise BatchInputError(problems)
    source = RowSource(path, sweep_lists, declared, text_params, file_rows, dict(constant or {}))
    if source.total > max_rows:
        raise BatchInputError([f"[over_budget] the table and sweeps make {source.total} rows ({file_rows} row(s) x "
                               + " x ".join(f"{len(v)} {n}" for n, v in sweep_lists) +
                               f"), more than --max-rows {max_rows}; split the batch or raise --max-rows"])
    return source


@dataclass
class RowSource:
    """A batch's rows, streamed: each file row times the product of the sweeps, built as it is read."""

    path: Path | None
    sweep_lists: list[tuple[str, list[Any]]]
    declared: Sequence[str]
    text_params: set[str]
    file_rows: int
    constant: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.file_rows * math.prod(len(values) for _, values in self.sweep_lists)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Row]:
        base: Any = [({}, {})]
        if self.path is not None:
            base = _stream_file(self.path, self.declared, self.text_params, Problems())
        number = 0
        named = [[(name, v) for v in values] for name, values in self.sweep_lists]
        for index, (values, cells) in enumerate(base, 1):
            for combo in itertools.product(*named):
                number += 1
                sweep = "sweep " + " ".join(f"{n}={_short(v)}" for n, v in combo)
                if not combo:
                    where = f"row {number}"
                elif self.path is not None:
                    where = f"row {number} (file row {index}, {sweep})"
                else:
                    where = f"row {number} ({sweep})"
                yield Row(number, {**self.constant, **values, **dict(combo)}, where, cells)


def parse_sweeps(sweeps: Sequence[str], declared: Sequence[str], text_params: set[str],
                 problems: list[str]) -> list[tuple[str, list[Any]]]:
    """``["seed=1,2,3"]`` -> ``[("seed", [1, 2, 3])]``; problems appended, naming the sweep."""
    out: list[tuple[str, list[Any]]] = []
    for item in sweeps:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text:
            problems.append(f"--sweep {item!r}: expected NAME=V1,V2,... (e.g. seed=1,2,3)")
            continue
        if name not in declared:
            problems.append(f"--sweep {name}: the workflow declares no parameter {name!r} "
                            f"(declared: {', '.join(declared) or 'none'})")
            continue
        try:
            cells = next(csv.reader([text], skipinitialspace=True))
            out.append((name, [typed_cell(name, cell, text_params) for cell in cells]))
        except (CellError, csv.Error) as exc:
            problems.append(f"--sweep {name}: {exc}")
    return out


class CellError(ValueError):
    """A cell too long or nested too deep to be a parameter value."""


def typed_cell(name: str, cell: str, text_params: set[str]) -> Any:
    """A CSV cell (or sweep value) typed for its parameter (see the module docstring)."""
    if len(cell) > MAX_CELL_CHARS:
        raise CellError(f"[too_deep] a value of {len(cell)} characters; at most {MAX_CELL_CHARS}")
    if name in text_params:
        return cell
    _check_nesting(cell)
    try:
        return json.loads(cell)
    except ValueError:
        return cell


def _check_nesting(text: str) -> None:
    """Refuse JSON text nested deeper than MAX_NESTING (measured in a loop, before any parser recurses)."""
    if text.count("[") + text.count("{") > MAX_NESTING and json_nesting(text) > MAX_NESTING:
        raise CellError(f"[too_deep] a value nested deeper than {MAX_NESTING} levels")


# -- files ------------------------------------------------------------------------------------------
def _check_regular_file(path: Path, problems: list[str]) -> None:
    """A table is read only from a regular file: a FIFO would block and /dev/zero never ends."""
    try:
        info = path.stat()
    except OSError as exc:
        problems.append(f"{path}: cannot read the parameter file: {exc.strerror or exc}")
        return
    if not stat.S_ISREG(info.st_mode):
        problems.append(f"{path}: [not_a_file] not a regular file (a folder, FIFO or device); give a .csv or "
                        ".jsonl file")
    elif info.st_size > MAX_PARAMS_BYTES:
        problems.append(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; split it into several batches")


def _lines(path: Path, problems: list[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8, each at most MAX_LINE_BYTES; stops at the first
    line that is not UTF-8 or too long, with a problem naming it."""
    header = ""
    with path.open("rb") as handle:
        fd = handle.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO since it was checked
            problems.append(f"{path}: [not_a_file] not a regular file")
            return
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                problems.append(f"{path} line {number}: [too_deep] longer than {MAX_LINE_BYTES} bytes; one row per line")
                return
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(_not_utf8(path, raw, number, exc, header))
                return
            if number == 1:
                header = text
            yield number, text


def _stream_file(path: Path, declared: Sequence[str], text_params: set[str],
                 problems: list[str]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    kind = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    reader = _stream_jsonl if kind == "jsonl" else _stream_csv
    empty = True
    for item in reader(path, declared, text_params, problems):
        empty = False
        yield item
    if empty and not problems and _blank(path):
        problems.append(f"{path} header (line 1), column 1: the file is empty; a "
                        f"{'CSV needs a header row naming parameters, then one row per run' if kind == 'csv' else 'JSONL file needs one JSON object per line'}")


def _blank(path: Path) -> bool:
    with path.open("rb") as handle:
        return not handle.read(MAX_LINE_BYTES).strip()


def _stream_csv(path: Path, declared: Sequence[str], text_params: set[str],
                problems: list[str]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    reader = csv.reader(text for _, text in _lines(path, problems))
    try:
        first = next(reader, None)
        if first is None:
            return
        header = [h.strip() for h in first]
        if not any(header):
            return
        for number, name in enumerate(header, 1):
            if name not in declared:
                problems.append(f"{path} header (line 1), column {number} {name!r}: the workflow declares no "
                                f"parameter {name!r} (declared: {', '.join(declared) or 'none'})")
        for name in sorted({n for n in header if header.count(n) > 1}):
            problems.append(f"{path} header (line 1), column {name!r}: appears more than once")
        index = 0
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            index += 1
            if len(cells) != len(header):
                problems.append(f"{path} row {index}: {len(cells)} cell(s) for {len(header)} column(s)")
                continue
            try:
                values = {n: typed_cell(n, c, text_params) for n, c in zip(header, cells, strict=True) if c != ""}
            except CellError as exc:
                problems.append(f"{path} row {index}: {exc}")
                continue
            yield values, dict(zip(header, cells, strict=True))
    except csv.Error as exc:
        problems.append(f"{path}: not a readable CSV file: {exc}")


def _stream_jsonl(path: Path, declared: Sequence[str], text_params: set[str],
                  problems: list[str]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    index = 0
    for line_number, line in _lines(path, problems):
        if not line.strip():
            continue
        index += 1
        try:
            if len(line) > MAX_CELL_CHARS * 16:
                raise CellError(f"[too_deep] a row of {len(line)} characters")
            _check_nesting(line)
            values = json.loads(line)
        except (ValueError, RecursionError) as exc:
            code = "too_deep" if isinstance(exc, CellError) else "bad_parameter"
            problems.append(f"{path} row {index} (line {line_number}): [{code}] not valid JSON: {str(exc)[:200]}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{path} row {index} (line {line_number}): expected a JSON object "
                            f'{{"parameter": value, ...}}, got {type(values).__name__}')
            continue
        unknown = [name for name in values if name not in declared]
        for name in unknown:
            problems.append(f"{path} row {index}, column {_short(str(name))!r}: the workflow declares no parameter "
                            f"{_short(str(name))!r} (declared: {', '.join(declared) or 'none'})")
        if not unknown:
            yield values, {}


def _not_utf8(path: Path, raw: bytes, line_number: int, exc: UnicodeDecodeError, header: str) -> str:
    """Name the row and column of the first byte that is not UTF-8 (in line `line_number`)."""
    prefix = raw[: exc.start].decode("utf-8", "replace")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        where = f"row {line_number} (line {line_number})"
    else:
        names = next(csv.reader([header]), []) if header else []
        column = len(next(csv.reader([prefix]), [""]))
        name = names[column - 1].strip() if 0 < column <= len(names) else "?"
        row = "header (line 1)" if line_number == 1 else f"row {line_number - 1} (line {line_number})"
        where = f"{row}, column {column} {name!r}" if line_number > 1 else f"{row}, column {column}"
    return (f"{path} {where}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} of the line is not UTF-8 "
            "text; save the file as UTF-8")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."
