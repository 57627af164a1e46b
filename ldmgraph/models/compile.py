"""`--compile`: the U-Net and ControlNet called through `torch.compile`, once per input shape.

Why: at SD sizes a U-Net step is dominated by kernel launches and unfused element-wise work;
compiled (fused kernels, and CUDA graphs replaying a whole step at once where shapes are static)
it takes about half of eager's time on a GPU.

`install(module, options, report)` puts a `CompiledCall` in the module's call slot
(`nn.Module._compiled_call_impl`, what `nn.Module.compile` sets), so every caller of the module,
its patched handles, later jobs and model-cache hits share one compiled call. For each input
signature (shapes, dtypes, devices of the tensor arguments) it keeps one `torch.compile` object
with static shapes, built on first use and reused by every later step; `compilations` counts the
graphs the backend really compiled, `signatures` the shapes seen.

Backend and mode by device (override with $LDMGRAPH_COMPILE_BACKEND / $LDMGRAPH_COMPILE_MODE):
CUDA: inductor with mode "reduce-overhead" (CUDA graphs; the output is cloned, since a replay
reuses its buffers); CPU: inductor's C++ backend (needs a C++ compiler); MPS: inductor.
When compiling is not possible (no C++ compiler on the CPU, a backend that fails, an unsupported
platform) the call runs eager from then on and one line says why; an error that eager raises as
well is the model's own and is raised as it is. A model streamed block by block by the memory
manager runs eager (its hooks move weights during the forward).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

RECOMPILE_LIMIT = 64
"""Dynamo's per-function limit of compiled variants, raised from 8: every shape of every U-Net in
a session (base, refiner, ControlNets, each resolution) is one variant of `Module._call_impl`."""


@dataclass(frozen=True)
class CompileOptions:
    """Backend and mode; None picks them from the device at the first call."""

    backend: str | None = None
    mode: str | None = None


def choose(device: torch.device, options: CompileOptions | None) -> tuple[str, str | None]:
    """(backend, mode) for a device: the options' or the environment's choice, else by device."""
    options = options or CompileOptions()
    backend = options.backend or os.environ.get("LDMGRAPH_COMPILE_BACKEND") or "inductor"
    mode = options.mode or os.environ.get("LDMGRAPH_COMPILE_MODE") or None
    if mode is None and backend == "inductor" and device.type == "cuda":
        mode = "reduce-overhead"
    return backend, mode


def find_compiler(name: str) -> str | None:
    """The path of the C++ compiler inductor will call, or None (a seam: tests stand in a machine without one)."""
    return shutil.which(name)


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot compile for `device` on this machine, checked before trying (None: try)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if backend == "inductor" and device.type == "cpu":
        from torch._inductor import config

        # torch < 2.6 names the compiler in config.cpp.cxx; later releases take $CXX, else g++
        configured = getattr(config.cpp, "cxx", None)
        cxx = (configured[-1] if isinstance(configured, tuple) and configured else None) or os.environ.get("CXX") or "g++"
        if find_compiler(cxx) is None:
            return f"inductor needs a C++ compiler on the CPU and {cxx!r} was not found"
    return None


def _signature(args: tuple, kwargs: dict) -> tuple:
    def one(value: Any) -> Any:
        if isinstance(value, Tensor):
            return (tuple(value.shape), value.dtype, value.device)
        if isinstance(value, list | tuple):
            return tuple(one(v) for v in value)
        return value is None

    return one(args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _reason(exc: BaseException) -> str:
    """The exception's type and first line (backends raise pages of context)."""
    text = str(exc).strip()
    return type(exc).__name__ + (f": {text.splitlines()[0][:200]}" if text else "")


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return value


class CompiledCall:
    """The module's compiled call (see the module docstring); falls back to the eager call."""

    def __init__(self, module: nn.Module, options: CompileOptions | None, report: Callable[[str], None]) -> None:
        self.eager = module._call_impl
        self.name = type(module).__name__
        self.module_dict = module.__dict__
        self.options = options
        self.report = report
        self.compiled: dict[tuple, Callable[..., Any]] = {}
        self.signatures: list[tuple] = []
        self.compilations = 0
        self.calls = 0
        self.disabled: str | None = None
        self.cudagraphs = False

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A copied module starts eager (this call belongs to the original: its compiled graphs
        and its eager path are the original module's); `install` compiles the copy if asked."""
        return None

    def __reduce__(self) -> Any:
        return (type(None), ())

    def _backend(self, backend: str, mode: str | None) -> Any:
        """The backend callable, counting each graph it compiles."""
        if backend == "inductor":
            inner: Any = torch._TorchCompileInductorWrapper(mode, None, False)  # what torch.compile builds
        else:
            inner = torch._dynamo.lookup_backend(backend)

        def counting(gm: Any, example_inputs: Any) -> Any:
            self.compilations += 1
            return inner(gm, example_inputs)

        return counting

    def _build(self, device: torch.device) -> Callable[..., Any] | None:
        backend, mode = choose(device, self.options)
        why = unavailable(backend, device)
        if why is not None:
            self._disable(why)
            return None
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        self.cudagraphs = mode is not None and "reduce-overhead" in mode and device.type == "cuda"
        return torch.compile(self.eager, backend=self._backend(backend, mode), dynamic=False)  # type: ignore[no-any-return]

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.report(f"--compile: {self.name} runs eager: {why}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.disabled is not None:
            return self.eager(*args, **kwargs)
        if self.module_dict.get("ldmgraph_streamed"):
            self.report(f"--compile: {self.name} is streamed block by block (it does not fit the --gpu-memory "
                        "budget): it runs eager")
            return self.eager(*args, **kwargs)
        key = _signature(args, kwargs)
        fn = self.compiled.get(key)
        if fn is None:
            device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
            try:
                built = self._build(device)
            except Exception as exc:  # noqa: BLE001 - an unknown backend, a torch without the pieces
                self._disable(f"compiling is unavailable ({_reason(exc)})")
                built = None
            if built is None:
                return self.eager(*args, **kwargs)
            fn = self.compiled[key] = built
            self.signatures.append(key)
        try:
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raised: try eager
            out = self.eager(*args, **kwargs)  # the model's own errors are raised here, as eager raises them
            self._disable(f"compiling failed ({_reason(exc)})")
            return out
        return _clone(out) if self.cudagraphs else out


def install(module: nn.Module, options: CompileOptions | None, report: Callable[[str], None]) -> CompiledCall:
    """Route `module`'s calls through a `CompiledCall` (once: a module that has one keeps it)."""
    current = module.__dict__.get("_compiled_call_impl")
    if isinstance(current, CompiledCall):
        return current
    call = CompiledCall(module, options, report)
    module._compiled_call_impl = call  # type: ignore[assignment]
    return call


def compiled_call(module: nn.Module) -> CompiledCall | None:
    """The module's `CompiledCall`, if `--compile` installed one."""
    current = module.__dict__.get("_compiled_call_impl")
    return current if isinstance(current, CompiledCall) else None
