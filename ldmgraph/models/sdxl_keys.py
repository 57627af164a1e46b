"""SDXL's checkpoint facts as data: where its text encoders lie, its vector layout, its latent scale.

Torch-free, and importing no other loading step, so that every step that must know SDXL (the
diffusers-folder normaliser, detection) reads these tables here rather than from `sdxl`, which
builds torch modules and sits after them in the loading order.

The U-Net's `adm` vector is the pooled text embedding followed by `fourier_dim`-wide sinusoidal
features of a few numbers: base height, width, crop top, crop left, target height and width; the
refiner height, width, crop top, crop left and an aesthetic score (Podell et al. 2023, Sec. 2.2).
"""

from __future__ import annotations

from typing import Any

SDXL_SCALE_FACTOR = 0.13025
"""Latent scale of the SDXL autoencoder (its training latents' unit variance)."""
FOURIER_DIM = 256
"""Width of the sinusoidal features of each size / crop / score number."""
BASE_NUMBERS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
REFINER_NUMBERS = ("height", "width", "crop_h", "crop_w", "aesthetic_score")
AESTHETIC_POSITIVE, AESTHETIC_NEGATIVE = 6.0, 2.5
"""The refiner's aesthetic score when none is given: 6 for positive, 2.5 for negative conditioning."""

L_PREFIX = "conditioner.embedders.0.transformer."  # base: CLIP ViT-L, transformers' names (then text_model.)
G_PREFIX = "conditioner.embedders.1.model."  # base: OpenCLIP ViT-bigG, OpenCLIP's names
REFINER_G_PREFIX = "conditioner.embedders.0.model."  # refiner: bigG alone
HF_G_PREFIX = "conditioner.embedders.1.transformer."  # a diffusers text_encoder_2/ (transformers' names)


def numbers_for(family: str) -> tuple[str, ...]:
    """The numbers whose features follow the pooled embedding in this family's `adm` vector."""
    return REFINER_NUMBERS if family == "sdxl-refiner" else BASE_NUMBERS


def layout_spec(numbers: tuple[str, ...], pooled_dim: int, fourier_dim: int) -> dict[str, Any]:
    """The `vector_layout` entry of a `CheckpointInfo`'s metadata (what `sdxl.attach_layout` reads)."""
    return {"numbers": list(numbers), "pooled_dim": pooled_dim, "fourier_dim": fourier_dim}


def layout_from_adm(family: str, adm: int, pooled_dim: int | None = None) -> dict[str, Any]:
    """The vector layout (`layout_spec`) of an SDXL base / refiner U-Net whose adm takes `adm` numbers."""
    numbers = numbers_for(family)
    if pooled_dim is None:  # the released width: adm = pooled + 256 per number
        pooled_dim = adm - len(numbers) * FOURIER_DIM
    fourier, rest = divmod(adm - pooled_dim, len(numbers))
    if rest or fourier <= 0 or fourier % 2:
        raise ValueError(f"{family}: adm width {adm} is not pooled {pooled_dim} + {len(numbers)} even-width features")
    return layout_spec(numbers, pooled_dim, fourier)
