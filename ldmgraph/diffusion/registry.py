"""The built-in samplers and sigma schedules, registered through the plugin hooks, and the sampler
option declarations that plugin samplers use too.

Entries are lazy: loading plugins, listing nodes and validating a workflow never import torch
(docs/INTERFACES.md). A sampler's own options (eta, s_noise, order, ...) are declared here, in
data, next to its lazy entry, so that `ldmgraph nodes` can show them as inputs and validation can
check their bounds without importing the sampler. Keep this module free of torch imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ldmgraph.plugins import hookimpl

OPTION_TYPES = ("float", "int", "bool", "choice")


@dataclass(frozen=True)
class SamplerOption:
    """One option of a sampler: its type ("float", "int", "bool" or "choice"), default, bounds,
    choices and help text. The sampler function receives it as a keyword argument."""

    kind: str
    default: Any
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OPTION_TYPES:
            raise ValueError(f"sampler option type {self.kind!r} is not one of {', '.join(OPTION_TYPES)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a 'choice' sampler option needs choices")

    def check(self, name: str, value: Any) -> Any:
        """The value in canonical form, or a ValueError naming the option, its bounds and the fix."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} takes true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in (self.choices or ()):
                raise ValueError(f"option {name!r} is {value!r}; use one of {', '.join(self.choices or ())}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"option {name!r} takes a number, got {value!r}")
        if self.kind == "int" and not float(value).is_integer():
            raise ValueError(f"option {name!r} takes an integer, got {value!r}")
        value = int(value) if self.kind == "int" else float(value)
        if self.ge is not None and value < self.ge:
            raise ValueError(f"option {name!r} is {value}, below the minimum {self.ge}; use a value >= {self.ge}")
        if self.le is not None and value > self.le:
            raise ValueError(f"option {name!r} is {value}, above the maximum {self.le}; use a value <= {self.le}")
        return value


def sampler_options(**options: SamplerOption) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator declaring a sampler function's options: `@sampler_options(eta=SamplerOption(...))`.

    Use it on a sampler registered as a callable; for a lazy "module:function" entry, register
    `LazySampler("module:function", eta=SamplerOption(...))` so that listings need no import."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.sampler_options = dict(options)  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass(frozen=True)
class LazySampler:
    """A sampler entry that names its function ("module:function") and declares its options, so the
    function (and torch) is imported only when the sampler first runs."""

    target: str
    sampler_options: Mapping[str, SamplerOption] = field(default_factory=dict)

    def __init__(self, target: str, **options: SamplerOption) -> None:
        if ":" not in target:
            raise ValueError(f"sampler target {target!r} must be 'module:function'")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "sampler_options", dict(options))

    def load(self) -> Callable[..., Any]:
        """The sampler function itself."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)


def declared_options(entry: Any) -> dict[str, SamplerOption]:
    """The options a registry entry declares (a LazySampler, or a function decorated with
    `sampler_options`); a plain "module:function" string declares none."""
    return dict(getattr(entry, "sampler_options", None) or {})


# ---------------------------------------------------------------- the built-ins


def _eta(default: float, what: str = "noise added per step (0 = deterministic)") -> SamplerOption:
    return SamplerOption("float", default, ge=0.0, le=100.0, description=what)


S_NOISE = SamplerOption("float", 1.0, ge=0.0, le=100.0, description="scale of the added noise")
ORDER_LMS = SamplerOption("int", 4, ge=1, le=4, description="number of past derivatives combined")
ORDER_UNIPC = SamplerOption("int", 3, ge=1, le=3, description="solver order (lower at warm-up and at the end)")
SOLVER = SamplerOption(
    "choice", "midpoint", choices=("midpoint", "heun"), description="second-order correction of the SDE solver"
)
FINAL_ALPHA = SamplerOption(
    "choice",
    "one",
    choices=("one", "first"),
    description="DDIM/PLMS's last step: to alpha_bar = 1 (sigma 0) or to alpha_bar at t = 0 "
    "(diffusers' set_alpha_to_one = True / False)",
)

_OPTIONS: dict[str, dict[str, SamplerOption]] = {
    "euler": {},
    "euler_ancestral": {"eta": _eta(1.0), "s_noise": S_NOISE},
    "heun": {},
    "dpm_2": {},
    "dpm_2_ancestral": {"eta": _eta(1.0), "s_noise": S_NOISE},
    "lms": {"order": ORDER_LMS},
    "dpmpp_2m": {},
    "dpmpp_2m_sde": {"eta": _eta(1.0), "s_noise": S_NOISE, "solver_type": SOLVER},
    "dpmpp_sde": {
        "eta": _eta(1.0),
        "s_noise": S_NOISE,
        "r": SamplerOption("float", 0.5, ge=0.01, le=0.99, description="position of the middle stage"),
    },
    "ddim": {"eta": _eta(0.0, "0 = deterministic DDIM, 1 = DDPM-like"), "final_alpha": FINAL_ALPHA},
    "ddpm": {},
    "lcm": {},
    "plms": {"final_alpha": FINAL_ALPHA},
    "uni_pc": {"order": ORDER_UNIPC},
    "uni_pc_bh2": {"order": ORDER_UNIPC},
}
SAMPLER_NAMES = tuple(_OPTIONS)
SCHEDULE_NAMES = (
    "normal",
    "karras",
    "exponential",
    "simple",
    "sgm_uniform",
    "ddim_uniform",
    "beta",
    "leading",
    "trailing",
    "linspace_rounded",
    "lcm",
)

BUILTIN_SAMPLERS: dict[str, LazySampler] = {
    name: LazySampler(f"ldmgraph.diffusion.samplers:{name}", **options) for name, options in _OPTIONS.items()
}
BUILTIN_SCHEDULES: dict[str, str] = {name: f"ldmgraph.diffusion.schedules:{name}" for name in SCHEDULE_NAMES}


@hookimpl
def ldmgraph_samplers() -> dict[str, Any]:
    """The built-in samplers by name (ComfyUI's names), with their declared options."""
    return dict(BUILTIN_SAMPLERS)


@hookimpl
def ldmgraph_schedules() -> dict[str, str]:
    """The built-in sigma schedules by name (ComfyUI's names)."""
    return dict(BUILTIN_SCHEDULES)
