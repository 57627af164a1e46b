"""Handles to loaded models: what MODEL, VAE and TEXT_ENCODER sockets carry and samplers call
(the wrap step of loading: read -> normalise -> detect -> build -> wrap).

A handle owns one torch module plus the facts needed to use it (prediction type, noise schedule,
scale factor, concat kind), so nodes never need the checkpoint again. Handles are shared by every
node and workflow that loads the same file (see `cache.py`): never mutate one; `.to(device)`
moves it in place and returns it, for the executor's device placement only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldmgraph.models import vae_tiling as tiling
from ldmgraph.models.attention import reuse_context_projections
from ldmgraph.models.cache import module_nbytes
from ldmgraph.models.manager import managed, placed
from ldmgraph.models.patches import patch_output, patch_scope
from ldmgraph.models.text_encoders import TextEncoder, TextEncoding

TextEncoderHandle = TextEncoder
"""The TEXT_ENCODER socket value: `encode(texts, clip_skip=None) -> TextEncoding(context, pooled)`."""

__all__ = [
    "Checkpoint", "DiffusionModelHandle", "TextEncoderHandle", "TextEncoding", "VAEHandle", "module_nbytes",
    "wrap_first_stage", "wrap_unet",
]


class DiffusionModelHandle(nn.Module):
    """The MODEL socket value: a U-Net as the samplers' `DiffusionModel` protocol sees it.

    `apply_model(x, t, context, concat, y)` stacks `concat` onto `x` along channels (the LDM
    paper's concat conditioning, Rombach et al. 2022 Sec. 3.3; SD inpainting's mask + masked-image
    latent) and returns the U-Net's eps or v prediction in x's dtype. The U-Net runs in its own
    dtype (fp16 weights stay fp16). `noise_schedule` is built from the training config
    (`ldmgraph.diffusion.NoiseSchedule.from_config`).
    """

    def __init__(
        self,
        diffusion_model: nn.Module,
        *,
        prediction_type: str = "eps",
        schedule: dict[str, Any] | None = None,
        concat_kind: str | None = None,
        info: Any = None,
    ) -> None:
        super().__init__()
        from ldmgraph.diffusion.noise_schedule import NoiseSchedule

        self.diffusion_model: Any = diffusion_model
        self.prediction_type = prediction_type
        self.schedule = dict(schedule or {})
        self.noise_schedule = NoiseSchedule.from_config(**self.schedule)
        self.concat_kind = concat_kind
        self.info = info
        unet: Any = diffusion_model
        self.in_channels = int(unet.in_channels)
        self.latent_channels = int(unet.out_channels)
        self.context_dim = getattr(diffusion_model, "context_dim", None)

    @property
    def concat_channels(self) -> int:
        """Channels that `concat` must bring (in_channels - latent_channels)."""
        return self.in_channels - self.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the output layer's (the time embedding may be kept in float32)."""
        out = getattr(self.diffusion_model, "out", None)
        params = (out if isinstance(out, nn.Module) else self.diffusion_model).parameters()
        return next(params).dtype

    @managed
    def apply_model(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
        control: Any = (),
    ) -> Tensor:
        """eps or v for x_t at timesteps t ([B], float allowed); see `ldmgraph.diffusion.DiffusionModel`.

        `control` (the control route) holds residual sources (`ldmgraph.diffusion.values.Control`);
        their residuals are summed (stacked ControlNets) and added to the U-Net's skips. A handle
        made by a patch node (`ldmgraph.models.patches.patched`) runs with its patches applied;
        any other handle on the same U-Net finds it restored.
        """
        with patch_scope(self):
            return self._apply_model(x, t, context, concat, y, control)

    def _apply_model(
        self, x: Tensor, t: Tensor, context: Tensor | None, concat: Tensor | None, y: Tensor | None, control: Any
    ) -> Tensor:
        model_in = x if concat is None else torch.cat([x, concat.to(x)], dim=1)
        if model_in.shape[1] != self.in_channels:
            raise ValueError(
                f"the model takes {self.in_channels} input channels (latent {self.latent_channels} + concat "
                f"{self.concat_channels}) but got {model_in.shape[1]}: "
                + (
                    "this model needs concat conditioning (e.g. an inpainting mask and image)"
                    if concat is None
                    else "the concat conditioning has the wrong channel count"
                )
            )
        dtype, device = self.dtype, self.device
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        model_in = model_in.to(device=device, dtype=dtype)
        context = None if context is None else context.to(device=device, dtype=dtype)
        # `y` (the vector route: a class label or SDXL-style vector) only reaches class-conditional U-Nets
        y = None if y is None or not self._takes_y else (y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device))
        extra = {} if not control else {"control": self._residuals(control, model_in, t.to(device), context, y)}
        out = self.diffusion_model(model_in, t.to(device), context=context, y=y, **extra)
        out = patch_output(self, out, model_in[:, : self.latent_channels], t)
        return out.to(device=x.device, dtype=x.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.apply_model(*args, **kwargs)

    def sampling_scope(self) -> Any:
        """Entered by a sampling run around all its steps: cross-attention projects each context
        to K and V once per run instead of once per step (`attention.reuse_context_projections`)."""
        return reuse_context_projections()

    def _residuals(self, control: Any, x: Tensor, t: Tensor, context: Tensor | None, y: Tensor | None) -> list[Tensor]:
        """The sum of every control source's residuals (each checked against this U-Net first)."""
        total: list[Tensor] | None = None
        for source in control:
            if hasattr(source, "check_model"):
                source.check_model(self.diffusion_model)
            with placed(getattr(source, "handle", source)):  # a ControlNet's weights, where --gpu-memory puts them
                parts = source.residuals(x, t, context, y)
            total = list(parts) if total is None else [a + b.to(a) for a, b in zip(total, parts, strict=True)]
        assert total is not None
        return total

    @property
    def _takes_y(self) -> bool:
        return getattr(self.diffusion_model, "num_classes", None) is not None


def _pixels_to_tensor(pixels: Any) -> Tensor:
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4:
        raise ValueError(f"VAE encode expects an image [B, H, W, C], got shape {tuple(pixels.shape)}")
    return pixels


class VAEHandle(nn.Module):
    """The VAE socket value: pixels [B, H, W, C] 0..1 <-> latents [B, C, H/f, W/f] scaled by `scale_factor`.

    `encode` takes the posterior mean (deterministic, as ComfyUI's VAEEncode) unless a generator
    is given, then samples z = mean + std * eps; the latent is multiplied by `scale_factor` (LDM
    paper Sec. 4.3.2 / App. G: unit-variance latents). Sides that are not multiples of `downscale`
    are centre-cropped to the nearest multiple. `decode` divides by `scale_factor`, decodes, and
    maps -1..1 to 0..1 (clamped), one image at a time to bound memory.
    """

    def __init__(self, first_stage_model: nn.Module, *, scale_factor: float, info: Any = None) -> None:
        super().__init__()
        self.first_stage_model: Any = first_stage_model
        self.scale_factor = float(scale_factor)
        self.info = info
        ddconfig = getattr(first_stage_model, "ddconfig", {})
        self.downscale = int(2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 4))) - 1))
        self.latent_channels = int(getattr(first_stage_model, "embed_dim", 4))
        self.image_channels = int(ddconfig.get("in_channels", 3))

    @property
    def device(self) -> torch.device:
        return next(self.first_stage_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    @managed
    @torch.no_grad()
    def encode(
        self,
        pixels: Any,
        generator: torch.Generator | None = None,
        *,
        tiled: str = "auto",
        tile_pixels: int | None = None,
        overlap_pixels: int | None = None,
        with_std: bool = False,
    ) -> Any:
        """Image [B, H, W, C] (torch or numpy, 0..1) -> scaled latent [B, latent_channels, H/f, W/f] (fp32, CPU).

        With `with_std`, (latent, the posterior's std scaled alike, or None for a VQ model).

        `tiled` "auto" encodes images over `ldmgraph.models.vae_tiling.AUTO_TILE_PIXELS` pixels in
        overlapping tiles (bounded memory), "on" always, "off" never.
        """
        image = _pixels_to_tensor(pixels)
        f = self.downscale
        h, w = image.shape[1] // f * f, image.shape[2] // f * f
        if h == 0 or w == 0:
            raise ValueError(f"image {tuple(image.shape[1:3])} is smaller than the VAE's factor {f}")
        top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
        image = image[:, top : top + h, left : left + w, : self.image_channels]
        x = image.permute(0, 3, 1, 2).to(device=self.device, dtype=self.dtype) * 2.0 - 1.0
        model = self.first_stage_model
        tile_pixels, overlap_pixels = tiling.tile_and_overlap(tile_pixels, overlap_pixels)
        if tiling.should_tile(tiled, h * w) and hasattr(model, "posterior"):
            # the down levels run in tiles; the mid block (global attention) sees the whole latent
            tile = max(tile_pixels // f, 1) * f
            encoder = model.encoder
            features = tiling.run_tiled(encoder.body, encoder, x, scale=1.0 / f, tile=tile, overlap=overlap_pixels, align=f)
            posterior = model.posterior(model.quant_conv(encoder.head(features)))
        else:
            posterior = model.encode(x)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        z = (z * self.scale_factor).to(device="cpu", dtype=torch.float32)
        if with_std:  # for samplers that draw z themselves (diffusers' img2img convention)
            std = getattr(posterior, "std", None)
            return z, None if std is None else (std * self.scale_factor).to(device="cpu", dtype=torch.float32)
        return z

    @managed
    @torch.no_grad()
    def decode(
        self,
        latent: Tensor,
        *,
        tiled: str = "auto",
        tile_pixels: int | None = None,
        overlap_pixels: int | None = None,
    ) -> Tensor:
        """Scaled latent [B, C, h, w] -> image [B, h*f, w*f, 3] fp32 CPU tensor in 0..1.

        `tiled` "auto" decodes outputs over `ldmgraph.models.vae_tiling.AUTO_TILE_PIXELS` pixels in
        overlapping tiles (bounded memory; see `ldmgraph.models.vae_tiling`), "on" always, "off" never.
        """
        f = self.downscale
        tile_pixels, overlap_pixels = tiling.tile_and_overlap(tile_pixels, overlap_pixels)
        use_tiles = tiling.should_tile(tiled, latent.shape[-2] * latent.shape[-1] * f * f)
        model = self.first_stage_model
        images = []
        for z in latent.split(1):
            z = z.to(device=self.device, dtype=self.dtype) / self.scale_factor
            if use_tiles and hasattr(model, "post_quant_conv"):
                # the mid block (global attention) sees the whole latent; the up levels run in tiles
                tile, overlap = max(tile_pixels // f, 1), max(overlap_pixels // f, 1)
                decoder = model.decoder
                features = decoder.head(model.post_quant_conv(z))
                x = tiling.run_tiled(decoder.tail, decoder, features, scale=float(f), tile=tile, overlap=overlap)
            else:
                x = model.decode(z)
            images.append(((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu())
        return torch.cat(images)


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the three handles (any may be None) and the detection result."""

    unet: DiffusionModelHandle | None
    vae: VAEHandle | None
    text_encoder: TextEncoder | None
    info: Any

    def parts(self) -> list[nn.Module]:
        """The handles that are there (what the model cache measures)."""
        return [p for p in (self.unet, self.vae, self.text_encoder) if p is not None]

    def to(self, device: str | torch.device) -> Checkpoint:
        for part in self.parts():
            part.to(device)
        return self


# --- wrapping built modules (the last step of loading) --------------------------------------------


def wrap_unet(module: nn.Module, info: Any) -> DiffusionModelHandle:
    """The MODEL handle of a built U-Net, with the detected prediction type, schedule and concat kind."""
    return DiffusionModelHandle(
        module,
        prediction_type=info.prediction_type,
        schedule=info.schedule,
        concat_kind=info.concat_kind,
        info=info,
    )


def wrap_first_stage(module: nn.Module, info: Any) -> VAEHandle:
    """The VAE handle of a built autoencoder, with the detected scale factor."""
    return VAEHandle(module, scale_factor=info.scale_factor, info=info)
