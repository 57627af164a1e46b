"""Latent nodes: empty latents, VAE encode/decode, inpainting masks, upscaling and batch handling.

The autoencoder maps an image x to z = E(x) * scale_factor and back, D(z / scale_factor)
(Rombach et al. 2022, Sec. 3.1); the VAE handle applies the scale factor. Pixel sizes become
latent sizes through the VAE's downscale factor f (4 for the bundled models, 8 for SD); nodes that
take a pixel size and no image accept an optional VAE for f and assume 8 without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, FLOAT, IMAGE, INT, LATENT, MASK, VAE
from ldmgraph.nodes.common import (
    check_mask_size,
    image_to_numpy,
    image_to_torch,
    latent_size,
    mask_to_torch,
)
from ldmgraph.nodes.conditioning import downscale_of
from ldmgraph.plugins import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]
CROP_MODES = ["disabled", "center"]
TILING_MODES = ["auto", "on", "off"]
TILED_HELP = "overlapping tiles in bounded memory: auto above 1024x1024 pixels, on, or off"


def encode_pixels(vae: Any, pixels: Any, tiled: str = "auto", with_std: bool = False) -> Any:
    """Encode an image (numpy or torch `[B, H, W, C]` 0..1) to a scaled latent `[B, C, h, w]`
    (the posterior mean); with `with_std`, (latent, the posterior's scaled std or None).

    Sizes that are not multiples of the VAE's factor are centre-cropped to the nearest multiple
    below (as ComfyUI does), so any input image can be encoded.
    """
    import inspect

    import torch

    if not isinstance(pixels, torch.Tensor):
        pixels = image_to_torch(pixels)
    f = int(vae.downscale)
    height, width = pixels.shape[1] // f * f, pixels.shape[2] // f * f
    if height == 0 or width == 0:
        raise ValueError(
            f"an image of {pixels.shape[2]}x{pixels.shape[1]} is smaller than the VAE's factor {f}"
        )
    top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
    pixels = pixels[:, top : top + height, left : left + width, :3]
    with torch.no_grad():
        if with_std:
            if "with_std" not in inspect.signature(vae.encode).parameters:  # a VAE-like object without one
                return encode_pixels(vae, pixels, tiled), None
            return vae.encode(pixels, tiled=tiled, with_std=True)
        if tiled == "auto":  # the default: any VAE-like object with encode(pixels) works
            return vae.encode(pixels)
        return vae.encode(pixels, tiled=tiled)


def resize_latent(samples: torch.Tensor, height: int, width: int, method: str, crop: str) -> torch.Tensor:
    """Resize `[B, C, h, w]` to `height` x `width`, optionally centre-cropping to the new aspect first."""
    import torch.nn.functional as F

    if crop == "center":
        old_h, old_w = samples.shape[-2:]
        old_aspect, new_aspect = old_w / old_h, width / height
        if old_aspect > new_aspect:
            keep = round(old_h * new_aspect)
            left = (old_w - keep) // 2
            samples = samples[..., :, left : left + keep]
        elif old_aspect < new_aspect:
            keep = round(old_w / new_aspect)
            top = (old_h - keep) // 2
            samples = samples[..., top : top + keep, :]
    align = {"bilinear": False, "bicubic": False}.get(method)
    return F.interpolate(samples, size=(height, width), mode=method, align_corners=align)


def vae_factor(vae: Any) -> tuple[int, int]:
    """(downscale factor, latent channels) from a VAE's summary at validation (SD's 8 and 4 without)."""
    if vae is None or getattr(vae, "vae", None) is None:
        return 8, 4
    return vae.downscale, int(vae.vae["embed_dim"])


def latent_estimate(latent: Shape, works: int = 0, what: str = "", **outputs: Any) -> Estimate:
    """A node that outputs a latent of ``latent``'s shape (and maybe other values)."""
    return Estimate(keeps=latent.nbytes, works=works, outputs={"latent": latent, **outputs}, what=what)


def tiled_size(mode: str, height: int, width: int) -> tuple[int, int]:
    """The pixel size that one piece of a (maybe tiled) VAE pass works on, for memory estimates."""
    from ldmgraph.models.tile_policy import DEFAULT_OVERLAP_PIXELS, DEFAULT_TILE_PIXELS, should_tile

    if not should_tile(mode, height * width):
        return height, width
    side = DEFAULT_TILE_PIXELS + DEFAULT_OVERLAP_PIXELS
    return min(height, side), min(width, side)


def encode_estimate(vae: Any, image: Any, tiled: str = "auto") -> Estimate | None:
    """Encoding an image of a known shape with a known autoencoder."""
    from ldmgraph.models.memory import vae_encode_bytes

    if not isinstance(image, Shape) or getattr(vae, "vae", None) is None:
        return None
    f, channels = vae_factor(vae)
    latent = Shape(image.batch, channels, image.height // f, image.width // f)
    th, tw = tiled_size(tiled, image.height, image.width)
    works = vae_encode_bytes(vae.vae, image.batch, th, tw)
    return latent_estimate(latent, works, f"encoding {image.batch} image(s) of {image.width}x{image.height}")


def _with(latent: Any, **changes: Any) -> Any:
    """A copy of a LATENT with some fields changed; new samples drop the posterior that described the old."""
    from dataclasses import replace

    if "samples" in changes and getattr(latent, "posterior_std", None) is not None:
        changes["posterior_std"] = None
    return replace(latent, **changes)


class EmptyLatent(Node):
    """A latent of zeros for text-to-image: width and height in pixels, multiples of 8."""

    type_name = "EmptyLatent"
    category = "latent"

    class Inputs(NodeInputs):
        width: int = InputField(INT, 64, ge=8, le=16384, multiple_of=8, description="image width in pixels")
        height: int = InputField(INT, 64, ge=8, le=16384, multiple_of=8, description="image height in pixels")
        batch_size: int = InputField(
            INT, 1, ge=1, le=64, description="images per batch (image k uses seed + k)"
        )
        vae: Any = InputField(VAE, None, description="optional: VAE for the downscale factor and channels")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="zeros [batch, channels, height/f, width/f]")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        from ldmgraph.diffusion import Latent

        f = downscale_of(inputs.vae)
        channels = 4 if inputs.vae is None else int(inputs.vae.latent_channels)
        w, h = latent_size(inputs.width, inputs.height, f, "EmptyLatent")
        return self.Outputs(latent=Latent(samples=torch.zeros(inputs.batch_size, channels, h, w)))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate:
        f, channels = vae_factor(inputs.get("vae"))
        return latent_estimate(Shape(inputs["batch_size"], channels, inputs["height"] // f, inputs["width"] // f))


class VAEEncode(Node):
    """Encode an image into a latent (img2img starts here)."""

    type_name = "VAEEncode"
    category = "latent"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the autoencoder")
        image: Any = InputField(IMAGE, description="image to encode")
        tiled: str = InputField(ENUM, "auto", choices=TILING_MODES, description=TILED_HELP)

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the image's latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion import Latent

        # the posterior's std travels along for the "diffusers" convention, which samples it
        samples, std = encode_pixels(inputs.vae, inputs.image, inputs.tiled, with_std=True)
        return self.Outputs(latent=Latent(samples=samples, posterior_std=std))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return encode_estimate(inputs.get("vae"), inputs.get("image"), inputs.get("tiled", "auto"))


class VAEDecode(Node):
    """Decode a latent into an image."""

    type_name = "VAEDecode"
    category = "latent"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the autoencoder")
        latent: Any = InputField(LATENT, description="latent to decode")
        tiled: str = InputField(ENUM, "auto", choices=TILING_MODES, description=TILED_HELP)

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="the decoded image, 0..1")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        with torch.no_grad():
            if inputs.tiled == "auto":  # the default: any VAE-like object with decode(latent) works
                pixels = inputs.vae.decode(inputs.latent.samples)
            else:
                pixels = inputs.vae.decode(inputs.latent.samples, tiled=inputs.tiled)
        return self.Outputs(image=image_to_numpy(pixels))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        from ldmgraph.models.memory import vae_decode_bytes

        vae, latent = inputs.get("vae"), inputs.get("latent")
        if not isinstance(latent, Shape) or getattr(vae, "vae", None) is None:
            return None
        f = vae.downscale
        image = Shape(latent.batch, 3, latent.height * f, latent.width * f)
        th, tw = tiled_size(inputs.get("tiled", "auto"), image.height, image.width)
        works = vae_decode_bytes(vae.vae, latent.batch, th, tw) + 2 * image.nbytes
        return Estimate(keeps=image.nbytes, works=works, outputs={"image": image},
                        what=f"decoding {latent.batch} image(s) of {image.width}x{image.height}")


class VAEEncodeForInpaint(Node):
    """Encode an image for inpainting with a normal model: the hole is greyed out and becomes the noise mask.

    As ComfyUI does: only the original hole (the mask rounded) is greyed; the noise mask is that
    hole grown by a `grow_mask_by` x `grow_mask_by` max filter (padding ceil((k - 1) / 2), cropped
    to the image), so the repaint blends into its surroundings; the sampler then repaints only
    inside it (use denoise 1).
    """

    type_name = "VAEEncodeForInpaint"
    category = "latent"
    version = "1.1.0"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the autoencoder")
        image: Any = InputField(IMAGE, description="image to repaint")
        mask: Any = InputField(MASK, description="1 where to repaint; the image's size")
        grow_mask_by: int = InputField(
            INT, 6, ge=0, le=64, description="grow the noise mask with a k x k max filter (k pixels wide)"
        )

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="latent of the greyed image, with the noise mask")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        check_mask_size(inputs.mask, inputs.image, "VAEEncodeForInpaint")
        hole = mask_to_torch(inputs.mask, inputs.image.shape[0]).round()
        grown = hole
        if inputs.grow_mask_by:
            k = inputs.grow_mask_by
            grown = F.max_pool2d(hole, kernel_size=k, stride=1, padding=(k - 1 + 1) // 2)
            grown = grown[..., : hole.shape[-2], : hole.shape[-1]]
        keep = (1.0 - hole).permute(0, 2, 3, 1)
        pixels = image_to_torch(inputs.image) * keep + 0.5 * (1.0 - keep)
        samples = encode_pixels(inputs.vae, pixels)
        noise_mask = F.interpolate(grown, size=samples.shape[-2:], mode="bilinear")
        return self.Outputs(latent=Latent(samples=samples, noise_mask=noise_mask))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return encode_estimate(inputs.get("vae"), inputs.get("image"))


class SetLatentNoiseMask(Node):
    """Attach a mask to a latent: the sampler repaints only where the mask is 1."""

    type_name = "SetLatentNoiseMask"
    category = "latent"

    class Inputs(NodeInputs):
        latent: Any = InputField(LATENT, description="latent to mask")
        mask: Any = InputField(MASK, description="1 where to repaint (any size; resized to the latent)")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the latent with its noise mask")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch.nn.functional as F

        samples = inputs.latent.samples
        mask = mask_to_torch(inputs.mask)
        mask = F.interpolate(mask, size=samples.shape[-2:], mode="bilinear")
        return self.Outputs(latent=_with(inputs.latent, noise_mask=mask))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        latent = inputs.get("latent")
        return latent_estimate(latent) if isinstance(latent, Shape) else None


class LatentUpscale(Node):
    """Resize a latent to a pixel size (hires fix: upscale, then sample again at denoise < 1).

    A width or height of 0 keeps the aspect ratio from the other one.
    """

    type_name = "LatentUpscale"
    category = "latent"

    class Inputs(NodeInputs):
        latent: Any = InputField(LATENT, description="latent to resize")
        method: str = InputField(ENUM, "nearest-exact", choices=UPSCALE_METHODS, description="interpolation")
        width: int = InputField(INT, 128, ge=0, le=16384, multiple_of=8, description="target width in pixels")
        height: int = InputField(
            INT, 128, ge=0, le=16384, multiple_of=8, description="target height in pixels"
        )
        crop: str = InputField(
            ENUM, "disabled", choices=CROP_MODES, description="centre-crop to the new aspect"
        )
        vae: Any = InputField(VAE, None, description="optional: VAE for the downscale factor (else 8)")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the resized latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        f = downscale_of(inputs.vae)
        samples = inputs.latent.samples
        width, height = inputs.width, inputs.height
        if width == 0 and height == 0:
            raise ValueError("LatentUpscale: width and height are both 0; give at least one of them")
        if width == 0:
            width = round(samples.shape[-1] * f * height / (samples.shape[-2] * f) / 8) * 8
        if height == 0:
            height = round(samples.shape[-2] * f * width / (samples.shape[-1] * f) / 8) * 8
        w, h = latent_size(max(width, f), max(height, f), f, "LatentUpscale")
        return self.Outputs(latent=_resized(inputs.latent, h, w, inputs.method, inputs.crop))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        latent = inputs.get("latent")
        if not isinstance(latent, Shape):
            return None
        f, _ = vae_factor(inputs.get("vae"))
        width, height = inputs["width"], inputs["height"]
        w = width // f if width else round(latent.width * height / max(1, latent.height * f))
        h = height // f if height else round(latent.height * width / max(1, latent.width * f))
        return latent_estimate(Shape(latent.batch, latent.channels, max(1, h), max(1, w)))


class LatentUpscaleBy(Node):
    """Resize a latent by a factor (e.g. 2 for a hires-fix pass at twice the size)."""

    type_name = "LatentUpscaleBy"
    category = "latent"

    class Inputs(NodeInputs):
        latent: Any = InputField(LATENT, description="latent to resize")
        method: str = InputField(ENUM, "nearest-exact", choices=UPSCALE_METHODS, description="interpolation")
        scale_by: float = InputField(FLOAT, 1.5, ge=0.01, le=8.0, description="size factor")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the resized latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        samples = inputs.latent.samples
        h = max(1, round(samples.shape[-2] * inputs.scale_by))
        w = max(1, round(samples.shape[-1] * inputs.scale_by))
        return self.Outputs(latent=_resized(inputs.latent, h, w, inputs.method, "disabled"))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        latent, k = inputs.get("latent"), inputs["scale_by"]
        if not isinstance(latent, Shape):
            return None
        h, w = max(1, round(latent.height * k)), max(1, round(latent.width * k))
        return latent_estimate(Shape(latent.batch, latent.channels, h, w))


def _resized(latent: Any, h: int, w: int, method: str, crop: str) -> Any:
    samples = resize_latent(latent.samples, h, w, method, crop)
    mask = latent.noise_mask
    if mask is not None:
        mask = resize_latent(mask.reshape(-1, 1, *mask.shape[-2:]).float(), h, w, "bilinear", crop)
    return _with(latent, samples=samples, noise_mask=mask)


class LatentFromBatch(Node):
    """Pick images `batch_index` .. `batch_index + length - 1` of a batch; each keeps its seed offset."""

    type_name = "LatentFromBatch"
    category = "latent"

    class Inputs(NodeInputs):
        latent: Any = InputField(LATENT, description="a batch of latents")
        batch_index: int = InputField(INT, 0, ge=0, le=4095, description="first image to take")
        length: int = InputField(INT, 1, ge=1, le=4096, description="how many images to take")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the chosen images")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        latent = inputs.latent
        size = latent.samples.shape[0]
        start = min(inputs.batch_index, size - 1)
        stop = min(start + inputs.length, size)
        offsets = latent.batch_index or list(range(size))
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] == size:
            mask = mask[start:stop]
        return self.Outputs(
            latent=_with(
                latent, samples=latent.samples[start:stop], noise_mask=mask, batch_index=offsets[start:stop]
            )
        )

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        latent = inputs.get("latent")
        if not isinstance(latent, Shape):
            return None
        start = min(inputs["batch_index"], latent.batch - 1)
        batch = max(1, min(start + inputs["length"], latent.batch) - start)
        return latent_estimate(Shape(batch, latent.channels, latent.height, latent.width))


class RepeatLatentBatch(Node):
    """Repeat a batch `amount` times; copies get new seed offsets, so each is a different image."""

    type_name = "RepeatLatentBatch"
    category = "latent"

    class Inputs(NodeInputs):
        latent: Any = InputField(LATENT, description="latent batch to repeat")
        amount: int = InputField(INT, 1, ge=1, le=64, description="how many copies")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the repeated batch")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        latent = inputs.latent
        size = latent.samples.shape[0]
        offsets = latent.batch_index or list(range(size))
        span = max(offsets) + 1
        repeated = [o + k * span for k in range(inputs.amount) for o in offsets]
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] == size and size > 1:
            mask = mask.repeat(inputs.amount, *([1] * (mask.dim() - 1)))
        samples = latent.samples.repeat(inputs.amount, 1, 1, 1)
        return self.Outputs(latent=_with(latent, samples=samples, noise_mask=mask, batch_index=repeated))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        latent = inputs.get("latent")
        if not isinstance(latent, Shape):
            return None
        shape = Shape(latent.batch * inputs["amount"], latent.channels, latent.height, latent.width)
        return latent_estimate(shape, what=f"a batch of {shape.batch} latents")


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the latent nodes."""
    return [
        EmptyLatent,
        VAEEncode,
        VAEDecode,
        VAEEncodeForInpaint,
        SetLatentNoiseMask,
        LatentUpscale,
        LatentUpscaleBy,
        LatentFromBatch,
        RepeatLatentBatch,
    ]
