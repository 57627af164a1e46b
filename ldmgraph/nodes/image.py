"""Image nodes: load, save, scale, crop, invert, blend. numpy + Pillow only, never torch.

IMAGE values are numpy float32 ``[B, H, W, C]`` arrays in 0..1 and MASK values ``[B, H, W]``
(see docs/INTERFACES.md). Resizing goes through Pillow's 32-bit float mode ("F"), one channel at
a time, so no precision is lost to 8-bit rounding between nodes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldmgraph.graph import InputField, Node, NodeContext, NodeInputs, NodeOutputs, OutputField, codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import UnsafePathError
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.files import (
    atomic_write_new,
    check_file_name_prefix,
    input_file_problem,
    output_folder_problem,
    read_regular_file,
    safe_join,
)
from ldmgraph.graph.loading import PNG_PARAMETERS_KEY, PNG_WORKFLOW_KEY
from ldmgraph.graph.sockets import ENUM, FLOAT, IMAGE, INT, MASK, STRING
from ldmgraph.plugins import hookimpl

MAX_SIZE = 16384
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


# -- helpers ----------------------------------------------------------------------------------------
def resize_images(images: np.ndarray, width: int, height: int, method: str) -> np.ndarray:
    """Resize a ``[B, H, W, C]`` float batch to ``width`` x ``height`` with a Pillow filter."""
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((images.shape[0], height, width, images.shape[3]), dtype=np.float32)
    for b in range(images.shape[0]):
        for c in range(images.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(images[b, :, :, c], dtype=np.float32), mode="F")
            out[b, :, :, c] = np.asarray(plane.resize((width, height), RESAMPLE[method]), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def center_crop_to_aspect(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the centre of a batch to the aspect ratio width:height (before scaling)."""
    h, w = images.shape[1:3]
    if w * height > h * width:  # too wide
        new_w = max(1, round(h * width / height))
        x = (w - new_w) // 2
        return images[:, :, x : x + new_w]
    new_h = max(1, round(w * height / width))
    y = (h - new_h) // 2
    return images[:, y : y + new_h]


QUANTIZE = ("round", "truncate")


def to_uint8(image: np.ndarray, quantize: str = "round") -> np.ndarray:
    """One ``[H, W, C]`` float image in 0..1 to uint8: 255 x rounded (ours) or truncated
    (ComfyUI's SaveImage, ``clip(255 x).astype(uint8)``), clipped to 0..255."""
    scaled = image * 255.0
    return np.clip(np.rint(scaled) if quantize == "round" else scaled, 0, 255).astype(np.uint8)


def _file_problems(folder: Path, name: Any, input_name: str) -> list[tuple[str | None, str, str]]:
    problem = input_file_problem(folder, name)
    return [] if problem is None else [(input_name, *problem)]


def read_input_image(folder: Path, name: str) -> Image.Image:
    """Open an image file of the input folder: a regular file, read with a bound, then decoded."""
    path = safe_join(folder, name)
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no file {name!r} in the input folder {folder}") from None
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{name!r} in the input folder {folder} is not an image Pillow can read ({exc})") from None


def output_problems(folder: Path, prefix: Any, input_name: str) -> list[tuple[str | None, str, str]]:
    """Validation of where an output node writes: a portable prefix that stays in ``folder``, and a
    folder (with the prefix's subfolders) that is, or can be made, a writable folder."""
    if not isinstance(prefix, str):
        return []  # a linked prefix: checked when its value is known, before the node runs
    problem = check_file_name_prefix(prefix)
    if problem is not None:
        return [(input_name, problem[0], f"{problem[1]}; use a prefix such as 'ldmgraph' or 'sub/name'")]
    try:
        target = safe_join(folder, prefix + "_")
    except UnsafePathError as exc:
        return [(input_name, codes.UNSAFE_PATH, f"{exc}; use a prefix inside the output folder")]
    reason = output_folder_problem(target.parent)
    if reason is not None:
        return [(None, codes.OUTPUT_NOT_WRITABLE, f"{reason}; pass a writable --output-dir")]
    return []


def same_size_estimate(image: Any, temporaries: int = 1) -> Estimate | None:
    """An image node whose output has ``image``'s shape (``temporaries`` arrays of it while working)."""
    if not isinstance(image, Shape):
        return None
    return Estimate(keeps=image.nbytes, works=temporaries * image.nbytes, outputs={"image": image})


def resized_estimate(image: Any, width: int, height: int) -> Estimate | None:
    """Resizing ``image`` to ``width`` x ``height`` (one float plane in and out at a time)."""
    if not isinstance(image, Shape):
        return None
    out = Shape(image.batch, image.channels, height, width)
    return Estimate(keeps=out.nbytes, works=out.nbytes + 4 * (image.height * image.width + height * width),
                    outputs={"image": out}, what=f"{image.batch} image(s) resized to {width}x{height}")


# -- nodes ------------------------------------------------------------------------------------------
class LoadImage(Node):
    """Load an image file from the input folder; the mask output is 1 - alpha (zeros without alpha)."""

    type_name = "LoadImage"
    category = "image"
    input_file_inputs = ("image",)  # carried by saved PNGs (ldmgraph.nodes.carried_inputs)

    class Inputs(NodeInputs):
        image: str = InputField(STRING, description="file name inside the input folder")

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE, description="RGB image [1, H, W, 3]")
        mask: np.ndarray = OutputField(MASK, description="1 - alpha [1, H, W]")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        from ldmgraph.nodes.input_files import pixel_problems

        name = literals.get("image")
        if isinstance(name, str) and env.carried_inputs is not None and (env.carried_inputs / name).is_file():
            return pixel_problems(name, env, "image")
        return _file_problems(env.input_dir, name, "image") or pixel_problems(name, env, "image")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        from ldmgraph.nodes.input_files import input_path

        try:
            stat = input_path(env, str(literals.get("image"))).stat()
        except (OSError, UnsafePathError):
            return None  # a linked name: the node is re-checked, and always run, when it is known
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        from ldmgraph.nodes.input_files import image_file_estimate

        return image_file_estimate(inputs["image"], env, {"image": 3, "mask": 1})

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.nodes.input_files import check_pixels_before_decoding, input_path

        path = input_path(ctx.env, inputs.image)
        with read_input_image(path.parent, path.name) as opened:
            check_pixels_before_decoding(opened, ctx.env, inputs.image)
            picture = ImageOps.exif_transpose(opened)
            has_alpha = "A" in picture.getbands() or "transparency" in picture.info
            rgba = np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255.0
        image = np.ascontiguousarray(rgba[None, :, :, :3])
        mask = (1.0 - rgba[None, :, :, 3]) if has_alpha else np.zeros((1, *rgba.shape[:2]), np.float32)
        return self.Outputs(image=image, mask=np.ascontiguousarray(mask, dtype=np.float32))


class SaveImage(Node):
    """Save images as PNG files in the output folder, with the workflow and parameters embedded.

    Files are named ``{prefix}_{counter:05d}_.png``, the counter following the highest one of that
    prefix already in the folder (as ComfyUI's ``folder_paths.get_save_image_path`` counts: names
    never repeat across runs), never overwriting, and written atomically. The text chunk
    ``ldmgraph:workflow`` holds the resolved workflow (parameter values and drawn seeds applied) and
    ``ldmgraph:parameters`` the parameter values, so `ldmgraph run image.png` re-runs it; the
    front end's own chunks (ComfyUI's ``prompt`` and ``workflow``, from ``Environment.png_text``)
    go beside them, so ComfyUI's editor restores its graph from the file.
    """

    type_name = "SaveImage"

    estimate_rule = "writes:images"
    category = "image"
    output_node = True

    class Inputs(NodeInputs):
        images: np.ndarray = InputField(IMAGE, description="images to save (one file per batch item)")
        filename_prefix: str = InputField(STRING, "ldmgraph",
                                          description="file name prefix, may include a subfolder")
        quantize: str = InputField(ENUM, "round", choices=QUANTIZE,
                                   description="8-bit conversion: round (ldmgraph) or truncate (ComfyUI's)")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        return output_problems(env.output_dir, literals.get("filename_prefix", ""), "filename_prefix")

    def run(self, inputs: Inputs, ctx: NodeContext) -> None:
        info = png_info(ctx)
        for image in _as_batch(inputs.images):
            ctx.check_cancelled()
            buffer = io.BytesIO()
            Image.fromarray(to_uint8(image, inputs.quantize)).save(buffer, format="PNG", pnginfo=info, compress_level=4)
            ctx.add_file(atomic_write_new(ctx.output_dir, inputs.filename_prefix, ".png", buffer.getvalue()))
        return None


class SaveImageWebsocket(Node):
    """Send images to the client that queued the job, as binary websocket frames, without saving them.

    ComfyUI ships this node (``websocket_image_save.py``): each image goes out full size as a PNG
    preview frame while the node is the one executing, and the node leaves nothing in the history.
    Here each image travels in a progress event's ``preview`` and the server sends it as that frame;
    run elsewhere (the CLI), the node sends nothing. Never cached: a frame is sent on every run.
    """

    type_name = "SaveImageWebsocket"

    estimate_rule = "small"
    category = "image"
    output_node = True
    deterministic = False

    class Inputs(NodeInputs):
        images: np.ndarray = InputField(IMAGE, description="images to send (one frame per batch item)")
        quantize: str = InputField(ENUM, "round", choices=QUANTIZE,
                                   description="8-bit conversion: round (ldmgraph) or truncate (ComfyUI's)")

    def run(self, inputs: Inputs, ctx: NodeContext) -> None:
        batch = _as_batch(inputs.images)
        for index, image in enumerate(batch, 1):
            pixels = to_uint8(image, inputs.quantize)
            ctx.progress(index, len(batch), preview=pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0])
        return None


def png_info(ctx: NodeContext) -> PngImagePlugin.PngInfo:
    """The text chunks of a saved PNG: ldmgraph's workflow, parameters and carried inputs, then the
    front end's (ComfyUI's ``prompt`` and ``workflow``) when the run was given them."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_WORKFLOW_KEY, json.dumps(ctx.workflow, ensure_ascii=False))
    info.add_text(PNG_PARAMETERS_KEY, json.dumps(ctx.parameters, ensure_ascii=False))
    from ldmgraph.nodes.carried_inputs import PNG_INPUTS_KEY, input_file_records

    carried = input_file_records(ctx.workflow, ctx.registry, ctx.env)
    if carried:
        info.add_text(PNG_INPUTS_KEY, json.dumps(carried), zip=True)
    for key, text in ctx.env.png_text:
        if key not in (PNG_WORKFLOW_KEY, PNG_PARAMETERS_KEY, PNG_INPUTS_KEY):
            info.add_text(key, text)
    return info


class ImageScale(Node):
    """Resize images to a width and height; "center" crop keeps the aspect ratio."""

    type_name = "ImageScale"
    category = "image"

    class Inputs(NodeInputs):
        image: np.ndarray = InputField(IMAGE)
        width: int = InputField(INT, 512, ge=1, le=MAX_SIZE, description="new width in pixels")
        height: int = InputField(INT, 512, ge=1, le=MAX_SIZE, description="new height in pixels")
        upscale_method: str = InputField(ENUM, "bicubic", choices=list(RESAMPLE), description="filter")
        crop: str = InputField(ENUM, "disabled", choices=["disabled", "center"],
                               description='"center" crops to the new aspect ratio before scaling')

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        images = inputs.image
        if inputs.crop == "center":
            images = center_crop_to_aspect(images, inputs.width, inputs.height)
        return self.Outputs(image=resize_images(images, inputs.width, inputs.height, inputs.upscale_method))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return resized_estimate(inputs.get("image"), inputs["width"], inputs["height"])


class ImageScaleBy(Node):
    """Resize images by a factor."""

    type_name = "ImageScaleBy"
    category = "image"

    class Inputs(NodeInputs):
        image: np.ndarray = InputField(IMAGE)
        scale_by: float = InputField(FLOAT, 2.0, ge=0.01, le=16.0, description="size factor")
        upscale_method: str = InputField(ENUM, "bicubic", choices=list(RESAMPLE), description="filter")

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        h, w = inputs.image.shape[1:3]
        width = min(MAX_SIZE, max(1, round(w * inputs.scale_by)))
        height = min(MAX_SIZE, max(1, round(h * inputs.scale_by)))
        return self.Outputs(image=resize_images(inputs.image, width, height, inputs.upscale_method))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        image, k = inputs.get("image"), inputs["scale_by"]
        if not isinstance(image, Shape):
            return None
        return resized_estimate(image, min(MAX_SIZE, max(1, round(image.width * k))),
                                min(MAX_SIZE, max(1, round(image.height * k))))


class ImageCrop(Node):
    """Crop a rectangle (clamped to the image) from images."""

    type_name = "ImageCrop"
    category = "image"

    class Inputs(NodeInputs):
        image: np.ndarray = InputField(IMAGE)
        width: int = InputField(INT, 512, ge=1, le=MAX_SIZE, description="crop width")
        height: int = InputField(INT, 512, ge=1, le=MAX_SIZE, description="crop height")
        x: int = InputField(INT, 0, ge=0, le=MAX_SIZE, description="left edge")
        y: int = InputField(INT, 0, ge=0, le=MAX_SIZE, description="top edge")

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        h, w = inputs.image.shape[1:3]
        x = min(inputs.x, w - 1)
        y = min(inputs.y, h - 1)
        crop = inputs.image[:, y : y + inputs.height, x : x + inputs.width]
        return self.Outputs(image=np.ascontiguousarray(crop))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        image = inputs.get("image")
        if not isinstance(image, Shape):
            return None
        width = min(inputs["width"], image.width - min(inputs["x"], image.width - 1))
        height = min(inputs["height"], image.height - min(inputs["y"], image.height - 1))
        return same_size_estimate(Shape(image.batch, image.channels, height, width))


class ImageInvert(Node):
    """Invert the colours of images (1 - x)."""

    type_name = "ImageInvert"
    category = "image"

    class Inputs(NodeInputs):
        image: np.ndarray = InputField(IMAGE)

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(image=(1.0 - inputs.image).astype(np.float32, copy=False))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return same_size_estimate(inputs.get("image"))


BLEND_MODES = ("normal", "multiply", "screen", "overlay", "difference")


class ImageBlend(Node):
    """Blend image2 over image1: ``(1 - f) * image1 + f * mode(image1, image2)``.

    Modes follow the usual compositing formulas (W3C Compositing and Blending Level 1, section 10):
    multiply a*b, screen 1-(1-a)(1-b), overlay = hard light with swapped layers, difference |a-b|.
    image2 is resized to image1's size if they differ.
    """

    type_name = "ImageBlend"
    category = "image"

    class Inputs(NodeInputs):
        image1: np.ndarray = InputField(IMAGE, description="base image")
        image2: np.ndarray = InputField(IMAGE, description="blended image")
        blend_factor: float = InputField(FLOAT, 0.5, ge=0.0, le=1.0, description="0 = image1, 1 = blended")
        blend_mode: str = InputField(ENUM, "normal", choices=list(BLEND_MODES))

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        base = inputs.image1
        top = resize_images(inputs.image2, base.shape[2], base.shape[1], "bicubic")
        if top.shape[3] != base.shape[3]:
            raise ValueError(f"image1 has {base.shape[3]} channels but image2 has {top.shape[3]}")
        blended = _blend(base, top, inputs.blend_mode)
        f = np.float32(inputs.blend_factor)
        return self.Outputs(image=((1 - f) * base + f * blended).astype(np.float32, copy=False))

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return same_size_estimate(inputs.get("image1"), temporaries=3)


def _blend(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return np.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "difference":
        return np.abs(a - b)
    raise ValueError(f"unknown blend mode {mode!r}; use one of {', '.join(BLEND_MODES)}")


def _as_batch(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        return images[None]
    if images.ndim != 4:
        raise ValueError(f"expected IMAGE [B, H, W, C], got an array of shape {images.shape}")
    return images


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the image nodes."""
    return [LoadImage, SaveImage, SaveImageWebsocket, ImageScale, ImageScaleBy, ImageCrop, ImageInvert, ImageBlend]
