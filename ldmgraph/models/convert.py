"""Convert a pickled checkpoint to safetensors: ``python -m ldmgraph.models.convert FILE [OUT]``.

The pickle is read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
code runs); a ``state_dict`` entry is unwrapped. The result goes to ``OUT``, by default
``<stem>.converted.safetensors`` beside the input; an existing file is never overwritten.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ldmgraph.models.errors import ModelError, converted_name


def convert(source: Path, target: Path | None = None) -> Path:
    """Write the tensors of the pickle ``source`` to a new safetensors file and return its path."""
    import torch
    from safetensors.torch import save_file

    target = target or converted_name(source)
    if target.exists() or target.resolve() == source.resolve():
        raise ModelError(target, "exists already; name another output file")
    try:  # a file object: torch would take a name ending in .safetensors for a safetensors file
        with source.open("rb") as handle:
            obj = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or code-carrying pickles
        raise ModelError(source, f"cannot read it with torch.load(weights_only=True): {str(exc)[:300]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(source, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(target))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: convert, print the new file's name; exit 1 with one line on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m ldmgraph.models.convert FILE [OUT.safetensors]", file=sys.stderr)
        return 2
    try:
        written = convert(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
