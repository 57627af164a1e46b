"""Check every row of a batch before the first one runs, and key each row for resume and grouping.

Each row is validated exactly as ``ldmgraph run --set ...`` would validate it (the workflow's own
validation, with the row's values as parameter overrides), so a bad value in row 17 is found
before row 1 runs. A problem at an input that a row's column feeds is reported as that row and
column; a problem of the workflow itself, the same in every row, is reported once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import Problem, ValidationError
from ldmgraph.graph.registry import Registry
from ldmgraph.graph.validate import CompiledWorkflow, validate_workflow

from .params import BatchInputError, Row


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
