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

Everything a hostile file can make us allocate is bounded before it is allocated:
- the pickle runs on Python's pure-Python unpickler, whose BUILD opcode (set an object's state) is
  allowed only on the inert stand-ins and on dicts, so no state can be forced into a tensor, a
  storage or one of our functions;
- a tensor's size, stride and offset are checked against its storage with exact integers (no
  overflow), and a view may not hold more elements than its storage (a stride-0 "expanded" tensor of
  2^28 elements over one stored number is refused, never written out as gigabytes);
- a zip entry is inflated only when its header size is the size the pickle declared for it, and a
  compressed entry only up to a small ratio (torch.save never compresses: a deflated gigabyte of
  zeros in an 8 MB file is a zip bomb); `data.pkl` itself is bounded the same way;
- the weights written out may not exceed a few times the storages they come from (tied weights are
  written as copies; many views of one storage are an amplification attack).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import sys
import zipfile
import zlib
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


class PickleRefusedOpcodeError(ModelError):
    """The pickle uses an operation that only code-running or state-forging pickles need (BUILD on a
    tensor, a storage or a function)."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.what = what
        super().__init__(
            path,
            f"refused: the pickle {what}, which tensor data never needs; nothing was executed. Get the weights "
            "as .safetensors from a source you trust",
        )


class TensorGeometryError(ModelError):
    """A tensor's size, stride or offset is impossible or reaches outside its storage."""


class ZipBombError(ModelError):
    """A zip entry would inflate far beyond what the checkpoint declares or what torch.save writes."""


MAX_PICKLE_BYTES = 64 << 20
"""Largest `data.pkl` read: it holds only the structure (names, sizes), never tensor data."""
MAX_DEFLATE_RATIO = 10
"""torch.save stores entries uncompressed; a compressed entry may inflate at most this much."""
DEFLATE_SLACK = 1 << 20
MAX_AMPLIFICATION = 4
"""The weights written may total at most this many times the bytes of the storages they view
(plus `AMPLIFICATION_SLACK`): tied and transposed copies of one weight are fine, 64 copies are not."""
AMPLIFICATION_SLACK = 16 << 20
MAX_DIMS = 32


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
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self._flat: Tensor | None = None

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            data = bytearray(self.read(self.numel * self.itemsize))
            if len(data) != self.numel * self.itemsize:
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

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.storage.itemsize

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
    if not (_small_int(offset) and _int_tuple(size) and _int_tuple(stride)):
        raise _Geometry("a tensor with a malformed or negative size, stride or offset")
    if len(size) != len(stride) or len(size) > MAX_DIMS:
        raise _Geometry(f"a tensor with {len(size)} sizes and {len(stride)} strides")
    numel = math.prod(size)  # exact: Python integers do not overflow
    if numel > 0:
        needed = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if needed > storage.numel:
            raise _Geometry(f"a tensor of size {tuple(size)} that reaches beyond its storage of {storage.numel}")
    if numel > storage.numel:
        raise _Geometry(
            f"a tensor of {numel} elements viewing a storage of {storage.numel} (a stride-0 expansion); "
            "written out it would be larger than the file declares"
        )
    return PendingTensor(storage, offset, tuple(size), tuple(stride))


class _Geometry(pickle.UnpicklingError):
    """Raised inside the unpickler for an impossible tensor view; reported as TensorGeometryError."""


def _rebuild_parameter(data: Any, *rest: Any) -> PendingTensor:
    """Our `torch._utils._rebuild_parameter`: the tensor itself (no Parameter, no hooks)."""
    if not isinstance(data, PendingTensor):
        raise pickle.UnpicklingError("a parameter without tensor data")
    return data


_INT_LIMIT = 1 << 62


def _small_int(value: Any) -> bool:
    return type(value) is int and 0 <= value < _INT_LIMIT


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(_small_int(v) for v in value)


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


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, path: Path, storages: Any) -> None:
        super().__init__(file)
        self.path, self.storages = path, storages
        self.loaded: dict[str, _Storage] = {}

    def load_build(self) -> None:
        """BUILD (set an object's state) only on dicts and inert stand-ins; never on a tensor, a storage,
        a storage type or one of the allow-listed functions, whose attributes it could overwrite."""
        state, target = self.stack[-1], self.stack[-2]
        if not isinstance(target, (StandIn, dict)) or (isinstance(target, dict) and not isinstance(state, dict)):
            raise PickleRefusedOpcodeError(self.path, f"sets the state of a {_kind(target)} (BUILD)")
        if isinstance(target, dict):
            self.stack.pop()  # a dict's state is its attributes (OrderedDict._metadata): kept out, inert
            return
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

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
        if not _small_int(numel):
            raise _Geometry("a storage of a malformed size")
        if key not in self.loaded:
            self.loaded[key] = _Storage(lambda size: self.storages(key, size), numel, storage_type.dtype)
        elif self.loaded[key].numel != numel or self.loaded[key].dtype != storage_type.dtype:
            raise _Geometry(f"storage {key!r} declared twice with different sizes or types")
        return self.loaded[key]


def _kind(obj: Any) -> str:
    if isinstance(obj, PendingTensor):
        return "tensor"
    if isinstance(obj, (_Storage, _StorageType)):
        return "storage"
    if callable(obj):
        return f"callable ({getattr(obj, '__name__', type(obj).__name__)})"
    return type(obj).__name__


def load_pickled_weights(path: str | Path, nested: bool = False) -> dict[str, Tensor]:
    """The weights of a `torch.save` file read with the allow-list: its `state_dict` (a Lightning
    checkpoint) or the dict itself, as plain CPU tensors. Only those tensors' storages are read.
    `nested`: also the tensors of dicts inside it, under dot-joined keys (a textual-inversion `.pt`
    keeps its vectors at `string_to_param` -> `*`, read as `string_to_param.*`).

    Raises RefusedGlobalError (naming the global) for anything outside the allow-list and
    CorruptCheckpointError for files that are not torch's zip format.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):  # (itself raises BadZipFile for some damaged end records)
            _refuse_plain_pickle(path)
        return _load_zip(path, nested)
    except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, NotImplementedError, RuntimeError, KeyError,
            ValueError, OverflowError, OSError) as exc:
        # a damaged container: bad entry headers, CRC mismatch, unsupported compression or encryption
        raise CorruptCheckpointError(path, f"a damaged zip container ({type(exc).__name__}: {exc})") from exc


def _load_zip(path: Path, nested: bool) -> dict[str, Tensor]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CorruptCheckpointError(path, "a zip file without one data.pkl: not a torch.save checkpoint")
        root = pkl[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            order = _read_entry(archive, root + "byteorder", 16, path).decode("ascii", "replace").strip()
        if order != sys.byteorder:
            raise CorruptCheckpointError(path, f"its tensors are {order}-endian; this machine is {sys.byteorder}")

        def storage(key: str, size: int) -> bytes:
            name = f"{root}data/{key}"
            if name not in names:
                raise CorruptCheckpointError(path, f"storage {key!r} is missing from the archive")
            return _read_entry(archive, name, size, path, exact=True)

        program = _read_entry(archive, pkl[0], MAX_PICKLE_BYTES, path)
        obj = _run(_Unpickler(io.BytesIO(program), path, storage), path)
        pending = _weights(_flatten(obj) if nested else obj, path)
        _check_amplification(pending, path)
        try:
            return {name: tensor.materialize() for name, tensor in pending.items()}
        except (RuntimeError, ValueError, zipfile.BadZipFile) as exc:
            raise CorruptCheckpointError(path, f"cannot read a tensor: {exc}") from exc


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int, path: Path, *, exact: bool = False) -> bytes:
    """One zip entry, inflated only if its header promises at most `limit` bytes (exactly `limit` for a
    storage) and, compressed, no more than MAX_DEFLATE_RATIO times its compressed size."""
    info = archive.getinfo(name)
    if (info.file_size != limit) if exact else (info.file_size > limit):
        what = "declares" if exact else "allows"
        raise ZipBombError(path, f"zip entry {name!r} holds {info.file_size} bytes where the checkpoint {what} "
                                 f"{limit}: refused before inflating it")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + DEFLATE_SLACK:
        raise ZipBombError(path, f"zip entry {name!r} would inflate {info.compress_size} bytes to {info.file_size} "
                                 "(torch.save never compresses): refused as a zip bomb")
    with archive.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise CorruptCheckpointError(path, f"zip entry {name!r} is not the size its header says")
    return data


def _check_amplification(pending: Mapping[str, PendingTensor], path: Path) -> None:
    """The weights to write must not exceed MAX_AMPLIFICATION times the storages they view."""
    written = sum(t.nbytes for t in pending.values())
    stored = sum(s.numel * s.itemsize for s in {id(t.storage): t.storage for t in pending.values()}.values())
    if written > MAX_AMPLIFICATION * stored + AMPLIFICATION_SLACK:
        raise ZipBombError(path, f"its weights would write {written} bytes from {stored} bytes of storage "
                                 "(many tensors viewing one storage): refused")


def _refuse_plain_pickle(path: Path) -> None:
    """A non-zip file: run the restricted unpickler on its first pickle (to name a refused global), then refuse."""
    with path.open("rb") as f:
        first = _run(_Unpickler(f, path, _no_storages), path)
    if isinstance(first, int):
        raise CorruptCheckpointError(
            path, "a pre-1.6 torch.save file (legacy format): load and re-save it with torch>=1.6 first"
        )
    raise CorruptCheckpointError(path, "a plain pickle without tensor data: not a torch checkpoint")


def _no_storages(key: str, size: int) -> bytes:
    raise pickle.UnpicklingError("tensor storages outside torch's zip format")


def _run(unpickler: _Unpickler, path: Path) -> Any:
    try:
        return unpickler.load()
    except ModelError:
        raise
    except _Geometry as exc:
        raise TensorGeometryError(path, f"{exc}: the file is damaged or hostile") from exc
    except RecursionError as exc:
        raise CorruptCheckpointError(path, "cannot read the pickle: nested too deeply") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError) as exc:
        raise CorruptCheckpointError(path, f"cannot read the pickle: {type(exc).__name__}: {exc}") from exc


def _flatten(obj: Any, prefix: str = "", depth: int = 0) -> Any:
    """A dict of dicts as one dict with dot-joined keys (at most 8 levels; other values kept as they are)."""
    if not isinstance(obj, Mapping) or depth > 8:
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + ".", depth + 1))
        else:
            out[name] = value
    return out


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
