"""Checkpoint files on disk: key prefixes, the model layer's errors, and reading a file's tensors.

`.safetensors` files are opened with `safetensors.safe_open`, whose tensors are views of a memory
map of the file: the weights exist once in RAM (as page cache of the file). Pickled files (`.ckpt`,
`.pt`, `.pth`, `.bin`) can run code when unpickled and are refused unless the caller opts in with
`allow_pickle=True`, which then uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldmgraph.models.errors import (  # noqa: F401 - re-exported: the model layer's errors live there
    BadMetadataError,
    BadWeightError,
    CorruptCheckpointError,
    MissingKeysError,
    ModelError,
    ModelFileNotFoundError,
    PickleRefusedError,
    UnexpectedKeysError,
    UnknownArchitectureError,
    WeightMismatchError,
    convert_hint,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = (
    "cond_stage_model.transformer."  # SD1 CLIP (then text_model.*); the paper's BERT (token_emb, ...)
)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2 OpenCLIP
COND_PREFIX = "cond_stage_model."  # every conditioning model (the paper's class embedder, rescaler, ...)

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


# --- reading ----------------------------------------------------------------------------------


@dataclass
class StateDict:
    """Tensors of a file (memory-mapped where possible) plus its string metadata."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def sub(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under `prefix`, with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.tensors)


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' or 'unknown' from the first bytes (names can lie)."""
    with path.open("rb") as f:
        head = f.read(10)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> StateDict:
    """Read a checkpoint file's tensors without copying them (safetensors) or, opted in, a pickle.

    Raises ModelFileNotFoundError, CorruptCheckpointError or PickleRefusedError, each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(path, "no such file (check the name and the model folders)")
    kind = _sniff(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or kind == "pickle":
        if not allow_pickle:
            raise PickleRefusedError(path, convert_hint(path))
        return _read_pickle(path)
    if kind != "safetensors":
        raise CorruptCheckpointError(
            path, "not a safetensors file (bad header); the file is damaged or of another format"
        )
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # views of the file's memory map
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            path,
            f"cannot read the safetensors data ({exc}); the file is truncated or damaged: download it again",
        ) from exc
    return StateDict(path, tensors, metadata)


def _read_pickle(path: Path) -> StateDict:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # pre-1.6 (non-zip) pickles cannot be memory-mapped: read them whole
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or code-carrying pickles
        raise CorruptCheckpointError(
            path, f"cannot read it with torch.load(weights_only=True): {exc}"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return StateDict(path, tensors, {})


