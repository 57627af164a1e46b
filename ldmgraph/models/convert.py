"""`ldmgraph convert` (also `python -m ldmgraph.models.convert FILE [OUT]`): a pickled checkpoint
(`.ckpt`, `.pt`, `.pth`, `.bin`) -> `.safetensors`, safely.

The pickle is read by `safe_unpickle` (allow-list; nothing it names is executed), its weights
(`state_dict` of a Lightning checkpoint, or the dict itself) are written to safetensors with their
dtypes and bits unchanged. The original YAML config (`--config`, else `config.yaml` beside the
checkpoint, as the original repository's `models/ldm/<name>/` folders ship it) is stored in the
file's metadata under `ldm_config`, so the converted file loads with its hyperparameters wherever
it is moved. The output defaults to `<stem>.converted.safetensors` beside the input; an existing
file is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmgraph.models.errors import ModelError, converted_name
from ldmgraph.models.ldm_config import LDM_CONFIG_KEY, read_ldm_config
from ldmgraph.models.safe_unpickle import load_pickled_weights
from ldmgraph.models.single_file import write_state_dict


def convert_checkpoint(source: str | Path, target: str | Path, *, config: str | Path | None = None) -> dict[str, Any]:
    """Convert `source` to a safetensors file at `target` (written atomically); returns a summary dict."""
    source, target = Path(source), Path(target)
    if target.exists() or target.resolve() == source.resolve():
        raise ModelError(target, "exists already; name another output file")
    config_path = Path(config) if config is not None else _beside(source)
    metadata: dict[str, str] = {}
    if config_path is not None:
        text = config_path.read_text(encoding="utf-8")
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
    return candidate if candidate.is_file() else None


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
    if not args.checkpoint.is_file():
        return _fail(args, f"{args.checkpoint}: no such file")
    if args.config is not None and not args.config.is_file():
        return _fail(args, f"{args.config}: no such config file")
    try:
        summary = convert_checkpoint(args.checkpoint, target, config=args.config)
    except (LdmGraphError, OSError, ValueError) as exc:
        return _fail(args, str(exc))
    if args.json:
        print(json.dumps({"ok": True, **summary}))
    else:
        config = f" with the config {summary['config']}" if summary["config"] else ""
        print(f"wrote {summary['output']}: {summary['tensors']} tensors{config}")
    return 0


def _fail(args: argparse.Namespace, message: str) -> int:
    import json

    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"ldmgraph convert: {message}", file=sys.stderr)
    return 1


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
