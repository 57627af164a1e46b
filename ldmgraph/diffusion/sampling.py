"""`sample(...)`: the one call the sampler nodes make (KSampler and KSamplerAdvanced semantics).

It picks the sigma schedule (the tail of a longer one for img2img, a slice for start/end steps),
draws seeded noise on the CPU, wraps the network in the denoiser / CFG / inpainting wrappers,
runs the named sampler, and returns a new LATENT on the input's device.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmgraph.diffusion.denoiser import Denoiser
from ldmgraph.diffusion.errors import DiffusionError
from ldmgraph.diffusion.guidance import CFGDenoiser, InpaintDenoiser
from ldmgraph.diffusion.noise import BatchNoiseSampler, draw, image_generators
from ldmgraph.diffusion.registry import BUILTIN_SAMPLERS, BUILTIN_SCHEDULES
from ldmgraph.diffusion.values import CondEntry, DiffusionModel, Latent


def resolve(table: str, name: str | Callable[..., Any], registry: Any = None) -> Callable[..., Any]:
    """A sampler ("samplers") or schedule ("schedules") by name.

    `registry` is a `ldmgraph.graph.registry.Registry` (anything with `.resolve(table, name)`), a
    mapping `{table: {name: callable | "module:attr"}}`, or None for the built-ins only.
    """
    if callable(name):
        return name
    if registry is not None and hasattr(registry, "resolve"):
        return registry.resolve(table, name)  # type: ignore[no-any-return]
    entries: Mapping[str, Any] = (
        registry[table]
        if isinstance(registry, Mapping)
        else {"samplers": BUILTIN_SAMPLERS, "schedules": BUILTIN_SCHEDULES}[table]
    )
    if name not in entries:
        raise DiffusionError(f"no {table[:-1]} named {name!r}; known: {', '.join(sorted(entries))}")
    value = entries[name]
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        value = getattr(importlib.import_module(module), attr)
    return value  # type: ignore[no-any-return]


def sampling_sigmas(
    schedule_fn: Callable[..., Tensor],
    model: DiffusionModel,
    steps: int,
    denoise: float = 1.0,
    start_step: int | None = None,
    end_step: int | None = None,
    return_with_leftover_noise: bool = False,
) -> Tensor:
    """The sigmas a run visits: for denoise < 1 the last steps + 1 of a schedule of steps / denoise
    steps (img2img); then ComfyUI KSamplerAdvanced's start/end slicing (end < steps forces the
    last sigma to 0 unless return_with_leftover_noise)."""
    if steps < 1:
        raise DiffusionError(f"steps must be at least 1, got {steps}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = schedule_fn(total, model.noise_schedule).to(torch.float32)
    sigmas = sigmas[-(steps + 1) :]
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[: end_step + 1].clone()
        if not return_with_leftover_noise:
            sigmas[-1] = 0.0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


def _latent_mask(mask: Tensor, samples: Tensor) -> Tensor:
    """A noise mask as `[B, 1, h, w]` at the latent's size (bilinear if given at pixel size)."""
    mask = mask.to(samples.device, torch.float32)
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != samples.shape[-2:]:
        mask = F.interpolate(mask, size=tuple(samples.shape[-2:]), mode="bilinear", align_corners=False)
    return mask.expand(samples.shape[0], 1, *samples.shape[-2:]) if mask.shape[0] == 1 else mask


def _call_sampler(fn: Callable[..., Tensor], options: dict[str, Any], **kwargs: Any) -> Tensor:
    """Pass `noise_sampler` and options only to samplers that accept them (plugins may not)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any and "noise_sampler" not in params:
        kwargs.pop("noise_sampler")
    unknown = [k for k in options if not takes_any and k not in params]
    if unknown:
        raise DiffusionError(f"sampler {getattr(fn, '__name__', fn)!r} has no option(s) {', '.join(unknown)}")
    return fn(**kwargs, **options)


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
    sampler_options: dict[str, Any] | None = None,
    start_from_noise: bool = False,
) -> Latent:
    """Denoise `latent` with a named sampler and schedule; returns a new Latent.

    Noise for image k is drawn on the CPU from seed + k (see noise.py). From pure noise (the
    first sigma is the model's sigma_max) the start is latent + noise * sqrt(1 + sigma^2), the
    variance of x_T / sqrt(alpha_bar_T); otherwise latent + noise * sigma (img2img). denoise 0
    returns the input; the callback gets {i, sigma, x, denoised, total} per step and may raise
    Cancelled. `start_from_noise` starts from unit-variance x_t (noise * sqrt(1 + sigma^2)) at any
    first sigma, as the original DDIM sampler and diffusers' pipelines do when the schedule's first
    timestep is below T.
    """
    if denoise <= 0:
        return latent
    schedule_fn = resolve("schedules", schedule, registry)
    sampler_fn = resolve("samplers", sampler, registry)
    sigmas = sampling_sigmas(
        schedule_fn, model, steps, denoise, start_step, end_step, return_with_leftover_noise
    )
    if len(sigmas) < 2:
        return latent
    home = latent.samples.device
    target = torch.device(device) if device is not None else getattr(model, "device", None) or home
    known = latent.samples.to(target, torch.float32)
    generators = image_generators(seed, known.shape[0], latent.batch_index)
    noise = draw(generators, known.shape[1:]).to(target) if add_noise else torch.zeros_like(known)
    sigma_max = model.noise_schedule.sigma_max
    start = float(sigmas[0])
    scale = (1 + start**2) ** 0.5 if start_from_noise or start >= sigma_max * (1 - 1e-5) else start
    x = known + noise * scale

    guided: Callable[..., Tensor] = CFGDenoiser(Denoiser(model), positive, negative, cfg)
    mask = None if latent.noise_mask is None else _latent_mask(latent.noise_mask, known)
    if mask is not None:
        guided = InpaintDenoiser(guided, known, noise, mask)  # type: ignore[arg-type]
    total = len(sigmas) - 1

    def report(info: dict[str, Any]) -> None:
        if callback is not None:
            callback({**info, "total": total})

    with torch.inference_mode():
        x = _call_sampler(
            sampler_fn,
            dict(sampler_options or {}),
            model=guided,
            x=x,
            sigmas=sigmas.to(target),
            extra_args=None,
            callback=report,
            generator=generators[0],
            noise_sampler=BatchNoiseSampler(generators, known.shape[1:], target),
        )
        if mask is not None:
            x = known * (1 - mask) + x * mask
        x = x.to(home, latent.samples.dtype if latent.samples.is_floating_point() else torch.float32)
    samples = x.clone()  # outside inference mode: an ordinary tensor that callers may edit
    return Latent(samples=samples, noise_mask=latent.noise_mask, batch_index=latent.batch_index)
