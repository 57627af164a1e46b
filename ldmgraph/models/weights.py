"""Modules built on the meta device take a file's tensors: the primitive of the build step.

Modules are constructed on the meta device (no memory, no random init) and take the file's
memory-mapped tensors with `load_state_dict(assign=True)`: the weights exist once in RAM, never as
a second copy, and fp16/bf16 weights keep their dtype unless a dtype is asked for. The module
definitions that load their own weights (`text_encoders`) and the build step (`build`) use these.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.files import (
    MissingKeysError,
    ModelError,
    UnexpectedKeysError,
    UnknownArchitectureError,
    WeightMismatchError,
)
from ldmgraph.models.pages import file_ranges, release


def build_on_meta(factory: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Construct a module on the meta device: no memory, no random init; weights come by `assign_weights`."""
    with _META_LOCK, torch.device("meta"), _init_skips_meta():
        return factory(*args, **kwargs)


_META_LOCK = threading.RLock()
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextmanager
def _init_skips_meta() -> Iterator[None]:
    """`torch.nn.init`'s functions return meta tensors untouched while modules are built: an init
    on the meta device computes nothing yet costs time per parameter, and `normal_` on a meta
    tensor imports torch._dynamo (about a second). Other tensors are initialised as usual."""
    originals = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def skipping(original: Any) -> Any:
        def init(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

        return init

    for name, original in originals.items():
        setattr(nn.init, name, skipping(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


_REBUILT_BUFFERS = {
    "position_ids": lambda b: torch.arange(b.shape[-1]).expand(b.shape).clone(),
    "token_type_ids": lambda b: torch.zeros(b.shape, dtype=b.dtype),
}


def assign_weights(
    module: nn.Module,
    weights: Mapping[str, Tensor],
    *,
    path: str | Path,
    component: str,
    dtype: torch.dtype | None = None,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """Give a meta-device module the file's tensors (no copy unless `dtype` converts them).

    Raises MissingKeysError / UnexpectedKeysError naming the file and the component. Keys matching
    a regex in `ignore` (e.g. buffers that old files store) are skipped. Non-persistent buffers
    (`position_ids`, `token_type_ids`) are rebuilt on the CPU.
    """
    patterns = [re.compile(p) for p in ignore]
    wanted = {k: v for k, v in weights.items() if not any(p.search(k) for p in patterns)}
    if dtype is not None:  # convert tensor by tensor, giving back each mapped source's pages
        mapped = file_ranges(path)
        for k, v in wanted.items():
            if v.is_floating_point() and v.dtype != dtype:
                wanted[k] = v.to(dtype)
                release(v, mapped)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise MissingKeysError(path, component, missing)
    unexpected = sorted(set(wanted) - set(expected))
    if unexpected:
        raise UnexpectedKeysError(path, component, unexpected)
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in wanted.items()
                  if v.shape != expected[k].shape]
    if mismatched:  # named here in a few lines, not by load_state_dict's one line per tensor
        raise WeightMismatchError(path, component, mismatched)
    try:
        module.load_state_dict(wanted, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnknownArchitectureError(
            path, f"{component}: weights do not fit the detected architecture: {str(exc)[:300]}"
        ) from None
    _rebuild_meta_buffers(module, path, component)
    return module.eval().requires_grad_(False)


def _rebuild_meta_buffers(module: nn.Module, path: str | Path, component: str) -> None:
    for owner_name, owner in module.named_modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            rebuild = _REBUILT_BUFFERS.get(name)
            if rebuild is None:
                full = f"{owner_name}.{name}" if owner_name else name
                raise ModelError(
                    path, f"{component}: buffer {full!r} has no weight in the file and cannot be rebuilt"
                )
            owner.register_buffer(
                name, rebuild(buf), persistent=name not in owner._non_persistent_buffers_set
            )
