"""`ldmgraph convert` (also `python -m ldmgraph.models.convert FILE [OUT]`): a pickled checkpoint
(`.ckpt`, `.pt`, `.pth`, `.bin`) -> `.safetensors`, safely.

The pickle is read by `safe_unpickle` (allow-list; nothing it names is executed), its weights
(`state_dict` of a Lightning checkpoint, or the dict itself) are written to safetensors with their
dtypes and bits unchanged. The original YAML config (`--config`, else `config.yaml` beside the
checkpoint, as the original repository's `models/ldm/<name>/` folders ship it) is stored in the
file's metadata under `ldm_config`, so the converted file loads with its hyperparameters wherever
it is moved. The output defaults to `<stem>.converted.safetensors` beside the input; an existing
file is never overwritten.

Every refusal has a stable code (`pickle_refused`, `bad_tensor`, `zip_bomb`, `too_deep`,
`output_not_writable`, `file_not_found`, `not_a_file`, `bad_model`) and exits 2, printed as one line
(or as JSON with `--json`); nothing is written unless the whole conversion succeeds. The output
location is checked before the input is read, and the reader bounds what it inflates and writes by
the sizes the file declares (see `safe_unpickle`).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.models.errors import ModelError, converted_name
from ldmgraph.models.ldm_config import LDM_CONFIG_KEY, ConfigTooDeepError, read_config_file, read_ldm_config
from ldmgraph.models.safe_unpickle import (
    PickleRefusedOpcodeError,
    RefusedGlobalError,
    TensorGeometryError,
    ZipBombError,
    load_pickled_weights,
)
from ldmgraph.models.single_file import write_state_dict


class OutputNotWritableError(ModelError):
    """The output path is not a place where a new regular file can be written."""


def _error_code(exc: BaseException) -> str:
    """The stable code of a conversion failure (the CLI prints it; scripts match on it)."""
    for kind, code in (
        ((RefusedGlobalError, PickleRefusedOpcodeError), codes.PICKLE_REFUSED),
        ((TensorGeometryError,), codes.BAD_TENSOR),
        ((ZipBombError,), codes.ZIP_BOMB),
        ((ConfigTooDeepError,), codes.TOO_DEEP),
        ((OutputNotWritableError,), codes.OUTPUT_NOT_WRITABLE),
    ):
        if isinstance(exc, kind):
            return code
    return codes.BAD_MODEL


def check_output(target: Path, source: Path) -> None:
    """Refuse, before reading anything, an output that exists or whose folder cannot take a new regular
    file (a missing folder, a file in its place, /proc, a read-only mount): a probe file is created
    and removed there, which is the only test every filesystem answers truthfully."""
    if target.suffix not in (".safetensors", ".sft"):
        raise OutputNotWritableError(target, "the output must end in .safetensors")
    if os.path.lexists(target) or target.resolve() == source.resolve():
        raise OutputNotWritableError(target, "exists already; name another output file")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputNotWritableError(target, f"its folder {folder} does not exist or is not a folder")
    probe = folder / f".{target.name}.{os.getpid()}.probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputNotWritableError(target, f"{folder} does not hold regular files")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputNotWritableError(target, f"cannot write in {folder} ({exc.strerror})") from exc


def convert_checkpoint(source: str | Path, target: str | Path, *, config: str | Path | None = None) -> dict[str, Any]:
    """Convert `source` to a safetensors file at `target` (written atomically); returns a summary dict."""
    source, target = Path(source), Path(target)
    check_output(target, source)
    config_path = Path(config) if config is not None else _beside(source)
    metadata: dict[str, str] = {}
    if config_path is not None:
        text = read_config_file(config_path)
        read_ldm_config(text, config_path)  # refuse a config that does not describe a model, before writing
        metadata[LDM_CONFIG_KEY] = text
    tensors = load_pickled_weights(source)
    write_state_dict(target, tensors, metadata)  # tied weights get their own copies, bits unchanged
    return {
        "source": str(source),
        "output": str(target),
        "tensors": len(tensors),
        "config": str(config_path) if config_path is not None else None,
    }


def _beside(source: Path) -> Path | None:
    candidate = source.parent / "config.yaml"
    return candidate if os.path.lexists(candidate) else None


def register(sub: Any) -> None:
    """Add the `convert` subcommand to the CLI's subparsers."""
    parser = sub.add_parser(
        "convert",
        help="convert a pickled checkpoint (.ckpt) to .safetensors without running its code",
        description="Read a pickled PyTorch / Lightning checkpoint with an allow-list unpickler (tensor "
        "data and containers only; training objects become inert stand-ins; any other global is refused "
        "by name and nothing is executed) and write its weights as safetensors.",
    )
    parser.add_argument("checkpoint", type=Path, help="the pickled checkpoint")
    parser.add_argument("-o", "--output", type=Path,
                        help="output file, never overwritten (default: <stem>.converted.safetensors beside the input)")
    parser.add_argument("--config", type=Path, help="the original YAML config to store in the file "
                        "(default: config.yaml beside the checkpoint, if there is one)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    from ldmgraph.graph.errors import LdmGraphError

    target = args.output or converted_name(args.checkpoint)
    for given, what in ((args.checkpoint, "checkpoint"), (args.config, "config file")):
        if given is None:
            continue
        if not os.path.lexists(given):
            return _fail(args, f"{given}: no such file (the {what})", codes.FILE_NOT_FOUND)
        if not given.is_file():
            return _fail(args, f"{given}: not a regular file (a folder, device or FIFO); name the {what}",
                         codes.NOT_A_FILE)
    try:
        summary = convert_checkpoint(args.checkpoint, target, config=args.config)
    except (LdmGraphError, OSError, ValueError, MemoryError) as exc:
        return _fail(args, str(exc)[:2000], _error_code(exc))
    if args.json:
        print(json.dumps({"ok": True, **summary}))
    else:
        config = f" with the config {summary['config']}" if summary["config"] else ""
        print(f"wrote {summary['output']}: {summary['tensors']} tensors{config}")
    return 0


def _fail(args: argparse.Namespace, message: str, code: str) -> int:
    import json

    if args.json:
        print(json.dumps({"ok": False, "code": code, "error": message}))
    else:
        print(f"ldmgraph convert: {code}: {message}", file=sys.stderr)
    return 2


def convert(source: Path, target: Path | None = None) -> Path:
    """Convert `source` (config.yaml beside it, if any, stored too) and return the new file's path."""
    target = target or converted_name(source)
    convert_checkpoint(source, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ldmgraph.models.convert FILE [OUT]`: print the new file's name; exit 1 with one line on failure."""
    from ldmgraph.graph.errors import LdmGraphError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m ldmgraph.models.convert FILE [OUT.safetensors]", file=sys.stderr)
        return 2
    try:
        written = convert(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    except (LdmGraphError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
