"""The values that flow on LATENT and CONDITIONING edges, and the model protocol the samplers drive.

Torch is only named in annotations here, so the graph layer and node listings can import these
types without importing torch (see docs/INTERFACES.md, "Torch stays lazy").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from ldmgraph.diffusion.noise_schedule import NoiseSchedule


@dataclass(frozen=True, eq=False)
class Latent:
    """A LATENT value: latents plus an optional inpainting mask.

    `samples` is `[B, C, h, w]`. `noise_mask` (`[B, 1, h, w]` or broadcastable, 1 = repaint) makes
    the sampler keep the known latent outside the mask. `batch_index` names the seed offset of each
    image (image k is drawn with seed + batch_index[k]); None means 0..B-1.
    """

    samples: Tensor
    noise_mask: Tensor | None = None
    batch_index: list[int] | None = None


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One conditioning entry of a CONDITIONING list.

    `context` is the cross-attention context `[B, T, D]` (B may be 1 and is then broadcast).
    `pooled` is an optional pooled text embedding (passed to the model as `y`). `concat` is a
    spatially aligned tensor `[B, C, h, w]` stacked onto the latent as extra input channels
    (Rombach et al. 2022, Sec. 3.3: low-resolution image, or mask + masked-image latent).
    `strength` weighs this entry against the others; `area` = (h, w, y, x) in latent pixels
    restricts it to a rectangle; `mask` (`[h, w]` or `[B, 1, h, w]`, 0..1) restricts it softly.
    """

    context: Tensor
    pooled: Tensor | None = None
    concat: Tensor | None = None
    strength: float = 1.0
    area: tuple[int, int, int, int] | None = None
    mask: Tensor | None = None


@runtime_checkable
class DiffusionModel(Protocol):
    """A noise-prediction network as the samplers see it.

    `apply_model(x, t, ...)` takes the model input x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
    (the DDPM scaling, Ho et al. 2020, eq. 4) and a continuous timestep `t` `[B]` (float, in
    0..timesteps-1), and returns eps (`prediction_type == "eps"`) or v (`"v"`, Salimans & Ho 2022).
    `concat` (`[B, C, h, w]`) must be stacked onto `x` along channels before the network; `context`
    feeds cross-attention; `y` is a pooled / class vector for models that take one.
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
    ) -> Tensor: ...


SamplerCallback = Any  # Callable[[dict], None]; the dict is {"i", "sigma", "x", "denoised", ...}
