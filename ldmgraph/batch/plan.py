"""Check every row of a batch before the first one runs, and key each row for resume and grouping.

Each row is validated exactly as ``ldmgraph run --set ...`` would validate it (the workflow's own
validation, with the row's values as parameter overrides), so a bad value in row 17 is found
before row 1 runs. A problem at an input that a row's column feeds is reported as that row and
column; a problem of the workflow itself, the same in every row, is reported once.

Large tables are checked in two steps, so a million rows are checked in seconds: before anything
runs, :func:`check_rows` validates the workflow whole with the first row's values and then checks
every row's values against the inputs they feed (type, bounds, choices: the same checks and
messages as validation) as they stream past, with a progress bar; then :func:`plan_lazily`
validates each row whole just before it runs, so what only the whole graph can tell (a missing
input file named in row 70,000, a memory estimate over the budget) fails that row, named in the
manifest, and the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import Problem, ValidationError
from ldmgraph.graph.registry import Registry
from ldmgraph.graph.validate import CompiledWorkflow, validate_workflow

from .params import BatchInputError, Problems, Row


@dataclass(frozen=True)
class PlannedRow:
    """A validated row: its number, its parameter values, and the keys the driver needs."""

    number: int
    params: dict[str, Any]
    key: str  # digest of the workflow and the row's values: a finished row with this key is skipped
    model_key: str  # the loader nodes' inputs: rows with the same one share loaded models


def plan_rows(doc: Mapping[str, Any], rows: Sequence[Row], registry: Registry, env: Environment,
              outputs: list[str] | None = None, label: str = "") -> list[PlannedRow]:
    """Validate every row; raise :class:`BatchInputError` with all problems, row and column named."""
    targets = _columns_by_target(doc)
    by_column: list[str] = []
    shared: dict[str, list[int]] = {}
    planned: list[PlannedRow] = []
    workflow_digest = digest(doc)
    for row in rows:
        try:
            compiled = validate_workflow(doc, registry, env, row.values, outputs)
        except ValidationError as exc:
            for problem in exc.problems:
                column = targets.get((problem.node_id, problem.input))
                if column in row.values:
                    by_column.append(_row_problem(label, row, column, problem))
                else:
                    shared.setdefault(str(problem), []).append(row.number)
            continue
        planned.append(PlannedRow(row.number, dict(row.values), digest([workflow_digest, row.values]),
                                  model_key(compiled)))
    if by_column or shared:
        raise BatchInputError(by_column + [_shared_problem(text, numbers, len(rows))
                                           for text, numbers in shared.items()])
    return planned


@dataclass(frozen=True)
class UnplannedRow:
    """A row that failed whole-graph validation just before it was to run: recorded as failed."""

    number: int
    params: dict[str, Any]
    key: str
    problems: list[str]


def check_rows(doc: Mapping[str, Any], rows: Iterable[Row], registry: Registry, env: Environment,
               outputs: list[str] | None = None, label: str = "", total: int | None = None,
               progress: bool = False) -> None:
    """Validate the workflow with the first row, then every row's values against their inputs.

    Raises :class:`BatchInputError` with all problems (the first 50 listed, the rest counted).
    """
    problems = Problems()
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return
    try:
        plan_rows(doc, [first], registry, env, outputs, label)
    except BatchInputError as exc:
        problems.extend(exc.problems)
    specs = _input_specs(doc, registry)
    bar = _bar(total, progress)
    try:
        for row in iterator:
            for column, value in row.values.items():
                for spec in specs.get(column, ()):
                    _, code, message = spec.check_literal(value, registry)
                    if code is not None:
                        problems.append(_row_problem(label, row, column, Problem(None, spec.name, code, message)))
                        break
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if problems:
        raise BatchInputError(problems)


def plan_lazily(doc: Mapping[str, Any], rows: Iterable[Row], registry: Registry, env: Environment,
                outputs: list[str] | None = None, label: str = "") -> Iterator[PlannedRow | UnplannedRow]:
    """Each row validated whole as it is needed (see the module docstring)."""
    workflow_digest = digest(doc)
    for row in rows:
        key = digest([workflow_digest, row.values])
        try:
            compiled = validate_workflow(doc, registry, env, row.values, outputs)
        except ValidationError as exc:
            yield UnplannedRow(row.number, dict(row.values), key, [str(p) for p in exc.problems[:10]])
            continue
        yield PlannedRow(row.number, dict(row.values), key, model_key(compiled))


def _input_specs(doc: Mapping[str, Any], registry: Registry) -> dict[str, list[Any]]:
    """Each parameter's target input declarations (only those of literal inputs of known node types)."""
    nodes = doc.get("nodes") or {}
    out: dict[str, list[Any]] = {}
    for name, param in (doc.get("parameters") or {}).items():
        for target in param.get("targets", []) if isinstance(param, Mapping) else []:
            node = nodes.get(target.get("node")) if isinstance(target, Mapping) else None
            cls = registry.node(node.get("type")) if isinstance(node, Mapping) and isinstance(node.get("type"), str) else None
            spec = cls.spec.inputs.get(target.get("input")) if cls is not None else None
            if spec is not None and spec.socket.literal:
                out.setdefault(name, []).append(spec)
    return out


def _bar(total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total - 1 if total else None, unit="row", desc="checking rows", file=sys.stderr,
                dynamic_ncols=True, disable=None, mininterval=0.5)


def model_key(compiled: CompiledWorkflow) -> str:
    """What a run loads: the type and inputs of its loader nodes (checkpoint names and options)."""
    loaders = sorted((node.spec.type_name, node.literals) for node in compiled.nodes.values()
                     if node.spec.category == "loaders" and node.node_id in compiled.order)
    return json.dumps(loaders, sort_keys=True, default=str)


def digest(value: Any) -> str:
    """A short, stable digest of a JSON value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def group_by_model(rows: Sequence[PlannedRow]) -> list[PlannedRow]:
    """Rows reordered so that rows sharing loaded models are adjacent (groups in order of first use)."""
    first_use: dict[str, int] = {}
    for index, row in enumerate(rows):
        first_use.setdefault(row.model_key, index)
    return sorted(rows, key=lambda r: (first_use[r.model_key], r.number))


def _columns_by_target(doc: Mapping[str, Any]) -> dict[tuple[str | None, str | None], str]:
    out: dict[tuple[str | None, str | None], str] = {}
    for name, param in (doc.get("parameters") or {}).items():
        for target in param.get("targets", []):
            if isinstance(target, Mapping):
                out[(target.get("node"), target.get("input"))] = name
    return out


def _row_problem(label: str, row: Row, column: str, problem: Problem) -> str:
    cell = row.text_cells.get(column)
    value = cell if cell is not None else row.values.get(column)
    prefix = f"{label} " if label else ""
    return (f"{prefix}{row.source}, column {column!r} (value {value!r}): [{problem.code}] {problem.message}")


def _shared_problem(text: str, numbers: list[int], total: int) -> str:
    if len(numbers) == total:
        return f"workflow (every row): {text}"
    shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
    return f"rows {shown}: {text}"
