"""Files in and out of the data folder: uploads, ``/view``, and the folders they may touch.

What ComfyUI's clients expect, restated: ``POST /upload/image`` stores the file under the name the
client sent (so a graph can name it); with ``overwrite`` false a name already taken by different
content becomes ``name (1).png``, ``name (2).png``, ... and the same content gets the name it
already has; the reply ``{name, subfolder, type}`` names what was stored. ``GET /view`` serves a
file of ``input``, ``output`` or ``temp``; ``preview=webp;90`` (or ``jpeg;90``) re-encodes it
smaller, ``channel=rgb`` drops the alpha channel and ``channel=a`` keeps only it.

What this server adds: an upload must decode as an image, its pixel count is read from its header
before anything is decoded (413 ``image_too_large``), and no path ever passes through a symbolic
link: a link planted in ``input/`` (or output, temp) is refused, never followed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from ldmgraph.graph.files import atomic_write_bytes

from .protocol import request_error
from .state import ServerState

UPLOAD_TYPES = ("input", "temp")
SUBFOLDER = re.compile(r"^(?:[A-Za-z0-9_-]{1,64}(?:/[A-Za-z0-9_-]{1,64}){0,3})?$")
FILE_NAME = re.compile(r"^(?!\.)[^\x00-\x1f\x7f/\\:*?\"<>|]{1,200}$")  # one name, not hidden, portable
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
PREVIEW_FORMATS = ("webp", "jpeg")
# ComfyUI's model folder kinds (folder_paths): listed so clients that ask for them get [] rather than 404
MODEL_FOLDERS = ("checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                 "hypernetworks", "photomaker", "classifiers")


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(request_error(kind, message), status_code=status)


# -- paths ------------------------------------------------------------------------------------------
def inside(root: Path, subfolder: str, name: str | None = None) -> Path | None:
    """``root/subfolder[/name]`` when no part of it below ``root`` is a symbolic link and it stays in
    ``root``; None otherwise. Parts that do not exist yet are fine (they are created as folders)."""
    if not SUBFOLDER.match(subfolder) or (name is not None and not FILE_NAME.match(name)):
        return None
    root = root.resolve()
    path = root
    for part in [p for p in subfolder.split("/") if p] + ([name] if name else []):
        path = path / part
        if path.is_symlink():
            return None
    return path


def file_path(state: ServerState, kind: str, subfolder: str, name: str) -> Path | None:
    """A regular file of input, output or temp (no link on the way), or None."""
    root = state.folder(kind)
    path = inside(root, subfolder, name) if root is not None else None
    return path if path is not None and path.is_file() else None


# -- /view ------------------------------------------------------------------------------------------
def view_response(path: Path, preview: str | None, channel: str | None) -> Response:
    """The file as it is, or re-encoded as ComfyUI's ``preview`` and ``channel`` parameters ask."""
    media = MEDIA.get(path.suffix.lower(), "application/octet-stream")
    if (not preview and channel in (None, "", "rgba")) or media == "application/octet-stream":
        return FileResponse(path, media_type=media)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return error(400, "not_an_image", "the file is not an image; fetch it without preview or channel")
    if channel == "rgb":
        image = image.convert("RGB")
    elif channel == "a":
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        image = Image.new("RGBA", image.size)
        image.putalpha(alpha)
    image_format, quality = "png", 90
    if preview:
        wanted, _, level = preview.partition(";")
        image_format = wanted if wanted in PREVIEW_FORMATS and channel != "a" else "webp"
        quality = int(level) if level.isdigit() and 1 <= int(level) <= 100 else 90
        if image_format == "jpeg":
            image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper(), quality=quality)
    return Response(buffer.getvalue(), media_type=f"image/{image_format}",
                    headers={"Content-Disposition": f'filename="{path.name}"'})


# -- uploads ----------------------------------------------------------------------------------------
def receive_image(state: ServerState, upload: UploadFile, kind: str, subfolder: str, original_ref: str | None,
                  overwrite: bool = False) -> Any:
    """Store an uploaded image under the client's name (see the module docstring)."""
    if kind not in UPLOAD_TYPES:
        return error(400, "invalid_type", "uploads go to type 'input' (or 'temp')")
    if not SUBFOLDER.match(subfolder or ""):
        return error(400, "invalid_subfolder", "subfolder may hold only letters, digits, '_', '-' and '/' "
                                               "(at most 4 levels)")
    name = (upload.filename or "").strip()
    if not FILE_NAME.match(name):
        return error(400, "invalid_filename", "the file name must be one name (no '/', '\\\\', control characters "
                                              "or leading '.'), at most 200 characters")
    data = upload.file.read()
    decoded = _decode(state, data)
    if isinstance(decoded, JSONResponse):
        return decoded
    if original_ref is not None:
        masked = _apply_mask(state, decoded, original_ref)
        if isinstance(masked, JSONResponse):
            return masked
        buffer = io.BytesIO()
        masked.save(buffer, format="PNG")
        data = buffer.getvalue()
    folder = inside(state.folder(kind) or state.input_dir, subfolder or "")
    if folder is None:
        return error(400, "unsafe_path", "the subfolder is (or passes through) a symbolic link; uploads never "
                                         "follow links")
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, name, data, overwrite)
    if target is None:
        return error(400, "unsafe_path", f"{name!r} is a symbolic link in that folder; uploads never follow links")
    if not (target.is_file() and not overwrite and _same(target, data)):
        atomic_write_bytes(target, data)
    state.store.add_file(kind, subfolder or "", target.name, target)
    return {"name": target.name, "subfolder": subfolder or "", "type": kind}


def _decode(state: ServerState, data: bytes) -> Any:
    """The upload as a decoded PIL image, its size checked from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    limit = state.config.max_image_pixels
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > limit:
                return error(413, "image_too_large", f"the image is {opened.width}x{opened.height}; uploads may "
                                                     f"have at most {limit} pixels")
            opened.load()
            return opened.convert("RGBA") if "A" in opened.getbands() or "transparency" in opened.info \
                else opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return error(400, "not_an_image", "the upload is not an image Pillow can decode (PNG, JPEG, WebP, ...)")


def _free_name(folder: Path, name: str, data: bytes, overwrite: bool) -> Path | None:
    """The path to store ``name`` at: itself when free, overwriting, or holding the same bytes;
    else ComfyUI's ``stem (i).suffix``. None when the name is a link."""
    stem, suffix = os.path.splitext(name)
    candidate, index = folder / name, 1
    while True:
        if candidate.is_symlink():
            return None
        if overwrite or not candidate.exists() or _same(candidate, data):
            return candidate
        candidate = folder / f"{stem} ({index}){suffix}"
        index += 1


def _same(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    except OSError:
        return False


def _apply_mask(state: ServerState, mask: Any, original_ref: str) -> Any:
    """ComfyUI's mask upload: the original image with the mask's alpha channel."""
    from PIL import Image

    try:
        ref = json.loads(original_ref)
        name = ref.get("filename", ref.get("name"))  # the editor sends filename; an upload reply says name
        path = file_path(state, str(ref.get("type", "input")), str(ref.get("subfolder", "")), str(name))
    except (ValueError, KeyError, AttributeError, TypeError):
        path = None
    if path is None:
        return error(400, "unknown_original", "original_ref must name an image of the input, output or temp folder")
    with Image.open(path) as original:
        if original.width * original.height > state.config.max_image_pixels:
            return error(413, "image_too_large", "the original image is larger than uploads may be")
        rgba = original.convert("RGBA")
    alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
    rgba.putalpha(alpha.resize(rgba.size))
    return rgba
