"""Where models live while a session runs: a device-memory manager (`--gpu-memory`) and the
session's model runtime (`--compile` and the manager together).

Why: SDXL base + refiner + a ControlNet do not fit at once on the 8-12 GB cards most users own, and
a loader that puts every model on the device fails there. The manager keeps every model's weights
at home (host memory, pinned on CUDA so copies overlap compute) and moves a model to the device
when a node calls it:

- A model that fits in the weights' budget is moved whole and stays resident between calls and
  jobs; when room is needed, idle residents are evicted least recently used first (eviction only
  points the module back at its home tensors: nothing is copied back, the weights never changed).
- A U-Net or ControlNet that does not fit even alone is streamed: its blocks (top-level children, sequential
  containers split into their elements) are copied to the device as the forward pass enters them,
  in the order the first pass recorded, the next block prefetched on a second CUDA stream while the
  current one computes, and dropped when the block returns. The device then holds at most the
  other models in use plus two blocks. A text encoder or autoencoder that does not fit computes at
  home (decision "host").
- Patches (LoRA & co., `ldmgraph.models.patches`) are applied inside the manager's placement, to
  the weights where they are at that moment: on the device for a resident model, on the home
  tensors for a streamed one (each block's device copy is made from the patched home, during the
  call). A patch is applied once per call and restored before the model can move, so it is never
  skipped and never doubled.

Every decision is recorded as plain data (`ModelManager.moves`, `Move`), and an `Accountant` counts
weight bytes on the device and their peak, so tests check the policy on the CPU (where "device"
and host are the same memory and the accountant stands in for the card). The budget covers
weights only; `WORKING_FRACTION` of `--gpu-memory` is kept for activations.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ldmgraph.models.compile import install

RUNTIME_ATTR = "ldmgraph_runtime"
"""The attribute (in a handle's `__dict__`, so patched copies carry it) naming its session's runtime."""

GIB = 2**30
WORKING_FRACTION = 0.3
"""Share of the budget left for activations (the U-Net's skips, attention, the VAE's feature maps)."""
FREE_MARGIN_FRACTION = 0.1
FREE_MARGIN_MIN = GIB // 2
"""The default budget is what the device reports free minus max(10 %, 0.5 GiB) (other processes,
the CUDA context's own growth, allocator fragmentation)."""

F = TypeVar("F", bound=Callable[..., Any])


class ModelPlacementError(RuntimeError):
    """A model that cannot run within the device-memory budget even block by block."""


# ---------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Move:
    """One decision: `action` is "load" (whole model to the device), "evict" (back home),
    "stream" (the model runs block by block), "host" (it computes at home), "block_in" /
    "block_out" (one block of a streamed model), "unstream" (its last block went home), "forget"
    (a resident model nobody holds any more); `device_bytes`: weight bytes on the device after it."""

    action: str
    model: str
    nbytes: int
    device_bytes: int
    block: str = ""


@dataclass
class Accountant:
    """Bytes of weights on the device and their peak: the card's stand-in in CPU tests."""

    bytes: int = 0
    peak: int = 0

    def add(self, n: int) -> None:
        self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def remove(self, n: int) -> None:
        self.bytes -= n


def default_budget(device: str | torch.device) -> int | None:
    """The budget when `--gpu-memory` is not given: free device memory minus the margin on CUDA;
    None (no manager) elsewhere, where host and device share memory."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free - max(free * FREE_MARGIN_FRACTION, FREE_MARGIN_MIN))


def _tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of a module, each storage once (tied weights move together)."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            out.append(t)
    return out


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class _Entry:
    ref: Any  # weakref.ref to the module: a model the session's cache drops is freed, device copy included
    name: str
    tensors: list[Tensor]
    homes: list[Tensor]
    nbytes: int
    state: str = "home"  # home | resident | streamed
    users: int = 0
    streamer: _Streamer | None = None

    @property
    def module(self) -> nn.Module:
        module = self.ref()
        assert module is not None, "a model in use is alive"
        return module  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------- the manager


class ModelManager:
    """Moves models between their home (host) and `device` within `budget_bytes` (see the module
    docstring). `use(module, name)` is the one entry point: a context inside which the module's
    weights can be used on the device."""

    def __init__(self, budget_bytes: int, device: str | torch.device, *, host: str | torch.device = "cpu",
                 working_fraction: float = WORKING_FRACTION) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the device-memory budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self.weights_budget = int(budget_bytes * (1.0 - working_fraction))
        self.device = torch.device(device)
        self.host = torch.device(host)
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.accountant = Accountant()
        self.moves: list[Move] = []
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._copy_stream: Any = None

    # -- public ------------------------------------------------------------------------------
    @contextmanager
    def use(self, module: nn.Module, name: str | None = None) -> Iterator[None]:
        """Run inside with `module`'s weights usable on the device: resident, or streamed by its
        blocks during its forward. Models in use are never evicted; calls from several threads
        take turns."""
        with self._lock:
            entry = self._entry(module, name)
            entry.users += 1
            try:
                self._place(entry)
                yield
            finally:
                entry.users -= 1
                if entry.users == 0 and entry.state == "streamed" and entry.streamer is not None:
                    entry.streamer.stop()

    def resident(self) -> list[str]:
        """Names of the models on the device, least recently used first."""
        return [e.name for e in self._entries.values() if e.state == "resident"]

    def decisions(self) -> list[dict[str, Any]]:
        """`moves` as plain dictionaries (what the benchmark logs)."""
        return [m.__dict__.copy() for m in self.moves]

    def clear(self) -> None:
        """Send every idle model home."""
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.users == 0 and entry.state == "resident":
                    self._evict(entry)

    # -- placing -----------------------------------------------------------------------------
    def _entry(self, module: nn.Module, name: str | None) -> _Entry:
        entry = self._entries.get(id(module))
        if entry is None or entry.ref() is not module:
            tensors = _tensors(module)
            homes = [self._home(t) for t in tensors]
            entry = _Entry(weakref.ref(module), name or type(module).__name__, tensors, homes, _nbytes(tensors))
            self._entries[id(module)] = entry
            weakref.finalize(module, self._forget, id(module), entry)
        return entry

    def _forget(self, key: int, entry: _Entry) -> None:
        """A model nobody holds any more: its device copy goes with it."""
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                if entry.state == "resident":
                    self.accountant.remove(entry.nbytes)
                    self.moves.append(Move("forget", entry.name, entry.nbytes, self.accountant.bytes))
                entry.tensors, entry.homes = [], []

    @torch.inference_mode(False)
    def _home(self, t: Tensor) -> Tensor:
        """The host copy a tensor is pointed back to (pinned on CUDA, for asynchronous copies).
        Made outside inference mode, like every copy here: patches update weights in place, and
        an inference tensor cannot be updated in place outside inference mode."""
        home = t.data if t.device == self.host else t.data.to(self.host)
        if self.pin and not home.is_pinned():
            home = home.pin_memory()
        t.data = home
        return home

    def _busy_bytes(self, entry: _Entry) -> int:
        """Device bytes the other models in use hold or may hold: residents whole, streamed ones
        their window (what stays on the device plus the blocks they may bring in at once)."""
        busy = 0
        for other in self._entries.values():
            if other is not entry and other.users:
                if other.state == "resident":
                    busy += other.nbytes
                elif other.state == "streamed" and other.streamer is not None:
                    busy += other.streamer.window
        return busy

    def _place(self, entry: _Entry) -> None:
        if entry.state == "resident":
            self._entries.move_to_end(id(entry.module))
            return
        if entry.state == "streamed" and entry.users > 1:
            return  # a nested use of a model already streaming
        if entry.nbytes <= self.weights_budget - self._busy_bytes(entry):
            self._make_room(entry.nbytes, entry)
            self._load(entry)
            return
        if not _streamable(entry.module):
            self.moves.append(Move("host", entry.name, entry.nbytes, self.accountant.bytes))
            return  # it computes at home, where its weights are
        self._make_room(self.weights_budget, entry)  # everything idle goes home
        available = self.weights_budget - self._busy_bytes(entry)
        if entry.streamer is None:
            entry.streamer = _Streamer(self, entry)
        entry.streamer.start(available)
        entry.state = "streamed"
        self._entries.move_to_end(id(entry.module))
        self.moves.append(Move("stream", entry.name, entry.nbytes, self.accountant.bytes))

    def _make_room(self, need: int, keep: _Entry) -> None:
        for other in list(self._entries.values()):  # least recently used first
            if self.accountant.bytes + need <= self.weights_budget:
                return
            if other is not keep and other.state == "resident" and other.users == 0:
                self._evict(other)

    def _load(self, entry: _Entry) -> None:
        for t, home in zip(entry.tensors, entry.homes, strict=True):
            t.data = self._copy(home)
        if self.pin:
            torch.cuda.current_stream(self.device).synchronize()
        entry.state = "resident"
        self._entries.move_to_end(id(entry.module))
        self.accountant.add(entry.nbytes)
        self.moves.append(Move("load", entry.name, entry.nbytes, self.accountant.bytes))

    def _evict(self, entry: _Entry) -> None:
        for t, home in zip(entry.tensors, entry.homes, strict=True):
            t.data = home
        entry.state = "home"
        self.accountant.remove(entry.nbytes)
        self.moves.append(Move("evict", entry.name, entry.nbytes, self.accountant.bytes))

    @torch.inference_mode(False)
    def _copy(self, home: Tensor, stream: Any = None) -> Tensor:
        """A device copy of a home tensor (a real copy even where device and host are one memory,
        so CPU tests see the same data flow as the card)."""
        if stream is None:
            return torch.empty_like(home, device=self.device).copy_(home, non_blocking=self.pin)
        with torch.cuda.stream(stream):
            return torch.empty_like(home, device=self.device).copy_(home, non_blocking=True)

    def copy_stream(self) -> Any:
        """The second CUDA stream that prefetches blocks (None off CUDA)."""
        if self.pin and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream


# ---------------------------------------------------------------------------------- streaming


def _streamable(module: nn.Module) -> bool:
    """U-Nets and ControlNets: their forward calls each of their blocks as a module, which is what
    streaming hooks into (text encoders and autoencoders that do not fit compute at home instead)."""
    return isinstance(getattr(module, "input_blocks", None), nn.ModuleList)


def _blocks(module: nn.Module, limit: int) -> list[tuple[str, nn.Module]]:
    """The units a streamed model moves: its children, module lists always split into their
    elements (they are never called themselves), sequential containers split while over `limit`."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, child: nn.Module) -> None:
        big = _nbytes(_tensors(child)) > limit
        if isinstance(child, nn.ModuleList) or (big and isinstance(child, nn.Sequential) and len(child)):
            for name, sub in child.named_children():
                visit(f"{prefix}.{name}", sub)
        elif _tensors(child):
            out.append((prefix, child))

    for name, child in module.named_children():
        visit(name, child)
    return out


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class _Streamer:
    """Copies one model's blocks to the device as its forward enters them (see the module docstring)."""

    def __init__(self, manager: ModelManager, entry: _Entry) -> None:
        self.manager = manager
        self.entry = entry
        self.order: list[int] = []  # block indices in the order the first forward used them
        self.blocks: list[tuple[str, nn.Module]] = []
        self.members: list[list[int]] = []  # per block: indices into entry.tensors
        self.rest: list[int] = []
        self.loaded: dict[int, tuple[int, Any]] = {}  # block -> (bytes, copy-done event)
        self._hooks: list[Any] = []
        self._limit = -1
        self._prefetch = True
        self.window = 0  # the most this model holds on the device while it streams

    def _split(self, available: int) -> None:
        limit = max(available // 2, 1)
        if limit == self._limit:
            return
        self._limit, self.order = limit, []
        self.blocks = _blocks(self.entry.module, limit)
        index = {id(t): i for i, t in enumerate(self.entry.tensors)}
        self.members = [[index[id(t)] for t in _tensors(m) if id(t) in index] for _, m in self.blocks]
        inside = {i for ids in self.members for i in ids}
        self.rest = [i for i in range(len(self.entry.tensors)) if i not in inside]

    def _bytes(self, ids: list[int]) -> int:
        return _nbytes([self.entry.homes[i] for i in ids])

    def start(self, available: int) -> None:
        """Install the hooks; fail now, naming the sizes, if the largest block cannot fit."""
        self._split(available)
        rest = self._bytes(self.rest)
        sizes = [self._bytes(ids) for ids in self.members]
        largest = max(sizes, default=0)
        if rest + largest > available:
            raise ModelPlacementError(
                f"{self.entry.name} ({self.entry.nbytes / GIB:.2f} GiB) does not fit in the --gpu-memory budget "
                f"({self.manager.budget_bytes / GIB:.2f} GiB, of which {available / GIB:.2f} GiB is free for its "
                f"weights) even block by block (largest block {largest / GIB:.2f} GiB); raise --gpu-memory")
        pairs = [a + b for a, b in zip(sizes, sizes[1:], strict=False)]
        self._prefetch = rest + max(pairs, default=largest) <= available
        self.window = rest + (max(pairs, default=largest) if self._prefetch else largest)
        self._move_in(self.rest)
        module = self.entry.module
        self._hooks = [module.register_forward_pre_hook(self._inputs, with_kwargs=True),
                       module.register_forward_hook(self._finish)]
        for i, (_, block) in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._enter, i), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(functools.partial(self._leave, i)))
        module.__dict__["ldmgraph_streamed"] = True

    def stop(self) -> None:
        """Remove the hooks and send every block home (the end of a use)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for i in list(self.loaded):
            self._drop(i)
        self._move_out(self.rest)
        self.entry.module.__dict__.pop("ldmgraph_streamed", None)
        self.entry.state = "home"
        m = self.manager
        m.moves.append(Move("unstream", self.entry.name, self.entry.nbytes, m.accountant.bytes))

    def _move_in(self, ids: list[int]) -> None:
        for i in ids:
            self.entry.tensors[i].data = self.manager._copy(self.entry.homes[i])
        self.manager.accountant.add(self._bytes(ids))

    def _move_out(self, ids: list[int]) -> None:
        for i in ids:
            self.entry.tensors[i].data = self.entry.homes[i]
        self.manager.accountant.remove(self._bytes(ids))

    def _inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        device = self.manager.device
        return _to_device(args, device), _to_device(kwargs, device)

    def _finish(self, module: nn.Module, args: tuple, output: Any) -> None:
        """The end of a streamed forward: wait for every copy from the home tensors, so that a patch
        restored on them right after the call cannot race a copy still in flight."""
        m = self.manager
        if m.pin:
            if m._copy_stream is not None:
                m._copy_stream.synchronize()
            torch.cuda.current_stream(m.device).synchronize()

    def _fetch(self, i: int, stream: Any = None) -> None:
        m = self.manager
        size = self._bytes(self.members[i])
        for t in self.members[i]:
            self.entry.tensors[t].data = m._copy(self.entry.homes[t], stream)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self.loaded[i] = (size, event)
        m.accountant.add(size)
        m.moves.append(Move("block_in", self.entry.name, size, m.accountant.bytes, self.blocks[i][0]))

    def _enter(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        m = self.manager
        if i not in self.loaded:
            self._fetch(i)
        _, event = self.loaded[i]
        if event is not None:  # the prefetch ran on the copy stream: compute waits for it
            compute = torch.cuda.current_stream(m.device)
            compute.wait_event(event)
            for t in self.members[i]:
                self.entry.tensors[t].data.record_stream(compute)
        if len(self.order) < len(self.blocks) and i not in self.order:
            self.order.append(i)
        nxt = self._next(i)
        if nxt is not None and self._prefetch and nxt not in self.loaded:
            self._fetch(nxt, m.copy_stream())
        return _to_device(args, m.device), _to_device(kwargs, m.device)

    def _next(self, i: int) -> int | None:
        """The block the forward entered after `i` last time (None before the first pass knows)."""
        if i in self.order:
            k = self.order.index(i)
            if k + 1 < len(self.order):
                return self.order[k + 1]
        return None

    def _leave(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        if i in self.loaded:
            self._drop(i)

    def _drop(self, i: int) -> None:
        size, _ = self.loaded.pop(i)
        for t in self.members[i]:
            self.entry.tensors[t].data = self.entry.homes[t]
        m = self.manager
        m.accountant.remove(size)
        m.moves.append(Move("block_out", self.entry.name, size, m.accountant.bytes, self.blocks[i][0]))


# ---------------------------------------------------------------------------------- the runtime


@dataclass
class ModelRuntime:
    """A session's model settings that the front ends set (`--compile`, `--gpu-memory`): attached
    to the session's model cache, which adopts every model it hands out (`adopt`); handles then
    run their calls inside `placed` (the manager's placement) and through the compiled call.

    `home` is where loaders put weights ("cpu" under a manager, else None: the loader's choice).
    """

    compile: bool = False
    manager: ModelManager | None = None
    compile_options: Any = None
    messages: list[str] = field(default_factory=list)

    @property
    def home(self) -> str | None:
        return None if self.manager is None else str(self.manager.host)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelRuntime:
        """A copied handle belongs to the same session: the runtime is shared, never copied."""
        return self

    def adopt(self, value: Any) -> Any:
        """Mark the handles in `value` (a Checkpoint, a handle) as this session's; compile U-Nets and
        ControlNets when asked. Idempotent; returns `value`."""
        parts = value.parts() if callable(getattr(value, "parts", None)) and not isinstance(value, nn.Module) else [value]
        for handle in parts:
            if not isinstance(handle, nn.Module) or handle.__dict__.get(RUNTIME_ATTR) is self:
                continue
            handle.__dict__[RUNTIME_ATTR] = self
            if self.compile:
                for module in _compiled_parts(handle):
                    install(module, self.compile_options, self.report)
            if self.manager is not None and not hasattr(type(handle), "apply_model"):
                _place_encoders(handle)
        return value

    def report(self, message: str) -> None:
        """One line on stderr per distinct message (the compile fallback, a streamed model running eager)."""
        if message not in self.messages:
            self.messages.append(message)
            print(f"ldmgraph: {message}", file=sys.stderr, flush=True)

    def placed(self, handle: Any) -> Any:
        """The manager's placement of a handle's weights for one call (a no-op without a manager)."""
        if self.manager is None:
            return nullcontext()
        module = _weights_module(handle)
        return self.manager.use(module, getattr(handle, "name", None) or _name(handle, module))


def _name(handle: Any, module: nn.Module) -> str:
    info = getattr(handle, "info", None)
    family = getattr(info, "architecture", None)
    return f"{type(module).__name__}" + (f" ({family})" if isinstance(family, str) else "")


def _weights_module(handle: Any) -> nn.Module:
    """The module whose weights a handle uses (shared by the handle's patched copies)."""
    for attr in ("diffusion_model", "first_stage_model", "control_model"):
        module = getattr(handle, attr, None)
        if isinstance(module, nn.Module):
            return module
    return handle  # type: ignore[no-any-return]


def _compiled_parts(handle: Any) -> list[nn.Module]:
    return [m for m in (getattr(handle, "diffusion_model", None), getattr(handle, "control_model", None))
            if isinstance(m, nn.Module)]


def _place_encoders(handle: nn.Module) -> None:
    """Text encoders: their `encode*` methods run inside the placement (a patched copy replaces
    them with its own patch-scoped methods and then computes where the weights are)."""
    for name in dir(type(handle)):
        method = getattr(type(handle), name, None)
        if name.startswith("encode") and inspect.isfunction(method):  # plain methods, not class or static ones
            handle.__dict__[name] = functools.partial(_placed_call, handle, method)


def _placed_call(handle: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with placed(handle):
        return method(handle, *args, **kwargs)


def placed(handle: Any) -> Any:
    """The placement context of `handle` for one call; a no-op (one dictionary look-up) when its
    session runs without a manager."""
    runtime = handle.__dict__.get(RUNTIME_ATTR)
    if runtime is None or runtime.manager is None:
        return nullcontext()
    return runtime.placed(handle)


def managed(method: F) -> F:
    """Decorator for handle methods that use the handle's weights: run them inside `placed`."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = self.__dict__.get(RUNTIME_ATTR)
        if runtime is None or runtime.manager is None:
            return method(self, *args, **kwargs)
        with runtime.placed(self):
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


def runtime_from_flags(compile: bool, gpu_memory: float | None, device: str | None) -> ModelRuntime | None:
    """The runtime the CLI flags ask for (None when neither flag changes anything): `gpu_memory`
    in GiB, 0 = no manager, None = the default (free CUDA memory minus a margin; none off CUDA)."""
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = None
    if gpu_memory is None:
        budget = default_budget(target)
        manager = None if budget is None else ModelManager(budget, target)
    elif gpu_memory > 0:
        manager = ModelManager(int(gpu_memory * GIB), target)
    if not compile and manager is None:
        return None
    return ModelRuntime(compile=compile, manager=manager)
