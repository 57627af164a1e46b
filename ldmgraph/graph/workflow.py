"""The workflow file format ``ldmgraph/1``: pydantic models, JSON Schema, and a tolerant loader.

A workflow maps node ids to ``{type, inputs, title?, pos?}``; an input is either a link
``{"node": id, "output": name}`` or a JSON literal. ``parameters`` name the values a caller may
override (``--set name=value``) and the inputs each one goes to. A workflow that declares
``outputs`` by name is also a node type, ``workflow/<stem>`` (see :mod:`.components`). See
docs/INTERFACES.md.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from . import codes
from .errors import Problem, ValidationError

FORMAT = "ldmgraph/1"
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64  # containers inside containers, counted from the document itself
MAX_INT_BITS = 13_000  # about 3,900 digits: Python refuses to print ints of more than 4,300
MAX_SCAN_PROBLEMS = 20


class Link(BaseModel):
    """A link to a named output of another node."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node: str = Field(description="id of the source node")
    output: str = Field(description="name of the source node's output")


class NodeEntry(BaseModel):
    """One node of a workflow."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="node type name, as listed by `ldmgraph nodes`")
    inputs: dict[str, Link | Any] = Field(
        default_factory=dict, description='input name -> literal, or a link {"node": id, "output": name}'
    )
    title: str | None = Field(default=None, description="optional display title")
    pos: list[float] | None = Field(default=None, description="optional editor position [x, y]")


class ParameterTarget(BaseModel):
    """Where a parameter's value goes: one input of one node."""

    model_config = ConfigDict(extra="forbid")
    node: str
    input: str


class Parameter(BaseModel):
    """A value a caller may override by name (prompt, seed, steps, ...)."""

    model_config = ConfigDict(extra="forbid")
    targets: list[ParameterTarget] = Field(min_length=1, description="inputs that receive the value")
    description: str = ""


class Workflow(BaseModel):
    """A whole workflow document."""

    model_config = ConfigDict(extra="forbid", title="ldmgraph workflow")
    format: Literal["ldmgraph/1"] = Field(description="format and version of this document")
    nodes: dict[str, NodeEntry] = Field(description="node id -> node")
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    outputs: list[str] | dict[str, Link] | None = Field(
        default=None,
        description="a list: ids of the output nodes to run (default: every output node); a mapping "
        'name -> {"node": id, "output": name}: the outputs this workflow declares, which make it a node '
        "type `workflow/<file stem>` whose inputs are its parameters",
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form (author, notes, ...)")


def workflow_json_schema() -> dict[str, Any]:
    """The JSON Schema of the workflow file (what ``ldmgraph schema`` prints)."""
    schema = Workflow.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def parse_workflow(doc: Any) -> Workflow:
    """Turn a decoded JSON document into a :class:`Workflow`, or raise our ``ValidationError``.

    Never raises anything else, whatever the shape of ``doc`` (deep nesting, odd types, unicode).
    """
    if isinstance(doc, Workflow):
        return doc
    if not isinstance(doc, dict):
        raise _bad(f"a workflow is a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise _bad(f'"format" must be "{FORMAT}" (got {_short(doc.get("format"))}); is this a ComfyUI file? '
                   "`ldmgraph run` converts those automatically")
    problems = scan_document(doc)
    if problems:
        raise ValidationError(problems)
    try:
        return Workflow.model_validate(doc)
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False)[:50]:
            loc = [str(part) for part in err.get("loc", ())]
            node_id = loc[1] if len(loc) > 1 and loc[0] == "nodes" else None
            input_name = loc[3] if len(loc) > 3 and loc[2] == "inputs" else None
            problems.append(Problem(node_id, input_name, codes.BAD_DOCUMENT,
                                    f"at {'.'.join(loc) or 'top level'}: {err.get('msg', 'invalid')}"))
        raise ValidationError(problems) from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise _bad(f"the document cannot be read: {type(exc).__name__}") from None


def scan_document(doc: Any) -> list[Problem]:
    """What no part of a document may hold, found in one iterative pass (no recursion):
    text that is not valid Unicode (a lone surrogate, which no file or terminal can take),
    nesting deeper than ``MAX_DEPTH`` and integers too long to print."""
    problems: list[Problem] = []
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(doc, 0, ())]
    while stack and len(problems) < MAX_SCAN_PROBLEMS:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not _is_unicode(value):
                problems.append(_located(path, codes.INVALID_TEXT, f"the text {_escaped(value)} is not valid "
                                         "Unicode (it holds a lone surrogate); fix or remove that character"))
        elif isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                problems.append(_located(path, codes.BAD_DOCUMENT, f"an integer of about {_digits(value)} "
                                         "digits is too long for any input; give a shorter number"))
        elif isinstance(value, dict | list | tuple):
            if depth >= MAX_DEPTH:
                problems.append(_located(path, codes.TOO_DEEP, f"values are nested more than {MAX_DEPTH} "
                                         "levels deep; flatten them"))
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii() and not _is_unicode(key):
                    problems.append(_located(path, codes.INVALID_TEXT, f"the name {_escaped(key)} is not valid "
                                             "Unicode (it holds a lone surrogate); rename it"))
                stack.append((item, depth + 1, path + (_part(key),) if len(path) < 4 else path))
    return problems


def _part(key: Any) -> str:
    if isinstance(key, str) and key.isascii() and len(key) <= 40:
        return key
    return _escaped(key)[1:-1]


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(value: Any) -> str:
    """A quoted form of a key or text that any terminal or JSON encoder can print."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return "'" + text.encode("utf-8", "backslashreplace").decode("utf-8") + "'"


def _digits(value: int) -> str:
    return f"{int(value.bit_length() * 0.30103):,}"


def _located(path: tuple[str, ...], code: str, message: str) -> Problem:
    node_id = path[1] if len(path) > 1 and path[0] == "nodes" else None
    input_name = path[3] if len(path) > 3 and path[2] == "inputs" else None
    where = "" if node_id is not None else f"at {'.'.join(path) or 'top level'}: "
    return Problem(node_id, input_name, code, where + message)


def decode_json(text: str | bytes, source: str = "workflow") -> Any:
    """Decode JSON text, turning every decoding failure into our ``ValidationError``."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise _bad(f"{source} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"{source} is not valid JSON: {exc}") from None


def _bad(message: str) -> ValidationError:
    return ValidationError([Problem(None, None, codes.BAD_DOCUMENT, message)])


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr of arbitrary user data may fail
        text = "<unprintable>"
    return text if len(text) <= 40 else text[:37] + "..."
