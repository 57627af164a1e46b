"""Image nodes for diffusion graphs: load a mask, preview, pad for outpainting, composite with a
mask, make an upscale agree with its low-resolution original.

Torch-free (numpy + Pillow), like the framework's image nodes in `image.py`. IMAGE is numpy float32
`[B, H, W, C]` in 0..1, MASK numpy float32 `[B, H, W]` in 0..1 with 1 = repaint.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import FileTooLargeError, NotAFileError, UnsafePathError
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.files import atomic_write_new, input_file_problem, read_regular_file, safe_join
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, FLOAT, IMAGE, INT, MASK, STRING
from ldmgraph.nodes.common import NodeInputError, check_mask_size
from ldmgraph.plugins import hookimpl

MASK_CHANNELS = ["alpha", "red", "green", "blue", "luminance"]


def check_input_file(name: Any, env: Environment, input_name: str) -> list[tuple[str, str, str]]:
    """Validation-time check that a file name stays in the input folder and is a regular file."""
    problem = input_file_problem(env.input_dir, name)
    return [] if problem is None else [(input_name, *problem)]


def open_image(folder: Path, name: str, node: str, env: Environment | None = None) -> Any:
    """Open an image file from the input folder, refusing names that escape it and files that are not
    images, and (given the run's environment) images over its pixel limit before decoding them."""
    from PIL import Image, UnidentifiedImageError

    from ldmgraph.nodes.input_files import check_pixels_before_decoding

    path = safe_join(folder, name)
    try:
        data = read_regular_file(path)
        image = Image.open(io.BytesIO(data))
        if env is not None:
            check_pixels_before_decoding(image, env, name)
        image.load()
    except FileNotFoundError:
        raise NodeInputError(f"{node}: no file {name!r} in the input folder {folder}") from None
    except (NotAFileError, FileTooLargeError) as error:
        raise NodeInputError(f"{node}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise NodeInputError(f"{node}: {name!r} is not an image Pillow can read ({error})") from None
    return image


class LoadMask(Node):
    """Load a mask from an image file in the input folder: one channel, 1 = repaint.

    `alpha` gives 1 - alpha (transparent pixels are repainted, as image editors mark holes); the
    colour channels and luminance are used as they are (white = repaint).
    """

    type_name = "LoadMask"
    category = "image"
    input_file_inputs = ("image",)  # carried by saved PNGs (ldmgraph.nodes.carried_inputs)

    class Inputs(NodeInputs):
        image: str = InputField(STRING, description="file name in the input folder")
        channel: str = InputField(
            ENUM, "luminance", choices=MASK_CHANNELS, description="which channel is the mask"
        )

    class Outputs(NodeOutputs):
        mask: Any = OutputField(MASK, description="[1, H, W], 1 = repaint")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        from ldmgraph.nodes.input_files import pixel_problems

        name = literals.get("image")
        if env.carried_inputs is not None and isinstance(name, str) and (env.carried_inputs / name).is_file():
            return pixel_problems(name, env, "image")
        return check_input_file(name, env, "image") or pixel_problems(name, env, "image")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        from ldmgraph.nodes.input_files import input_path

        try:
            stat = input_path(env, str(literals.get("image"))).stat()
        except (OSError, UnsafePathError):
            return None
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        from ldmgraph.nodes.input_files import image_file_estimate

        return image_file_estimate(inputs["image"], env, {"mask": 1})

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.nodes.input_files import input_path

        path = input_path(ctx.env, inputs.image)
        image = open_image(path.parent, path.name, "LoadMask", ctx.env)
        if inputs.channel == "alpha":
            alpha = image.convert("RGBA").getchannel("A")
            mask = 1.0 - np.asarray(alpha, dtype=np.float32) / 255.0
        elif inputs.channel == "luminance":
            mask = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        else:
            band = "RGB".index(inputs.channel[0].upper())
            mask = np.asarray(image.convert("RGB"), dtype=np.float32)[..., band] / 255.0
        return self.Outputs(mask=mask[None].astype(np.float32))


class PreviewImage(Node):
    """Show images without keeping them: written to the temporary folder and listed in the run's files.

    The server gives its data folder's ``temp`` (reported as ``type: temp``, as ComfyUI's
    PreviewImage does, with ComfyUI's text chunks); elsewhere a private folder per executor session.
    """

    type_name = "PreviewImage"

    estimate_rule = "writes:images"
    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: Any = InputField(IMAGE, description="images to preview")
        quantize: str = InputField(ENUM, "round", choices=("round", "truncate"),
                                   description="8-bit conversion: round (ldmgraph) or truncate (ComfyUI's)")

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: NodeContext) -> None:
        from PIL import Image

        from ldmgraph.nodes.image import png_info, to_uint8

        # the server's temp folder, or a private folder per executor session (mkdtemp: a new name,
        # mode 0700), never a fixed name in the shared temporary folder that another user could plant a link in
        folder = ctx.env.temp_dir or ctx.resource(("PreviewImage", "folder"),
                                                  lambda: Path(tempfile.mkdtemp(prefix="ldmgraph-preview-")))
        stem = "preview_" + re.sub(r"[^A-Za-z0-9_-]", "_", ctx.node_id)[:100]
        info = png_info(ctx) if ctx.env.png_text else None
        for picture in inputs.images:
            buffer = io.BytesIO()
            pixels = to_uint8(picture, inputs.quantize)
            Image.fromarray(pixels[..., :3] if pixels.shape[-1] > 1 else pixels[..., 0]).save(
                buffer, "PNG", pnginfo=info, compress_level=1)
            ctx.add_file(atomic_write_new(folder, stem, ".png", buffer.getvalue()))
        return None


class ImagePadForOutpaint(Node):
    """Pad an image for outpainting: grey borders to paint, and a mask of them feathered into the image."""

    type_name = "ImagePadForOutpaint"
    category = "image"

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="image to extend")
        left: int = InputField(INT, 0, ge=0, le=8192, multiple_of=8, description="pixels to add on the left")
        top: int = InputField(INT, 0, ge=0, le=8192, multiple_of=8, description="pixels to add on top")
        right: int = InputField(
            INT, 0, ge=0, le=8192, multiple_of=8, description="pixels to add on the right"
        )
        bottom: int = InputField(
            INT, 0, ge=0, le=8192, multiple_of=8, description="pixels to add at the bottom"
        )
        feathering: int = InputField(
            INT, 8, ge=0, le=8192, description="soft mask edge inside the image, pixels"
        )

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="the padded image (new area grey)")
        mask: Any = OutputField(MASK, description="1 on the new area, fading to 0 inside the image")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        batch, height, width, channels = inputs.image.shape
        left, t, r, b = inputs.left, inputs.top, inputs.right, inputs.bottom
        out = np.full((batch, height + t + b, width + left + r, channels), 0.5, dtype=np.float32)
        out[:, t : t + height, left : left + width] = inputs.image
        mask = np.ones((batch, height + t + b, width + left + r), dtype=np.float32)
        inner = np.zeros((height, width), dtype=np.float32)
        if inputs.feathering > 0:
            rows, cols = np.mgrid[0:height, 0:width]
            distances = [
                d
                for d, pad in ((rows, t), (height - 1 - rows, b), (cols, left), (width - 1 - cols, r))
                if pad
            ]
            if distances:
                nearest = np.minimum.reduce(distances).astype(np.float32)
                fade = np.clip((inputs.feathering - nearest) / inputs.feathering, 0.0, 1.0)
                inner = fade * fade
        mask[:, t : t + height, left : left + width] = inner
        return self.Outputs(image=out, mask=mask)

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        image = inputs.get("image")
        if not isinstance(image, Shape):
            return None
        height = image.height + inputs["top"] + inputs["bottom"]
        width = image.width + inputs["left"] + inputs["right"]
        out, mask = Shape(image.batch, image.channels, height, width), Shape(image.batch, 1, height, width)
        return Estimate(keeps=out.nbytes + mask.nbytes, works=3 * 8 * image.height * image.width,
                        outputs={"image": out, "mask": mask}, what=f"padding {image.batch} image(s) to {width}x{height}")


class ImageCompositeMasked(Node):
    """Paste `source` onto `destination` at (x, y), through `mask` if given (e.g. keep unmasked pixels).

    After inpainting, compositing the decoded image over the original with the inpainting mask
    leaves every pixel outside the mask exactly as it was.
    """

    type_name = "ImageCompositeMasked"
    category = "image"

    class Inputs(NodeInputs):
        destination: Any = InputField(IMAGE, description="background image")
        source: Any = InputField(IMAGE, description="image pasted on top")
        x: int = InputField(INT, 0, ge=0, le=16384, description="left edge of the paste in pixels")
        y: int = InputField(INT, 0, ge=0, le=16384, description="top edge of the paste in pixels")
        mask: Any = InputField(
            MASK, None, description="optional: 1 where the source shows (the source's size)"
        )
        mask_strength: float = InputField(FLOAT, 1.0, ge=0.0, le=1.0, description="scales the mask")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="the composite")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        dest, src = inputs.destination, inputs.source
        batch = max(dest.shape[0], src.shape[0])
        out = np.array(np.broadcast_to(dest, (batch, *dest.shape[1:])), dtype=np.float32)
        height = min(src.shape[1], dest.shape[1] - inputs.y)
        width = min(src.shape[2], dest.shape[2] - inputs.x)
        if height <= 0 or width <= 0:
            raise NodeInputError(
                f"ImageCompositeMasked: position ({inputs.x}, {inputs.y}) is outside the "
                f"{dest.shape[2]}x{dest.shape[1]} destination"
            )
        alpha = np.ones((batch, src.shape[1], src.shape[2], 1), dtype=np.float32)
        if inputs.mask is not None:
            check_mask_size(inputs.mask, src, "ImageCompositeMasked")
            mask = np.asarray(inputs.mask, dtype=np.float32)
            alpha = np.broadcast_to(mask.reshape(-1, *mask.shape[-2:])[..., None], alpha.shape)
        alpha = alpha[:, :height, :width] * inputs.mask_strength
        src_part = np.broadcast_to(src, (batch, *src.shape[1:]))[:, :height, :width, : dest.shape[3]]
        region = out[:, inputs.y : inputs.y + height, inputs.x : inputs.x + width]
        out[:, inputs.y : inputs.y + height, inputs.x : inputs.x + width] = (
            region * (1 - alpha) + src_part * alpha
        )
        return self.Outputs(image=out)

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        dest, src = inputs.get("destination"), inputs.get("source")
        if not isinstance(dest, Shape):
            return None
        batch = max(dest.batch, src.batch) if isinstance(src, Shape) else dest.batch
        out = Shape(batch, dest.channels, dest.height, dest.width)
        return Estimate(keeps=out.nbytes, works=3 * out.nbytes, outputs={"image": out})


def box_downscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Average each ``factor`` x ``factor`` block: [B, H, W, C] -> [B, H / factor, W / factor, C]."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def bicubic_upscale(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of float images [B, h, w, C] to [B, height, width, C], channel by channel.

    Unlike ``image.resize_images`` it does not clip to 0..1: back-projection resizes signed residuals.
    """
    from PIL import Image

    out = np.empty((images.shape[0], height, width, images.shape[3]), np.float32)
    for i, image in enumerate(images):
        for ch in range(images.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(image[..., ch], dtype=np.float32), mode="F")
            out[i, ..., ch] = np.asarray(plane.resize((width, height), Image.BICUBIC), np.float32)
    return out


class ImageMatchLowRes(Node):
    """Correct an upscaled image so that averaging it back down gives its low-resolution original.

    Iterative back-projection (Irani & Peleg 1991): each iteration box-downscales the image,
    takes the difference to `lowres`, and adds that difference back, bicubically upscaled. A
    super-resolution model draws the missing detail; this step keeps its colours and brightness
    tied to the input. With 0 iterations the image passes through unchanged.
    """

    type_name = "ImageMatchLowRes"

    estimate_rule = "same:image"
    category = "image"

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="the upscaled image (a whole multiple of lowres' size)")
        lowres: Any = InputField(IMAGE, description="the low-resolution original it was upscaled from")
        iterations: int = InputField(INT, 4, ge=0, le=50, description="back-projection steps (0: off)")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="the corrected image")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        image = np.asarray(inputs.image, np.float32)
        low = np.asarray(inputs.lowres, np.float32)[..., : image.shape[3]]
        (h, w), (lh, lw) = image.shape[1:3], low.shape[1:3]
        factor = h // lh if lh else 0
        if factor < 1 or h != factor * lh or w != factor * lw:
            raise NodeInputError(
                f"ImageMatchLowRes: input 'image' is {w}x{h}, not a whole multiple of input 'lowres' "
                f"({lw}x{lh}) with the same factor across and down; connect the image that was upscaled "
                f"from this lowres image"
            )
        if low.shape[0] not in (1, image.shape[0]):
            raise NodeInputError(
                f"ImageMatchLowRes: input 'lowres' has {low.shape[0]} images and 'image' {image.shape[0]}; "
                f"give one lowres image or one per upscaled image"
            )
        out = image.copy()
        for _ in range(inputs.iterations):
            out += bicubic_upscale(low - box_downscale(out, factor), h, w)
        return self.Outputs(image=np.clip(out, 0.0, 1.0))


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the diffusion graphs' image nodes."""
    return [LoadMask, PreviewImage, ImagePadForOutpaint, ImageCompositeMasked, ImageMatchLowRes]
