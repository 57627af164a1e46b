"""Precision choices: what `--precision` and the loaders' `dtype` input mean, and what `auto` picks.

The loaders' `dtype` input names a concrete precision ("file" keeps the weights' own dtype, the
behaviour of a document without the input). `auto` exists only on the command line: it is resolved
here, once, to a concrete name for this machine, and written into the document's loader nodes,
so the choice is part of cache keys and of the workflow saved in output PNGs (re-running a PNG
reproduces it exactly on any machine).

`auto` picks bfloat16 on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX-BF16, whose matrix
units run bf16 at about twice the fp32 rate), float16 on CUDA GPUs, float32 otherwise.
No torch import at module level: the CLI resolves `auto` before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
LOADER_DTYPES = ["file", "fp32", "bf16", "fp16"]
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOADER_TYPES = ("CheckpointLoader", "VAELoader", "TextEncoderLoader")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_precision(
    precision: str,
    device: str | None = None,
    *,
    flags: Callable[[], set[str]] = cpu_flags,
    cuda_available: Callable[[], bool] = _cuda_available,
) -> str:
    """A concrete precision ("fp32", "bf16" or "fp16") for `precision` on `device` (None: the default one)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = (device or "").split(":")[0]
    if kind == "cuda" or (not kind and cuda_available()):
        return "fp16"
    if kind in ("", "cpu") and any(flag in flags() for flag in CPU_BF16_FLAGS):
        return "bf16"
    return "fp32"


def torch_dtype_name(dtype: str) -> str | None:
    """The loader `dtype` input as a torch dtype name; None for "file" (keep the file's)."""
    if dtype not in LOADER_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LOADER_DTYPES)}, got {dtype!r}")
    return TORCH_NAMES.get(dtype)


def apply_precision(document: Any, precision: str) -> int:
    """Write a concrete precision into every loader node's `dtype` input of a workflow document.

    Returns how many loader nodes were set. Documents that are not ldmgraph JSON objects are left alone.
    """
    nodes = document.get("nodes") if isinstance(document, dict) else None
    if not isinstance(nodes, dict):
        return 0
    count = 0
    for node in nodes.values():
        if isinstance(node, dict) and node.get("type") in LOADER_TYPES:
            inputs = node.setdefault("inputs", {})
            if isinstance(inputs, dict):
                inputs["dtype"] = precision
                count += 1
    return count
