"""Reading pickled PyTorch checkpoints without running any code they carry.

A pickle is a small program: its GLOBAL opcodes name any importable callable and its REDUCE
opcodes call it, so `pickle.load` on a downloaded `.ckpt` can run `os.system`. This reader
executes the pickle with an allow-list in `find_class`: the few torch functions and storage types
that rebuild tensors (each replaced here by our own implementation, so not even torch's code runs),
`collections.OrderedDict`, and inert stand-ins for the training framework's objects that PyTorch
Lightning checkpoints carry besides `state_dict` (callback states keyed by their class, hyper-
parameter containers, numpy scalars of saved metrics). Any other global is refused with its
name, before anything is called.

Only the zip format of `torch.save` (PyTorch >= 1.6: `<name>/data.pkl` plus one raw file per
storage under `<name>/data/`) carries tensors; the storages are read from the zip as bytes, so a
tensor comes back bit for bit as saved, and only the storages of the kept weights (`state_dict`) are
read: optimizer states and other training leftovers cost no memory.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmgraph.models.files import CorruptCheckpointError, ModelError

# torch.save's storage type names -> element dtype
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Modules whose objects are training-framework state, never weights: read as inert stand-ins.
_STAND_IN_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "numpy")


class RefusedGlobalError(ModelError):
    """The pickle asks for a global outside the allow-list (it may try to run code)."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.name = name
        super().__init__(
            path,
            f"refused: the pickle asks for {name!r}, which is not tensor data or a known training-state "
            "object (a pickle that names it can run code); nothing was executed. Get the weights as "
            ".safetensors from a source you trust",
        )


class StandIn:
    """An inert placeholder for a training-framework object: accepts any construction, keeps nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"


def _stand_in(module: str, name: str) -> type[StandIn]:
    return type(f"StandIn[{module}.{name}]", (StandIn,), {"qualname": f"{module}.{name}"})


class _Storage:
    """A storage in the zip, read only when a kept tensor needs it (optimizer states are never read)."""

    def __init__(self, read: Any, numel: int, dtype: torch.dtype) -> None:
        self.read, self.numel, self.dtype = read, numel, dtype
        self._flat: Tensor | None = None

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            data = bytearray(self.read())
            itemsize = torch.empty(0, dtype=self.dtype).element_size()
            if len(data) != self.numel * itemsize:
                raise ValueError(f"a storage holds {len(data)} bytes, not {self.numel} elements")
            self._flat = torch.frombuffer(data, dtype=self.dtype) if data else torch.empty(0, dtype=self.dtype)
        return self._flat


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


class PendingTensor:
    """A tensor of the pickle, checked against its storage but not read until `materialize()`."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> Tensor:
        """The tensor: the storage's memory when it is the whole storage, else a copy of its part."""
        if any(n == 0 for n in self.size):
            return torch.empty(self.size, dtype=self.storage.dtype)
        flat = self.storage.flat
        view = flat.as_strided(self.size, self.stride, self.offset)
        whole = self.offset == 0 and view.is_contiguous() and view.numel() == flat.numel()
        return view if whole else view.clone()


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> PendingTensor:
    """Our `torch._utils._rebuild_tensor_v2`: checks the view against its storage; reads nothing yet."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    if not (isinstance(offset, int) and _int_tuple(size) and _int_tuple(stride)):
        raise pickle.UnpicklingError("a tensor with a malformed size, stride or offset")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor whose size and stride differ in length")
    if all(n > 0 for n in size):
        needed = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if offset < 0 or needed > storage.numel:
            raise pickle.UnpicklingError("a tensor that reaches beyond its storage")
    return PendingTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *rest: Any) -> PendingTensor:
    """Our `torch._utils._rebuild_parameter`: the tensor itself (no Parameter, no hooks)."""
    if not isinstance(data, PendingTensor):
        raise pickle.UnpicklingError("a parameter without tensor data")
    return data


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and v >= 0 for v in value)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Our `_codecs.encode`, as protocol-2 pickles spell bytes: latin-1 text only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed for latin-1 text only")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_codecs", "encode"): _latin1,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path, storages: Any) -> None:
        super().__init__(file)
        self.path, self.storages = path, storages
        self.loaded: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles spell Python 2 names (__builtin__.eval): judge and report the Python 3 ones
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.split(".")[0] in _STAND_IN_MODULES:
            return _stand_in(module, name)
        raise RefusedGlobalError(self.path, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError("a storage of an unknown type")
        numel = pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("a storage of a malformed size")
        if key not in self.loaded:
            self.loaded[key] = _Storage(lambda: self.storages(key), numel, storage_type.dtype)
        return self.loaded[key]


def load_pickled_weights(path: str | Path) -> dict[str, Tensor]:
    """The weights of a `torch.save` file read with the allow-list: its `state_dict` (a Lightning
    checkpoint) or the dict itself, as plain CPU tensors. Only those tensors' storages are read.

    Raises RefusedGlobalError (naming the global) for anything outside the allow-list and
    CorruptCheckpointError for files that are not torch's zip format.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        _refuse_plain_pickle(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CorruptCheckpointError(path, "a zip file without one data.pkl: not a torch.save checkpoint")
        root = pkl[0][: -len("data.pkl")]
        order = archive.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
        if order != sys.byteorder:
            raise CorruptCheckpointError(path, f"its tensors are {order}-endian; this machine is {sys.byteorder}")

        def storage(key: str) -> bytes:
            try:
                return archive.read(f"{root}data/{key}")
            except KeyError as exc:
                raise CorruptCheckpointError(path, f"storage {key!r} is missing from the archive") from exc

        obj = _run(_Unpickler(io.BytesIO(archive.read(pkl[0])), path, storage), path)
        pending = _weights(obj, path)
        try:
            return {name: tensor.materialize() for name, tensor in pending.items()}
        except (RuntimeError, ValueError) as exc:
            raise CorruptCheckpointError(path, f"cannot read a tensor: {exc}") from exc


def _refuse_plain_pickle(path: Path) -> None:
    """A non-zip file: run the restricted unpickler on its first pickle (to name a refused global), then refuse."""
    with path.open("rb") as f:
        first = _run(_Unpickler(f, path, _no_storages), path)
    if isinstance(first, int):
        raise CorruptCheckpointError(
            path, "a pre-1.6 torch.save file (legacy format): load and re-save it with torch>=1.6 first"
        )
    raise CorruptCheckpointError(path, "a plain pickle without tensor data: not a torch checkpoint")


def _no_storages(key: str) -> bytes:
    raise pickle.UnpicklingError("tensor storages outside torch's zip format")


def _run(unpickler: _Unpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except ModelError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError) as exc:
        raise CorruptCheckpointError(path, f"cannot read the pickle: {type(exc).__name__}: {exc}") from exc


def _weights(obj: Any, path: str | Path) -> dict[str, PendingTensor]:
    """The tensors of an unpickled checkpoint: its `state_dict` (Lightning) or the dict itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, PendingTensor)}
    if not tensors:
        raise CorruptCheckpointError(path, "holds no tensors")
    return tensors
