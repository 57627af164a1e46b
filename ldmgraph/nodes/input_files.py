"""Input image files: where a name resolves, the pixel limit read from the header, memory estimates.

A name resolves in the folder of files carried by a PNG being re-run (``Environment.carried_inputs``,
see :mod:`ldmgraph.nodes.carried_inputs`) when it is there, else in the input folder; either way
it never leaves its folder. The pixel limit (``Environment.max_image_pixels``, 64 megapixels by
default) is checked from the file's header, before any pixel is decoded: a small PNG can claim a
12000 x 12000 canvas that decodes to gigabytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import UnsafePathError
from ldmgraph.graph.estimate import Estimate, Shape, human
from ldmgraph.graph.files import safe_join
from ldmgraph.nodes.common import NodeInputError


def input_path(env: Environment, name: str) -> Path:
    """The file a name means: a carried copy when there is one, else the input folder's file."""
    if env.carried_inputs is not None:
        carried = safe_join(env.carried_inputs, name)
        if carried.is_file():
            return carried
    return safe_join(env.input_dir, name)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, decoding nothing; None if Pillow cannot tell.

    Pillow refuses to open a header claiming more than twice its own pixel limit (a decompression
    bomb); such a file is reported with the pixel count Pillow read, as one row of that many pixels,
    so the limit check below refuses it as `image_too_large` rather than letting it pass unseen.
    """
    import re

    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(image.size[0]), int(image.size[1])
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(found.group(1)), 1) if found else (2**31, 1)
    except Exception:  # noqa: BLE001 - not an image: the loader reports it with its own message
        return None


def too_many_pixels(size: tuple[int, int], env: Environment, name: str) -> str | None:
    """The message refusing an image over the pixel limit, or None."""
    width, height = size
    if width * height <= env.max_image_pixels:
        return None
    shape = f"{width}x{height} = " if height > 1 else "a decompression bomb of "  # (see image_size)
    return (f"{name!r} is {shape}{width * height / 1e6:.1f} megapixels, more than the limit of "
            f"{env.max_image_pixels / 1e6:.1f} (about {human(width * height * 16)} once decoded); "
            "scale it down, or raise the limit (--max-image-pixels)")


def pixel_problems(name: Any, env: Environment, input_name: str) -> list[tuple[str | None, str, str]]:
    """Validation-time pixel-limit check of an input image named by a literal."""
    if not isinstance(name, str):
        return []
    try:
        size = image_size(input_path(env, name))
    except (OSError, UnsafePathError):
        return []  # reported by the file checks
    message = too_many_pixels(size, env, name) if size else None
    return [(input_name, codes.IMAGE_TOO_LARGE, message)] if message else []


def check_pixels_before_decoding(image: Any, env: Environment, name: str) -> None:
    """Run-time guard on an opened (not yet decoded) Pillow image."""
    message = too_many_pixels(image.size, env, name)
    if message:
        raise NodeInputError(message)


def image_file_estimate(name: Any, env: Environment, outputs: dict[str, int]) -> Estimate | None:
    """What loading an image file allocates: its decoded RGBA bytes plus the outputs' float arrays.

    ``outputs`` maps each output name to its channels (``{"image": 3, "mask": 1}``).
    """
    if not isinstance(name, str):
        return None
    try:
        size = image_size(input_path(env, name))
    except (OSError, UnsafePathError):
        return None
    if size is None:
        return None
    width, height = size
    path = str(input_path(env, name))
    shapes = {out: Shape(1, channels, height, width, source=path) for out, channels in outputs.items()}
    keeps = sum(s.nbytes for s in shapes.values())
    return Estimate(keeps=keeps, works=width * height * 4 * 5, outputs=shapes,
                    what=f"a {width}x{height} image decoded to float32")
