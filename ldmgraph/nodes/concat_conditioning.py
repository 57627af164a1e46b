"""Concat conditioning: spatially aligned inputs stacked onto the latent as extra U-Net channels.

Rombach et al. 2022, Sec. 3.3 and 4.4-4.5: for super-resolution the low-resolution image is
concatenated to z_t; for inpainting the mask and the latent of the masked image are. Two channel
orders exist in released models and both are offered:

* `sd`: [mask, masked-image latent], Stable Diffusion inpainting (4 + 1 + 4 = 9 input channels);
* `ldm`: [masked-image latent, mask], the paper's inpainting model (3 + 3 + 1 = 7 with its VQ-f4).

The masked image is the image with the repaint region set to grey (0 in the -1..1 range), as both
original implementations do; the mask reaches the latent grid by max-pooling (a latent pixel that
touches the hole is repainted), as the bundled inpainting model was trained.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.conditioners import Conditioner, Contribution
from ldmgraph.graph import NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import BOOLEAN, ENUM, IMAGE, INT, LATENT, MASK, VAE
from ldmgraph.nodes.common import check_mask_size, image_to_torch, mask_to_torch
from ldmgraph.nodes.latent import encode_estimate, encode_pixels
from ldmgraph.plugins import hookimpl


class SuperResolutionConditioning(Conditioner):
    """Condition a super-resolution model on a low-resolution image (the paper's LDM-SR).

    The image, resized to the latent grid of the `scale_by` times larger output and mapped to
    -1..1, becomes the concat input of every entry (the bundled model: a 16x16 image, 4x4 box
    downsampled from 64x64, for a 64x64 output with an f = 4 autoencoder). The output latent is
    the latent of the bicubic upsampling (`start="bicubic"`): SD's schedule keeps ~7% of the signal
    at t = T, so a model trained on it expects each image's brightness there (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"); sample it at denoise 1.
    `start="empty"` gives a zero latent instead. Without `positive`/`negative` (models with no text, like the bundled one) each side
    gets one entry with a placeholder context. Sample with cfg 1 for text-free models.
    """

    type_name = "SuperResolutionConditioning"
    route = "concat"
    sides = "both"
    sides_optional = True  # models with no text (the bundled one) need no positive / negative

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="the low-resolution image")
        vae: Any = InputField(VAE, description="the autoencoder of the super-resolution model")
        scale_by: int = InputField(INT, 4, ge=1, le=16, description="output size / input size")
        start: str = InputField(
            ENUM,
            "bicubic",
            choices=["bicubic", "empty"],
            description="latent to start from: bicubic upsampling or zeros",
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="empty latent of the output size")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        vae = inputs.vae
        batch, height, width = inputs.image.shape[:3]
        h, w = height * inputs.scale_by // vae.downscale, width * inputs.scale_by // vae.downscale
        if h < 1 or w < 1:
            raise ValueError(f"SuperResolutionConditioning: a {width}x{height} image is too small to upscale")
        lowres = image_to_torch(inputs.image).permute(0, 3, 1, 2)
        if lowres.shape[-2:] != (h, w):
            lowres = F.interpolate(lowres, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        concat = lowres * 2.0 - 1.0
        if inputs.start == "bicubic":
            size = (height * inputs.scale_by, width * inputs.scale_by)
            up = F.interpolate(image_to_torch(inputs.image).permute(0, 3, 1, 2), size=size, mode="bicubic")
            samples = encode_pixels(vae, up.clamp(0, 1).permute(0, 2, 3, 1))
        else:
            samples = torch.zeros(batch, vae.latent_channels, h, w)
        return Contribution(concat, outputs={"latent": Latent(samples=samples)})

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        from ldmgraph.models.memory import vae_encode_bytes

        image, vae, k = inputs.get("image"), inputs.get("vae"), inputs["scale_by"]
        if not isinstance(image, Shape) or getattr(vae, "vae", None) is None:
            return None
        f, height, width = vae.downscale, image.height * k, image.width * k
        latent = Shape(image.batch, int(vae.vae["embed_dim"]), height // f, width // f)
        concat = Shape(image.batch, 3, height // f, width // f)
        works = vae_encode_bytes(vae.vae, image.batch, height, width) if inputs["start"] == "bicubic" else 0
        return Estimate(keeps=latent.nbytes + 2 * concat.nbytes, works=works, outputs={"latent": latent})


class InpaintConditioning(Conditioner):
    """Condition an inpainting model: mask + masked-image latent concatenated to the latent.

    Outputs the conditioning for both sides and the image's latent, with the mask as its noise
    mask (so the sampler keeps the known region) unless `noise_mask` is off.
    """

    type_name = "InpaintConditioning"
    route = "concat"
    sides = "both"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the inpainting model's autoencoder")
        image: Any = InputField(IMAGE, description="the image to repaint")
        mask: Any = InputField(MASK, description="1 where to repaint; the image's size")
        layout: str = InputField(
            ENUM,
            "sd",
            choices=["sd", "ldm"],
            description="channel order: 'sd' [mask, masked latent] (9 ch), 'ldm' [masked latent, mask] (7 ch)",
        )
        noise_mask: bool = InputField(
            BOOLEAN, True, description="also set the mask as the latent's noise mask"
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the image's latent (with its noise mask)")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        check_mask_size(inputs.mask, inputs.image, "InpaintConditioning")
        batch = inputs.image.shape[0]
        mask = mask_to_torch(inputs.mask, batch).round()
        pixels = image_to_torch(inputs.image)
        keep = (1.0 - mask).permute(0, 2, 3, 1)
        masked_pixels = pixels * keep + 0.5 * (1.0 - keep)
        masked_latent = encode_pixels(inputs.vae, masked_pixels)
        latent = encode_pixels(inputs.vae, pixels)
        small = F.adaptive_max_pool2d(
            mask, masked_latent.shape[-2:]
        )  # a latent pixel touching the hole repaints
        parts = [small, masked_latent] if inputs.layout == "sd" else [masked_latent, small]
        concat = torch.cat(parts, dim=1)
        noise_mask = (
            F.interpolate(mask, size=latent.shape[-2:], mode="bilinear") if inputs.noise_mask else None
        )
        return Contribution(concat, outputs={"latent": Latent(samples=latent, noise_mask=noise_mask)})

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        found = encode_estimate(inputs.get("vae"), inputs.get("image"))
        if found is None:
            return None
        image = inputs["image"]
        return Estimate(keeps=3 * found.keeps + image.nbytes, works=found.works, outputs=found.outputs,
                        what=found.what)


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """The concat-route conditioners: super-resolution and inpainting."""
    return [SuperResolutionConditioning, InpaintConditioning]
