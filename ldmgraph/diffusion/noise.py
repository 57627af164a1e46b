"""Seeded noise (the NOISE value) and its conventions: drawn on the CPU, so the same seed gives
the same image on every device (torch's CPU Mersenne Twister is the same everywhere).

Two named conventions, recorded in the workflow (and so in every PNG it writes):

- "ldmgraph" (the default of native workflows, and diffusers' with one generator per image):
  image k of a batch draws from its own generator seeded seed + k (or seed + batch_index[k]),
  first its starting noise, then the per-step noise of ancestral samplers, so image k equals a
  single-image run with that seed. Brownian-tree noise (SDE samplers) is one tree per image,
  seeded the same way.
- "comfyui" (ComfyUI's `prepare_noise` and `default_noise_sampler`): the whole batch's starting
  noise is one draw from one generator seeded with the seed (with batch_index, the draws for
  indices 0..max are made in order and the chosen ones kept); ancestral samplers draw each step's
  noise for the whole batch from a second, fresh generator seeded with the seed; SDE samplers use
  one Brownian tree over the whole batch, seeded with the seed. The U-Net also receives integer
  timesteps (see sampling.py).
- "diffusers" (a diffusers pipeline called with one `torch.Generator().manual_seed(seed)`): one
  generator for the whole run. When the latent still carries its autoencoder posterior (straight
  from VAEEncode), it first draws the posterior sample z = mean + std * eps for the batch, as
  `StableDiffusionImg2ImgPipeline` does (`latent_dist.sample(generator)`); then the batch's
  starting noise in one draw; then ancestral samplers' per-step noise for the batch, continuing
  the same generator (the pipeline hands it to `scheduler.step`). SDE samplers use one Brownian
  tree over the batch, as "comfyui". Timesteps stay fractional: pick the schedule that matches the
  diffusers scheduler (e.g. `linspace_rounded` for DPM-Solver++ and UniPC with "linspace").

Start-noise scaling (how the starting latent is made from noise at the first sigma s0):
"auto" = ComfyUI's and ours: sqrt(1 + s0^2) when s0 is the model's largest sigma (pure noise, the
variance of x_T / sqrt(alpha_bar_T)), else s0 (img2img); "sigma" = always s0 (diffusers' Euler,
Heun, LMS with "linspace"/"trailing" spacing, whose init_noise_sigma is sigma_max); "vp" = always
sqrt(1 + s0^2) (diffusers' DDIM, PNDM, DDPM, DPM-Solver and UniPC, whose init_noise_sigma is 1 in
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CONVENTIONS = ("ldmgraph", "comfyui", "diffusers")
START_NOISE = ("auto", "sigma", "vp")


def image_generators(
    seed: int, batch: int, batch_index: Sequence[int] | None = None
) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + batch_index[k] (default seed + k)."""
    offsets = list(batch_index) if batch_index is not None else list(range(batch))
    if len(offsets) != batch:
        raise ValueError(f"batch_index has {len(offsets)} entries but the latent batch is {batch}")
    return [torch.Generator(device="cpu").manual_seed((seed + k) % 2**64) for k in offsets]


def draw(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """Standard normal noise `[len(generators), *shape]` in float32 on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


class BatchNoiseSampler:
    """The per-step noise source of stochastic samplers: `(sigma, sigma_next) -> noise like x`."""

    def __init__(
        self, generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
    ) -> None:
        self.generators = list(generators)
        self.shape = tuple(shape)
        self.device = device

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return draw(self.generators, self.shape).to(self.device)


class BrownianTreeNoiseSampler:
    """Noise for SDE samplers from Brownian motion W(sigma) (Li et al. 2020, torchsde's
    BrownianTree; k-diffusion's BrownianTreeNoiseSampler): a step from sigma to sigma_next gets
    (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), which is standard normal and, unlike
    independent draws, consistent when a step is split. One tree per seed; each tree covers the
    shape given with it, over [sigma_min, sigma_max]."""

    def __init__(
        self, seeds: Sequence[int], shape: Sequence[int], sigma_min: float, sigma_max: float, device: torch.device
    ) -> None:
        import torchsde

        self.low, self.high = sorted((float(sigma_min), float(sigma_max)))
        w0 = torch.zeros(tuple(shape), dtype=torch.float32)
        self.trees = [
            torchsde.BrownianTree(self.low, w0, self.high, entropy=int(seed)) for seed in seeds
        ]
        self.device = device

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        a, b = float(sigma), float(sigma_next)
        t0, t1, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():  # float32 sigmas vs the tree's float ends: same values as k-diffusion
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            parts = torch.cat([tree(t0, t1) for tree in self.trees])
        return (parts * (sign / math.sqrt(abs(t1 - t0)))).to(self.device)


@dataclass(frozen=True)
class Noise:
    """A NOISE value: where a run's randomness comes from, and by which convention.

    `enabled` False means no starting noise (ComfyUI's DisableNoise, KSamplerAdvanced's add_noise
    off); ancestral samplers still draw their per-step noise from the seed.
    """

    seed: int
    enabled: bool = True
    convention: str = "ldmgraph"
    start_noise: str = "auto"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"noise convention {self.convention!r} is not one of {', '.join(CONVENTIONS)}")
        if self.start_noise not in START_NOISE:
            raise ValueError(f"start_noise {self.start_noise!r} is not one of {', '.join(START_NOISE)}")

    def start(
        self, shape: Sequence[int], batch_index: Sequence[int] | None, posterior_std: Tensor | None = None
    ) -> tuple[Tensor, list[torch.Generator], Tensor | None]:
        """The starting noise `[B, ...]` on the CPU (zeros when disabled), the generators the
        per-step noise continues from (ldmgraph and diffusers conventions; fresh ones for comfyui),
        and, under "diffusers" with a posterior, the posterior draw std * eps to add to its mean
        (drawn first; None otherwise)."""
        batch, rest = int(shape[0]), tuple(shape[1:])
        if self.convention == "diffusers":
            generator = torch.Generator(device="cpu").manual_seed(self.seed % 2**64)
            offset = None
            if posterior_std is not None:
                eps = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
                offset = posterior_std.to(torch.float32) * eps
            if not self.enabled:
                return torch.zeros(tuple(shape)), [generator], offset
            return _batch_draw(generator, tuple(shape), batch_index), [generator], offset
        if self.convention == "comfyui":
            generators = [torch.Generator(device="cpu").manual_seed(self.seed % 2**64)]
            if not self.enabled:
                return torch.zeros(tuple(shape)), generators, None
            return comfyui_batch_noise(self.seed, tuple(shape), batch_index), generators, None
        generators = image_generators(self.seed, batch, batch_index)
        if not self.enabled:
            return torch.zeros(tuple(shape)), generators, None
        return draw(generators, rest), generators, None

    def step_sampler(
        self,
        generators: list[torch.Generator],
        shape: Sequence[int],
        device: torch.device,
        sigmas: Tensor,
        brownian: bool,
        batch_index: Sequence[int] | None,
    ) -> Callable[[float, float], Tensor]:
        """The per-step noise source for a sampler over `sigmas` (Brownian tree when asked)."""
        batch, rest = int(shape[0]), tuple(shape[1:])
        if brownian:
            positive = sigmas[sigmas > 0]
            low = float(positive.min()) if positive.numel() else 0.0
            high = float(sigmas.max())
            if self.convention in ("comfyui", "diffusers"):
                return BrownianTreeNoiseSampler([self.seed], tuple(shape), low, high, device)
            offsets = list(batch_index) if batch_index is not None else list(range(batch))
            return BrownianTreeNoiseSampler([self.seed + k for k in offsets], (1, *rest), low, high, device)
        if self.convention in ("comfyui", "diffusers"):  # a fresh generator, or the run's own
            generator = generators[0]
            return lambda sigma, sigma_next: torch.randn(
                tuple(shape), generator=generator, dtype=torch.float32
            ).to(device)
        return BatchNoiseSampler(generators, rest, device)


def comfyui_batch_noise(seed: int, shape: tuple[int, ...], batch_index: Sequence[int] | None) -> Tensor:
    """ComfyUI's starting noise: one generator seeded with the seed draws the batch at once; with
    batch_index, one image-sized draw per index 0..max in order, keeping the ones named."""
    return _batch_draw(torch.Generator(device="cpu").manual_seed(seed % 2**64), shape, batch_index)


def _batch_draw(generator: torch.Generator, shape: tuple[int, ...], batch_index: Sequence[int] | None) -> Tensor:
    """A batch's noise from one generator: one draw, or per index 0..max(batch_index) in order."""
    if batch_index is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    wanted = sorted(set(int(i) for i in batch_index))
    drawn: dict[int, Tensor] = {}
    for index in range(wanted[-1] + 1):
        noise = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        if index in wanted:
            drawn[index] = noise
    return torch.cat([drawn[int(i)] for i in batch_index])


def start_scale(mode: str, sigma0: float, sigma_max: float) -> float:
    """The factor on the starting noise at the first sigma (see the module docstring)."""
    pure = math.sqrt(1 + sigma0**2)
    if mode == "vp":
        return pure
    if mode == "sigma":
        return sigma0
    return pure if sigma0 >= sigma_max * (1 - 1e-5) else sigma0
