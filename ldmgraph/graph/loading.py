"""Reading workflow files: our JSON, PNGs written by SaveImage, and ComfyUI files.

Accepted: an ``ldmgraph/1`` JSON document; a PNG whose text chunk ``ldmgraph:workflow`` holds one
(with ``ldmgraph:parameters``); a ComfyUI API-format or UI-format JSON, or a ComfyUI PNG (text
chunk ``prompt`` or ``workflow``). ComfyUI documents are converted by
``ldmgraph.interop.comfyui.to_workflow(doc) -> dict``, imported only when needed. Every failure
is a :class:`ValidationError` with code ``bad_document``.
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codes
from .errors import LdmGraphError, Problem, ValidationError
from .workflow import FORMAT, MAX_DOCUMENT_BYTES, decode_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_WORKFLOW_KEY = "ldmgraph:workflow"
PNG_PARAMETERS_KEY = "ldmgraph:parameters"
COMFYUI_CONVERTER = "ldmgraph.interop.comfyui:to_workflow"


@dataclass
class LoadedWorkflow:
    """A workflow document ready for validation, and where it came from."""

    document: Any
    kind: str  # "ldmgraph" | "ldmgraph-png" | "comfyui-api" | "comfyui-ui"
    source: str
    parameters: dict[str, Any] = field(default_factory=dict)  # embedded in a PNG, for information


def load_workflow_file(path: str | os.PathLike[str]) -> LoadedWorkflow:
    """Read a workflow file of any accepted kind (see the module docstring)."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_DOCUMENT_BYTES:
            raise _bad(f"{file} is larger than {MAX_DOCUMENT_BYTES} bytes")
        data = file.read_bytes()
    except OSError as exc:
        raise ValidationError([Problem(None, None, codes.FILE_NOT_FOUND,
                                       f"cannot read workflow file {file}: {exc.strerror or exc}")]) from None
    return load_workflow_bytes(data, str(file))


def load_workflow_bytes(data: bytes, source: str = "workflow") -> LoadedWorkflow:
    """Like :func:`load_workflow_file`, from the file's bytes."""
    if data.startswith(PNG_SIGNATURE):
        return _from_png(data, source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad(f"{source} is neither UTF-8 JSON nor a PNG") from None
    return load_workflow_document(decode_json(text, source), source)


def load_workflow_document(doc: Any, source: str = "workflow") -> LoadedWorkflow:
    """Classify a decoded document and convert it to ``ldmgraph/1`` when it is a ComfyUI one."""
    kind = detect_kind(doc)
    if kind in ("comfyui-api", "comfyui-ui"):
        return LoadedWorkflow(convert_comfyui(doc, source), kind, source)
    return LoadedWorkflow(doc, "ldmgraph", source)


def detect_kind(doc: Any) -> str:
    """``"ldmgraph"``, ``"comfyui-ui"``, ``"comfyui-api"``, or ``"unknown"``."""
    if not isinstance(doc, dict):
        return "unknown"
    if doc.get("format") == FORMAT:
        return "ldmgraph"
    if isinstance(doc.get("nodes"), list) and "links" in doc:
        return "comfyui-ui"
    if doc and all(isinstance(v, dict) and "class_type" in v for v in doc.values()):
        return "comfyui-api"
    return "unknown"


def convert_comfyui(doc: dict[str, Any], source: str) -> Any:
    """Convert a ComfyUI document with the interop layer, turning any failure into ValidationError."""
    module_name, _, attr = COMFYUI_CONVERTER.partition(":")
    try:
        convert = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise _bad(f"{source} is a ComfyUI workflow, but the ComfyUI importer ({COMFYUI_CONVERTER}) "
                   "is not available in this installation") from None
    try:
        return convert(doc)
    except ValidationError:
        raise
    except LdmGraphError as exc:
        raise _bad(f"{source}: cannot convert the ComfyUI workflow: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the importer must never crash the loader
        raise _bad(f"{source}: the ComfyUI importer failed: {type(exc).__name__}: {exc}") from exc


def _from_png(data: bytes, source: str) -> LoadedWorkflow:
    from PIL import Image  # Pillow is light, but only PNG inputs need it

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            text = dict(getattr(image, "text", {}) or {})
    except Exception as exc:  # noqa: BLE001 - any decoding failure of a user file
        raise _bad(f"{source}: cannot read the PNG: {exc}") from None
    if PNG_WORKFLOW_KEY in text:
        doc = decode_json(text[PNG_WORKFLOW_KEY], f"{source} ({PNG_WORKFLOW_KEY})")
        params = decode_json(text.get(PNG_PARAMETERS_KEY, "{}"), f"{source} ({PNG_PARAMETERS_KEY})")
        return LoadedWorkflow(doc, "ldmgraph-png", source, params if isinstance(params, dict) else {})
    for key, kind in (("prompt", "comfyui-api"), ("workflow", "comfyui-ui")):
        if key in text:
            doc = decode_json(text[key], f"{source} ({key})")
            return LoadedWorkflow(convert_comfyui(doc, source), kind, source)
    raise _bad(f"{source} is a PNG without an embedded workflow (no '{PNG_WORKFLOW_KEY}' or 'prompt' text chunk)")


def _bad(message: str) -> ValidationError:
    return ValidationError([Problem(None, None, codes.BAD_DOCUMENT, message)])
