"""Input files that travel with a saved PNG, so ``ldmgraph run image.png`` re-creates it anywhere.

``SaveImage`` writes a text chunk ``ldmgraph:inputs``: one record per input file the workflow
names (``LoadImage``, ``LoadMask``, any node class listing inputs in ``input_file_inputs``), with
its name, size and SHA-256; files up to :data:`EMBED_LIMIT` bytes carry their bytes (base64).
On a re-run the embedded files are written to a private temporary folder
(``Environment.carried_inputs``), searched before the input folder and removed afterwards. A file
too large to embed is looked up in the input folder as usual, and one whose hash differs from the
record is refused (``input_mismatch``): it would not re-create the image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import LdmGraphError, Problem, UnsafePathError, ValidationError
from ldmgraph.graph.files import safe_join

PNG_INPUTS_KEY = "ldmgraph:inputs"
EMBED_LIMIT = 512 << 10
"""Input files up to this many bytes are embedded in saved PNGs; larger ones are named by hash."""
EMBED_TOTAL = 900_000
"""Base64 characters embedded in one PNG at most: Pillow refuses text chunks over 1 MiB
(`PngImagePlugin.MAX_TEXT_CHUNK`) when reading, and the PNG must stay readable."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_file_records(workflow: dict[str, Any], registry: Any, env: Environment) -> list[dict[str, Any]]:
    """Records of the input files a resolved workflow document names (literal file names only)."""
    from ldmgraph.nodes.input_files import input_path

    records: dict[str, dict[str, Any]] = {}
    for entry in (workflow.get("nodes") or {}).values():
        cls = registry.node(entry.get("type")) if registry is not None else None
        for input_name in getattr(cls, "input_file_inputs", ()):
            name = (entry.get("inputs") or {}).get(input_name)
            if not isinstance(name, str) or name in records:
                continue
            try:
                path = input_path(env, name)
                records[name] = {"name": name, "bytes": path.stat().st_size, "sha256": _file_sha256(path)}
            except (OSError, UnsafePathError):
                continue  # a node this run did not need; nothing to carry
    embedded = 0
    for record in sorted(records.values(), key=lambda r: r["bytes"]):  # the small ones first
        size = 4 * -(-record["bytes"] // 3)
        if record["bytes"] <= EMBED_LIMIT and embedded + size <= EMBED_TOTAL:
            data = input_path(env, record["name"]).read_bytes()
            if _sha256(data) == record["sha256"]:
                record["data"] = base64.b64encode(data).decode("ascii")
                embedded += size
    return list(records.values())


def records_of_png(path: Path) -> list[dict[str, Any]]:
    """The input-file records of a PNG written by ``SaveImage`` (empty when it has none)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except Exception:  # noqa: BLE001 - the workflow loader has already reported a bad PNG
        return []
    try:
        value = json.loads(text.get(PNG_INPUTS_KEY, "[]"))
    except ValueError:
        raise _problem(None, f"{path}: its '{PNG_INPUTS_KEY}' chunk is not valid JSON") from None
    return [r for r in value if isinstance(r, dict) and isinstance(r.get("name"), str)] if isinstance(value, list) else []


@contextmanager
def carried_environment(png: Path, env: Environment) -> Iterator[Environment]:
    """``env`` with the PNG's embedded input files in a private temporary folder, removed on exit."""
    records = records_of_png(png)
    if not records:
        yield env
        return
    folder = Path(tempfile.mkdtemp(prefix="ldmgraph-inputs-"))
    try:
        for record in records:
            _carry(record, folder, env, png)
        yield replace(env, carried_inputs=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _carry(record: dict[str, Any], folder: Path, env: Environment, png: Path) -> None:
    name, digest = record["name"], str(record.get("sha256", ""))
    if "data" in record:
        try:
            data = base64.b64decode(str(record["data"]), validate=True)
        except ValueError:
            raise _problem(name, f"{png}: the embedded copy of {name!r} is damaged (bad base64)") from None
        if _sha256(data) != digest:
            raise _problem(name, f"{png}: the embedded copy of {name!r} does not match its SHA-256 {digest[:12]}...")
        try:
            target = safe_join(folder, name)
        except UnsafePathError as exc:
            raise _problem(name, f"{png}: embedded file name {name!r} is unsafe: {exc}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    try:
        data = safe_join(env.input_dir, name).read_bytes()
    except (OSError, UnsafePathError):
        return  # validation reports the missing file, naming the input folder
    if _sha256(data) != digest:
        raise _problem(name, (
            f"{name!r} in the input folder {env.input_dir} is not the file {png.name} was made with "
            f"(SHA-256 {_sha256(data)[:12]}..., expected {digest[:12]}..., {record.get('bytes', '?')} bytes; "
            f"too large to embed): put the original file there, or choose another with --set"))


def _problem(name: str | None, message: str) -> LdmGraphError:
    return ValidationError([Problem(None, None, codes.INPUT_MISMATCH, message)])
