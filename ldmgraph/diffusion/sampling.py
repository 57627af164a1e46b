"""Sampling from its parts: SIGMAS, SAMPLER, GUIDER and NOISE, and `sample(...)` built on them.

- SIGMAS: a 1-D tensor of decreasing noise levels (schedules.py; split, flipped, joined).
- SAMPLER (`SamplerChoice`): a registered sampler function with its declared options checked
  and filled in (registry.py declares them; no signature sniffing).
- GUIDER (`Guider`): the model with its conditionings and guidance (CFG, plain, dual CFG),
  calling the CFG and inpainting machinery of guidance.py.
- NOISE (`noise.Noise`): the seed and the noise / rounding convention ("ldmgraph", "comfyui",
  "diffusers").

`run_sampling` draws the starting noise, scales it (noise.start_scale), wraps the guider for
the latent's inpainting mask, runs the sampler with the right per-step noise source (Brownian
tree for SDE samplers), and returns a new LATENT on the input's device. `sample(...)` (the
`Sampler` / `SamplerAdvanced` nodes: KSampler and KSamplerAdvanced semantics) picks the
schedule (the tail of a longer one for img2img, a slice for start/end steps) and calls it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmgraph.diffusion.denoiser import Denoiser
from ldmgraph.diffusion.errors import DiffusionError
from ldmgraph.diffusion.guidance import CFGDenoiser, InpaintDenoiser
from ldmgraph.diffusion.noise import Noise, start_scale
from ldmgraph.diffusion.registry import BUILTIN_SAMPLERS, BUILTIN_SCHEDULES, declared_options
from ldmgraph.diffusion.values import CondEntry, DiffusionModel, Latent


def _entry(table: str, name: str, registry: Any) -> Any:
    """The raw registry entry (callable, LazySampler or "module:attr" string) for a name."""
    if registry is not None and hasattr(registry, "resolve"):
        entries = getattr(registry, table)
        if name not in entries:
            return registry.resolve(table, name)  # raises the registry's own "did you mean" error
        return entries[name]
    entries = (
        registry[table]
        if isinstance(registry, Mapping)
        else {"samplers": BUILTIN_SAMPLERS, "schedules": BUILTIN_SCHEDULES}[table]
    )
    if name not in entries:
        raise DiffusionError(f"no {table[:-1]} named {name!r}; known: {', '.join(sorted(entries))}")
    return entries[name]


def resolve(table: str, name: str | Callable[..., Any], registry: Any = None) -> Callable[..., Any]:
    """A sampler ("samplers") or schedule ("schedules") by name.

    `registry` is a `ldmgraph.graph.registry.Registry` (anything with `.resolve(table, name)`), a
    mapping `{table: {name: callable | "module:attr"}}`, or None for the built-ins only.
    """
    if callable(name):
        return name
    if registry is not None and hasattr(registry, "resolve"):
        return registry.resolve(table, name)  # type: ignore[no-any-return]
    value = _entry(table, name, registry)
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        value = getattr(importlib.import_module(module), attr)
    return value  # type: ignore[no-any-return]


# ---------------------------------------------------------------- SAMPLER


@dataclass(frozen=True, eq=False)
class SamplerChoice:
    """A SAMPLER value: the sampler function and its options (every declared one, checked)."""

    name: str
    function: Callable[..., Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    brownian: bool = False  # draws its per-step noise from a Brownian tree (SDE samplers)

    def __call__(self, model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, **kwargs: Any) -> Tensor:
        return self.function(model, x, sigmas, **kwargs, **self.options)


BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde"})


def sampler_choice(
    sampler: str | Callable[..., Tensor], options: Mapping[str, Any] | None = None, registry: Any = None
) -> SamplerChoice:
    """Look a sampler up and check `options` against its declaration; undeclared ones are errors."""
    entry = sampler if callable(sampler) else _entry("samplers", sampler, registry)
    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "sampler")
    declared = declared_options(entry)
    unknown = sorted(set(options or {}) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise DiffusionError(f"sampler {name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
    values = {}
    for key, spec in declared.items():
        try:
            values[key] = spec.check(key, (options or {}).get(key, spec.default))
        except ValueError as exc:
            raise DiffusionError(f"sampler {name!r}: {exc}") from exc
    function = resolve("samplers", sampler, registry)
    brownian = bool(getattr(entry, "brownian", False)) or name in BROWNIAN_SAMPLERS
    return SamplerChoice(name=name, function=function, options=values, brownian=brownian)


# ---------------------------------------------------------------- GUIDER


class _NearestTimestep:
    """A noise schedule whose sigma -> t map gives the training step nearest in log-sigma (ComfyUI's
    `model_sampling.timestep`: argmin over |log sigma - log sigma_t|, the lower step on a tie)."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        log_sigmas = self.schedule.log_sigmas.to(sigma.device)
        distances = (sigma.to(torch.float32).log().reshape(-1, 1) - log_sigmas.reshape(1, -1)).abs()
        return distances.argmin(dim=1).to(torch.float32).view(sigma.shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.schedule, name)


class _IntegerTimesteps:
    """A model seen through `_NearestTimestep`: the U-Net gets integer timesteps (ComfyUI's
    convention); everything else is the model's own."""

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model
        self.noise_schedule = _NearestTimestep(model.noise_schedule)

    def apply_model(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model.apply_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@dataclass(frozen=True, eq=False)
class Guider:
    """A GUIDER value: what the sampler's denoiser is.

    cfg guidance (Ho & Salimans 2022): D = D_neg + cfg (D_pos - D_neg), negative unused at cfg 1
    ("basic" is cfg 1 with no negative). Dual CFG (ComfyUI's DualCFGGuider): with a second
    positive `middle`, D = D_neg + cfg_middle (D_middle - D_neg) + cfg (D_pos - D_middle).
    """

    model: DiffusionModel
    positive: Sequence[CondEntry]
    negative: Sequence[CondEntry] = ()
    cfg: float = 1.0
    middle: Sequence[CondEntry] | None = None
    cfg_middle: float = 1.0

    def denoiser(self, integer_timesteps: bool = False, sigmas: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """x0 = D(x, sigma) for the samplers; given the run's `sigmas`, their timesteps are looked
        up once here rather than at each step."""
        model: Any = _IntegerTimesteps(self.model) if integer_timesteps else self.model
        base = Denoiser(model)
        if sigmas is not None:
            base.prepare(sigmas)
        if self.middle is None:
            return CFGDenoiser(base, self.positive, self.negative, self.cfg)
        return _DualCFG(
            CFGDenoiser(base, self.positive, self.middle, self.cfg),
            CFGDenoiser(base, self.middle, self.negative, self.cfg_middle),
            CFGDenoiser(base, self.middle, [], 1.0),
        )


class _DualCFG:
    """D_neg + cfg_middle (D_middle - D_neg) + cfg (D_pos - D_middle), from three CFG wrappers."""

    def __init__(self, pos_over_middle: CFGDenoiser, middle_over_neg: CFGDenoiser, middle: CFGDenoiser) -> None:
        self.parts = (pos_over_middle, middle_over_neg, middle)
        self.noise_schedule = middle.noise_schedule

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        upper, lower, middle = (part(x, sigma) for part in self.parts)
        return upper + lower - middle


# ---------------------------------------------------------------- running


def _latent_mask(mask: Tensor, samples: Tensor) -> Tensor:
    """A noise mask as `[B, 1, h, w]` at the latent's size (bilinear if given at pixel size)."""
    mask = mask.to(samples.device, torch.float32)
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != samples.shape[-2:]:
        mask = F.interpolate(mask, size=tuple(samples.shape[-2:]), mode="bilinear", align_corners=False)
    return mask.expand(samples.shape[0], 1, *samples.shape[-2:]) if mask.shape[0] == 1 else mask


def run_sampling(
    guider: Guider,
    sampler: SamplerChoice,
    sigmas: Tensor,
    latent: Latent,
    noise: Noise,
    *,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Latent, Latent]:
    """Sample `latent` over `sigmas`; returns (the result, the last x0 prediction).

    The start is latent + noise * start_scale (noise.py); the callback gets {i, sigma, x,
    denoised, total} per step and may raise Cancelled.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    if len(sigmas) < 2:
        return latent, latent
    home = latent.samples.device
    model = guider.model
    target = torch.device(device) if device is not None else getattr(model, "device", None) or home
    known = latent.samples.to(target, torch.float32)
    std = latent.posterior_std
    std = std if std is not None and tuple(std.shape) == tuple(known.shape) else None
    start_noise, generators, posterior_draw = noise.start(tuple(known.shape), latent.batch_index, std)
    if posterior_draw is not None:  # diffusers' img2img: z = mean + std * eps, drawn before the noise
        known = known + posterior_draw.to(target)
    start_noise = start_noise.to(target)
    scale = start_scale(noise.start_noise, float(sigmas[0]), model.noise_schedule.sigma_max)
    x = known + start_noise * scale

    guided: Callable[..., Tensor] = guider.denoiser(integer_timesteps=noise.convention == "comfyui", sigmas=sigmas)
    mask = None if latent.noise_mask is None else _latent_mask(latent.noise_mask, known)
    if mask is not None:
        guided = InpaintDenoiser(guided, known, start_noise, mask)  # type: ignore[arg-type]
    total = len(sigmas) - 1
    last: dict[str, Tensor] = {}

    def report(info: dict[str, Any]) -> None:
        last["denoised"] = info["denoised"]
        if callback is not None:
            callback({**info, "total": total})

    noise_sampler = noise.step_sampler(
        generators, tuple(known.shape), target, sigmas, sampler.brownian, latent.batch_index
    )
    scope = getattr(model, "sampling_scope", None)  # per-run reuse of conditioning-only work
    with torch.inference_mode(), scope() if callable(scope) else contextlib.nullcontext():
        x = sampler(guided, x, sigmas.to(target), extra_args=None, callback=report, noise_sampler=noise_sampler)
        # no blend here: InpaintDenoiser already returned D * mask + known * (1 - mask) at every
        # step, as ComfyUI's KSamplerX0Inpaint does; a second blend would square a fractional mask
        denoised = last.get("denoised", x)
        dtype = latent.samples.dtype if latent.samples.is_floating_point() else torch.float32
        x, denoised = x.to(home, dtype), denoised.to(home, dtype)
    # outside inference mode: ordinary tensors that callers may edit
    result = Latent(samples=x.clone(), noise_mask=latent.noise_mask, batch_index=latent.batch_index)
    return result, Latent(samples=denoised.clone(), noise_mask=latent.noise_mask, batch_index=latent.batch_index)


def sampling_sigmas(
    schedule_fn: Callable[..., Tensor],
    model: DiffusionModel,
    steps: int,
    denoise: float = 1.0,
    start_step: int | None = None,
    end_step: int | None = None,
    return_with_leftover_noise: bool = False,
    discard_penultimate: bool = False,
) -> Tensor:
    """The sigmas a KSampler-style run visits (ComfyUI's KSampler / KSamplerAdvanced rules): the
    whole schedule of `steps` (which for ddim_uniform may hold more steps); for denoise < 1 the
    last steps + 1 of a schedule of steps / denoise steps (img2img); `discard_penultimate` makes
    the schedule one step longer and drops its next-to-last sigma (ComfyUI does that for dpm_2,
    dpm_2_ancestral, uni_pc and uni_pc_bh2); then the start/end slicing (end < steps forces the
    last sigma to 0 unless return_with_leftover_noise)."""
    if steps < 1:
        raise DiffusionError(f"steps must be at least 1, got {steps}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    total += int(discard_penultimate)
    sigmas = schedule_fn(total, model.noise_schedule).to(torch.float32)
    if discard_penultimate and len(sigmas) > 2:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    if denoise < 1.0:
        sigmas = sigmas[-(steps + 1) :]
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[: end_step + 1].clone()
        if not return_with_leftover_noise:
            sigmas[-1] = 0.0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
"""Samplers for which ComfyUI's KSampler computes one step more and drops the next-to-last sigma."""


def sample(
    model: DiffusionModel,
    latent: Latent,
    positive: Sequence[CondEntry],
    negative: Sequence[CondEntry],
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler: str | Callable[..., Tensor],
    schedule: str | Callable[..., Tensor],
    denoise: float = 1.0,
    start_step: int | None = None,
    end_step: int | None = None,
    add_noise: bool = True,
    return_with_leftover_noise: bool = False,
    device: torch.device | str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    registry: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    convention: str = "ldmgraph",
    start_noise: str = "auto",
) -> Latent:
    """Denoise `latent` with a named sampler and schedule; returns a new Latent.

    The same parts as a custom graph: `Guider(model, positive, negative, cfg)`, the sampler with
    its options, `Noise(seed, add_noise, convention, start_noise)` and the schedule's sigmas
    (sampling_sigmas). denoise 0 returns the input.
    """
    if denoise <= 0:
        return latent
    sigmas = sampling_sigmas(
        resolve("schedules", schedule, registry),
        model,
        steps,
        denoise,
        start_step,
        end_step,
        return_with_leftover_noise,
        discard_penultimate=convention == "comfyui" and sampler in DISCARD_PENULTIMATE,
    )
    choice = sampler_choice(sampler, sampler_options, registry)
    guider = Guider(model, positive, negative, cfg)
    noise = Noise(seed, enabled=add_noise, convention=convention, start_noise=start_noise)
    result, _ = run_sampling(guider, choice, sigmas, latent, noise, device=device, callback=callback)
    return result
