"""Generate with bundled checkpoints through the library's own loader and samplers.

Evaluation and sample grids go through :func:`ldmgraph.models.checkpoint.load_checkpoint` and
:func:`ldmgraph.diffusion.sample`, the same path the workflow nodes take, so the figures are
those of the shipped files as users run them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_SCHEDULE = "karras"


def _contexts(ckpt: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    cond = ckpt.text_encoder.encode(list(captions)).context.float()
    uncond = ckpt.text_encoder.encode([""]).context.float().expand_as(cond)
    return cond, uncond


def _run(ckpt: Any, n: int, cond: torch.Tensor, uncond: torch.Tensor, concat: torch.Tensor | None,
         seed: int, steps: int, cfg: float, known: torch.Tensor | None = None,
         noise_mask: torch.Tensor | None = None) -> np.ndarray:
    from ldmgraph.diffusion import CondEntry, Latent, sample

    side = 16
    samples = known if known is not None else torch.zeros(n, 4, side, side)
    latent = Latent(samples=samples, noise_mask=noise_mask)
    out = sample(
        ckpt.unet, latent, [CondEntry(context=cond, concat=concat)], [CondEntry(context=uncond, concat=concat)],
        seed=seed, steps=steps, cfg=cfg, sampler=DEFAULT_SAMPLER, schedule=DEFAULT_SCHEDULE,
    )
    return ckpt.vae.decode(out.samples).numpy()


def txt2img(ckpt: Any, captions: list[str], seed: int = 0, steps: int = 20, cfg: float = 4.0) -> np.ndarray:
    """Images [N, 64, 64, 3] (0..1) for captions; image k uses seed + k."""
    cond, uncond = _contexts(ckpt, captions)
    return _run(ckpt, len(captions), cond, uncond, None, seed, steps, cfg)


def lowres_of(images: np.ndarray) -> torch.Tensor:
    """The super-resolution conditioning: 4x4 box average of images (0..1) -> [N, 3, 16, 16] in -1..1."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1
    return torch.nn.functional.avg_pool2d(x, 4)


def superres(ckpt: Any, lowres: torch.Tensor, seed: int = 0, steps: int = 20, start: str = "bicubic") -> np.ndarray:
    """64x64 images from 16x16 ones ([N, 3, 16, 16] in -1..1); no text, no guidance.

    ``start="bicubic"``: the sampler starts (at full noise, denoise 1) from the latent of the
    bicubic upsampling instead of a zero latent. SD's schedule keeps 6.8% of the signal at t = T,
    so the training inputs at t = T carry each image's brightness; starting from zero-mean noise
    asks the model for a brightness it never saw there (Lin et al. 2023). ``start="zero"``: plain.
    """
    n = lowres.shape[0]
    empty = torch.zeros(n, 1, 1)
    known = None
    if start == "bicubic":
        up = torch.nn.functional.interpolate((lowres + 1) / 2, scale_factor=4, mode="bicubic", align_corners=False)
        known = ckpt.vae.encode(up.clamp(0, 1).permute(0, 2, 3, 1))
    return _run(ckpt, n, empty, empty, lowres, seed, steps, 1.0, known=known)


def inpaint_concat(ckpt: Any, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
    """[mask, masked-image latent] at latent resolution: masks [N, 64, 64] (1 = repaint)."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    masked_pixels = torch.from_numpy(np.ascontiguousarray(images)).float() * (1 - m[:, 0, ..., None]) + 0.5 * m[
        :, 0, ..., None
    ]
    masked_latent = ckpt.vae.encode(masked_pixels)
    return torch.cat([torch.nn.functional.max_pool2d(m, 4), masked_latent], 1)


def inpaint(ckpt: Any, images: np.ndarray, masks: np.ndarray, captions: list[str], seed: int = 0,
            steps: int = 20, cfg: float = 4.0) -> np.ndarray:
    """Repaint the masked part of images (0..1) after captions; the decoded images, not composited."""
    cond, uncond = _contexts(ckpt, captions)
    concat = inpaint_concat(ckpt, images, masks)
    return _run(ckpt, len(captions), cond, uncond, concat, seed, steps, cfg)
