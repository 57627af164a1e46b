"""`ldmgraph import FILE -o OUT.json`: convert a ComfyUI graph (JSON or PNG) into our workflow format.

Registered lazily by `ldmgraph/cli.py` through `register(subparsers)`. Exit codes as the main CLI:
0 converted, 2 the graph cannot be converted (every problem printed, one per line), 1 I/O failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_comfyui_file(path: Path) -> dict[str, Any]:
    """The graph in a ComfyUI file: JSON as it is, or a PNG's `prompt` (else `workflow`) text chunk.

    Only a regular file is read, and no further than a bound (a FIFO or `/dev/zero` is a
    ``ValueError``); a PNG's text chunks are read without decoding its pixels.
    """
    from ldmgraph.graph.files import read_regular_file
    from ldmgraph.graph.loading import PNG_SIGNATURE, png_text_chunks
    from ldmgraph.graph.workflow import decode_json

    data = read_regular_file(path)
    if data.startswith(PNG_SIGNATURE):
        chunks = png_text_chunks(data)
        for key in ("prompt", "workflow"):
            if isinstance(chunks.get(key), str):
                return decode_json(chunks[key], f"{path} ({key})")
        raise ValueError(f"{path}: the PNG has no ComfyUI 'prompt' or 'workflow' text chunk")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither UTF-8 JSON nor a PNG") from None
    return decode_json(text, str(path))


def _handle(args: argparse.Namespace) -> int:
    from ldmgraph.graph.errors import ValidationError
    from ldmgraph.interop.comfyui import to_workflow

    source = Path(args.file)
    try:
        workflow = to_workflow(read_comfyui_file(source))
    except ValidationError as error:
        if getattr(args, "json", False):
            print(json.dumps(error.to_dict(), indent=2))
        else:
            for problem in error.shown:
                print(f"{source}: {problem}", file=sys.stderr)
            if error.more:
                print(f"{source}: ... and {error.more} more problem(s)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"{source}: cannot read the ComfyUI graph: {error}", file=sys.stderr)
        return 1
    text = json.dumps(workflow, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    from ldmgraph.graph.files import atomic_write_bytes

    atomic_write_bytes(Path(args.output), text.encode("utf-8"))
    print(f"wrote {args.output} ({len(workflow['nodes'])} nodes)", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add the `import` subcommand to the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "import",
        help="convert a ComfyUI graph (API/UI JSON or PNG) to an ldmgraph workflow",
        description="Convert a ComfyUI graph, API or UI format (or a ComfyUI PNG), into ldmgraph/1 JSON.",
    )
    parser.add_argument("file", help="ComfyUI .json (API or UI format) or .png with a 'prompt' chunk")
    parser.add_argument("-o", "--output", help="where to write the workflow (default: stdout)")
    parser.set_defaults(func=_handle)
