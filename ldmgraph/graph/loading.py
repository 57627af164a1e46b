"""Reading workflow files: our JSON, PNGs written by SaveImage, and ComfyUI files.

Accepted: an ``ldmgraph/1`` JSON document; a PNG whose text chunk ``ldmgraph:workflow`` holds one
(with ``ldmgraph:parameters``); a ComfyUI API-format or UI-format JSON, or a ComfyUI PNG (text
chunk ``prompt`` or ``workflow``). ComfyUI documents are converted by
``ldmgraph.interop.comfyui.to_workflow(doc) -> dict``, imported only when needed. Every failure
is a :class:`ValidationError` with code ``bad_document``.
"""

from __future__ import annotations

import importlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codes
from .errors import FileTooLargeError, LdmGraphError, NotAFileError, Problem, ValidationError
from .files import MAX_INPUT_FILE_BYTES, read_regular_file
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
        data = read_regular_file(file, MAX_INPUT_FILE_BYTES)
    except NotAFileError as exc:
        raise ValidationError([Problem(None, None, codes.NOT_A_FILE,
                                       f"cannot read the workflow: {exc}; name a workflow file")]) from None
    except FileTooLargeError as exc:
        raise _bad(f"cannot read the workflow: {exc}") from None
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
    try:
        text = png_text_chunks(data)
    except ValueError as exc:
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


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, read without decoding any pixels.

    PNG specification (ISO/IEC 15948), sections 5.3 (chunk layout: length, type, data, CRC) and
    11.3.4 (textual chunks). Compressed text is inflated no further than the document bound, so a
    small file cannot expand into gigabytes. Raises ``ValueError`` for a malformed file.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    text: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError("the file is truncated")
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            key, value = _text_chunk(kind, body)
            text.setdefault(key, value)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return text


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    key, sep, rest = body.partition(b"\x00")
    if not sep:
        raise ValueError(f"a {kind.decode()} chunk has no keyword")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return key.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
    compressed = rest[:1] == b"\x01"
    _language, _, rest = rest[2:].partition(b"\x00")
    _translated, _, value = rest.partition(b"\x00")
    try:
        return key.decode("latin-1"), (_inflate(value) if compressed else value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("an iTXt chunk is not UTF-8") from None


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_DOCUMENT_BYTES + 1)
    except zlib.error as exc:
        raise ValueError(f"a compressed text chunk is corrupt ({exc})") from None
    if len(out) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"a compressed text chunk inflates to more than {MAX_DOCUMENT_BYTES} bytes")
    return out


def _bad(message: str) -> ValidationError:
    return ValidationError([Problem(None, None, codes.BAD_DOCUMENT, message)])
