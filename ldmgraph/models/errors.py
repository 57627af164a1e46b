"""The model layer's errors: one class per cause, each naming the file, with a short message.

Torch-free, so validation can raise and catch them without importing torch. Messages stay short
whatever the file holds: lists of keys are cut to a few examples and a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldmgraph.graph.errors import LdmGraphError

SHOWN = 5
"""How many keys an error message names before it says "and N more"."""


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


class ModelError(LdmGraphError):
    """A model file cannot be used; `path` names it and the message says how to fix it."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ModelFileNotFoundError(ModelError, FileNotFoundError):
    """The file or folder does not exist."""


class CorruptCheckpointError(ModelError):
    """The file is truncated, damaged or not in the format its name says."""


class PickleRefusedError(ModelError):
    """A pickled checkpoint was given without `allow_pickle=True`."""


class BadMetadataError(ModelError):
    """The file's metadata or a diffusers config is missing a field or has one of the wrong type."""


class BadWeightError(ModelError):
    """A weight has an impossible shape or dtype (a 1-D convolution, 0 channels, integer weights)."""


class MissingKeysError(ModelError):
    """The detected architecture needs weights the file does not have."""

    def __init__(self, path: str | Path, component: str, keys: list[str]) -> None:
        self.component, self.keys = component, list(keys)
        super().__init__(
            path,
            f"{component}: {len(keys)} weight(s) missing ({_some(self.keys)}); the file is incomplete or of "
            "another architecture: re-export it, or pass the matching config",
        )


class UnexpectedKeysError(ModelError):
    """The file has weights that the detected architecture does not use."""

    def __init__(self, path: str | Path, component: str, keys: list[str]) -> None:
        self.component, self.keys = component, list(keys)
        super().__init__(
            path,
            f"{component}: {len(keys)} unexpected weight(s) ({_some(self.keys)}); the detected architecture "
            "does not match the file: report it with the key list",
        )


class WeightMismatchError(ModelError):
    """Weights whose shapes differ from the architecture's (a file whose dtypes or shapes lie)."""

    def __init__(self, path: str | Path, component: str, mismatches: list[tuple[str, list[int], list[int]]]) -> None:
        self.component, self.mismatches = component, list(mismatches)
        examples = [f"{key} is {found} (expected {wanted})" for key, found, wanted in mismatches]
        super().__init__(
            path,
            f"{component}: {len(mismatches)} weight(s) have the wrong shape ({_some(examples)}); the header's "
            "shapes or dtypes do not match the architecture: re-export the file",
        )


class UnknownArchitectureError(ModelError):
    """The keys match no architecture that ldmgraph knows."""


def converted_name(path: Path) -> Path:
    """Where a converted copy of a pickled checkpoint goes: beside it, never over it."""
    return path.with_name(f"{path.stem}.converted.safetensors")


def safetensors_twin(path: Path) -> Path:
    """The safetensors file a loader looks for in place of a pickle: same folder, same stem
    (``model.ckpt`` -> ``model.safetensors``; a diffusers folder's ``.bin`` -> its ``.safetensors``)."""
    return path.with_suffix(".safetensors")


def convert_command(path: Path, target: Path) -> str:
    """The exact command that converts the pickle ``path`` into ``target``."""
    return f"ldmgraph convert '{path}' -o '{target}'"


def convert_hint(path: Path) -> str:
    """How to turn a refused pickle into safetensors: the exact command that writes the file a loader
    looks for (same name, ``.safetensors``) beside it, then how to point the workflow at it."""
    target = safetensors_twin(path)
    if target.exists():
        target = converted_name(path)
    return (  # the command first: messages are cut at 800 characters
        "pickled checkpoints can run code when loaded and are refused. Convert it once, running none of its "
        f"code:\n  {convert_command(path, target)}\nthen name {target.name} instead of {path.name}. (Or python -m "
        "ldmgraph.models.convert, same arguments. Without -o, "
        f"convert writes {converted_name(path).name}; from Python, allow_pickle=True loads the pickle with "
        "torch.load(weights_only=True).)"
    )
