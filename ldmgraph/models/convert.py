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

    from ldmgraph.models.files import read_state_dict

    target = target or converted_name(source)
    if target.exists() or target.resolve() == source.resolve():
        raise ModelError(target, "exists already; name another output file")
    state = read_state_dict(source, allow_pickle=True)
    tensors = {k: v.contiguous() for k, v in state.tensors.items() if isinstance(v, torch.Tensor)}
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
