"""The values that flow on LATENT and CONDITIONING edges, and the model protocol the samplers drive.

Torch is only named in annotations here, so the graph layer and node listings can import these
types without importing torch (see docs/INTERFACES.md, "Torch stays lazy").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ldmgraph.conditioners import CondEntry

__all__ = ["CondEntry", "Control", "DiffusionModel", "Latent", "SamplerCallback"]

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from ldmgraph.diffusion.noise_schedule import NoiseSchedule


@dataclass(frozen=True, eq=False)
class Latent:
    """A LATENT value: latents plus an optional inpainting mask.

    `samples` is `[B, C, h, w]`. `noise_mask` (`[B, 1, h, w]` or broadcastable, 1 = repaint) makes
    the sampler keep the known latent outside the mask. `batch_index` names the seed offset of each
    image (image k is drawn with seed + batch_index[k]); None means 0..B-1. `posterior_std` is the
    autoencoder posterior's standard deviation (scaled like `samples`) while `samples` is that
    posterior's mean as `VAEEncode` made it: the "diffusers" noise convention samples
    z = mean + std * eps from the run's generator before the starting noise, as diffusers'
    img2img pipeline does; every other convention uses the mean. Nodes that change `samples`
    drop it.
    """

    samples: Tensor
    noise_mask: Tensor | None = None
    batch_index: list[int] | None = None
    posterior_std: Tensor | None = None


class Control(Protocol):
    """A `control` route contribution (ControlNet, adapters): residuals for the U-Net's skips.

    `residuals(x, t, context, y)` gets the U-Net's input (latent channels first) and timesteps `[B]`
    and returns one tensor per input block and one for the middle block (already weighted by
    `strength`); it applies while sigma lies in the part of the schedule from `start_percent` to
    `end_percent` (see `ldmgraph.diffusion.denoiser.Denoiser`).
    """

    strength: float
    start_percent: float
    end_percent: float

    def residuals(self, x: Tensor, t: Tensor, context: Tensor | None, y: Tensor | None) -> list[Tensor]: ...


@runtime_checkable
class DiffusionModel(Protocol):
    """A noise-prediction network as the samplers see it.

    `apply_model(x, t, ...)` takes the model input x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
    (the DDPM scaling, Ho et al. 2020, eq. 4) and a continuous timestep `t` `[B]` (float, in
    0..timesteps-1), and returns eps (`prediction_type == "eps"`) or v (`"v"`, Salimans & Ho 2022).
    `concat` (`[B, C, h, w]`) must be stacked onto `x` along channels before the network; `context`
    feeds cross-attention; `y` is a pooled / class vector for models that take one; `control`
    (given only when a `Control` is active) holds the residual sources to add to the U-Net.
    """

    prediction_type: str
    noise_schedule: NoiseSchedule

    def apply_model(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
        control: Sequence[Control] = (),
    ) -> Tensor: ...


SamplerCallback = Any  # Callable[[dict], None]; the dict is {"i", "sigma", "x", "denoised", ...}
