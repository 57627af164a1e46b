"""Parameter tables: rows of a CSV or JSONL file, times the product of ``--sweep`` value lists.

Each row is one run of the workflow; its columns are the workflow's declared parameters. A CSV
holds text, so each cell is typed by the inputs its parameter feeds: a parameter that only feeds
text inputs (prompts, file names, sampler names) keeps the cell as it is; any other takes the cell
as JSON when it parses (``42``, ``4.5``, ``true``) and as text otherwise, which validation then
rejects with the expected type. An empty CSV cell leaves the workflow's own value. JSONL rows are
JSON objects, typed already. Every problem is reported with the row (1 = the first data row) and
the column, before anything runs.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmgraph.graph.errors import LdmGraphError

TEXT_SOCKETS = frozenset({"STRING", "ENUM"})
MAX_PARAMS_BYTES = 256 * 1024 * 1024


class BatchInputError(LdmGraphError):
    """The parameter table (or a sweep) is unusable; holds one line per problem, row and column named."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:50]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problem(s)" if more else "")
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
    """The batch's rows: each row of the file (or one empty row) times the product of the sweeps.

    Raises :class:`BatchInputError` listing every unknown column, unreadable row and bad sweep.
    """
    problems: list[str] = []
    base = _read_file(path, declared, text_params, problems) if path is not None else [({}, {})]
    sweep_lists = parse_sweeps(sweeps, declared, text_params, problems)
    if problems:
        raise BatchInputError(problems)
    rows: list[Row] = []
    combos = list(itertools.product(*[[(name, v) for v in values] for name, values in sweep_lists]))
    for index, (values, cells) in enumerate(base, 1):
        for combo in combos:
            number = len(rows) + 1
            sweep = "sweep " + " ".join(f"{n}={_short(v)}" for n, v in combo)
            if not combo:
                where = f"row {number}"
            elif path is not None:
                where = f"row {number} (file row {index}, {sweep})"
            else:
                where = f"row {number} ({sweep})"
            rows.append(Row(number, {**values, **dict(combo)}, where, cells))
    return rows


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
        cells = next(csv.reader([text], skipinitialspace=True))
        out.append((name, [typed_cell(name, cell, text_params) for cell in cells]))
    return out


def typed_cell(name: str, cell: str, text_params: set[str]) -> Any:
    """A CSV cell (or sweep value) typed for its parameter (see the module docstring)."""
    if name in text_params:
        return cell
    try:
        return json.loads(cell)
    except ValueError:
        return cell


# -- files ------------------------------------------------------------------------------------------
def _read_file(path: Path, declared: Sequence[str], text_params: set[str],
               problems: list[str]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            problems.append(f"{path}: larger than {MAX_PARAMS_BYTES} bytes; split it into several batches")
            return []
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read the parameter file: {exc.strerror or exc}")
        return []
    kind = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(_not_utf8(path, data, exc, kind))
        return []
    if not text.strip():
        problems.append(f"{path} header (line 1), column 1: the file is empty; a {'CSV needs a header row naming parameters, then one row per run' if kind == 'csv' else 'JSONL file needs one JSON object per line'}")
        return []
    reader = _read_jsonl if kind == "jsonl" else _read_csv
    return reader(path, text, declared, text_params, problems)


def _read_csv(path: Path, text: str, declared: Sequence[str], text_params: set[str],
              problems: list[str]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        problems.append(f"{path}: not a readable CSV file: {exc}")
        return []
    header = [h.strip() for h in table[0]]
    for number, name in enumerate(header, 1):
        if name not in declared:
            problems.append(f"{path} header (line 1), column {number} {name!r}: the workflow declares no "
                            f"parameter {name!r} (declared: {', '.join(declared) or 'none'})")
    for name in sorted({n for n in header if header.count(n) > 1}):
        problems.append(f"{path} header (line 1), column {name!r}: appears more than once")
    rows = []
    for index, cells in enumerate((r for r in table[1:] if any(c.strip() for c in r)), 1):
        if len(cells) != len(header):
            problems.append(f"{path} row {index}: {len(cells)} cell(s) for {len(header)} column(s)")
            continue
        values = {n: typed_cell(n, c, text_params) for n, c in zip(header, cells, strict=True) if c != ""}
        rows.append((values, dict(zip(header, cells, strict=True))))
    if not rows and not problems:
        problems.append(f"{path}: a header but no rows; add one row per run under the header")
    return rows


def _read_jsonl(path: Path, text: str, declared: Sequence[str], text_params: set[str],
                problems: list[str]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    rows: list[tuple[dict[str, Any], dict[str, str]]] = []
    index = 0
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        index += 1
        try:
            values = json.loads(line)
        except ValueError as exc:
            problems.append(f"{path} row {index} (line {line_number}): not valid JSON: {exc}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{path} row {index} (line {line_number}): expected a JSON object "
                            f'{{"parameter": value, ...}}, got {type(values).__name__}')
            continue
        for name in values:
            if name not in declared:
                problems.append(f"{path} row {index}, column {name!r}: the workflow declares no parameter "
                                f"{name!r} (declared: {', '.join(declared) or 'none'})")
        rows.append((values, {}))
    return rows


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, kind: str) -> str:
    """Name the row and column of the first byte that is not UTF-8."""
    before = data[: exc.start]
    line_start = before.rfind(b"\n") + 1
    line_number = before.count(b"\n") + 1
    prefix = data[line_start : exc.start].decode("utf-8", "replace")
    where = f"line {line_number}"
    if kind == "csv":
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8", "replace")]), [])
        column = len(next(csv.reader([prefix]), [""]))
        name = header[column - 1].strip() if 0 < column <= len(header) else "?"
        row = "header (line 1)" if line_number == 1 else f"row {line_number - 1} (line {line_number})"
        where = f"{row}, column {column} {name!r}" if line_number > 1 else f"{row}, column {column}"
    else:
        where = f"row {line_number} (line {line_number})"
    return (f"{path} {where}: byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8 text; "
            "save the file as UTF-8")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."
