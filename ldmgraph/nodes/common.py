"""Helpers shared by the diffusion nodes: model files by name, the model cache, devices, conversions.

Nothing here imports torch at module level (listing and validating nodes must not); the torch
helpers import it inside the function.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldmgraph.graph import codes
from ldmgraph.graph.errors import LdmGraphError, UnsafePathError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from ldmgraph.graph.context import Environment, NodeContext

MODEL_CACHE_KEY = "model_cache"
"""The `ctx.resource` key of the executor session's `ModelCache` (tests read it there too)."""

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEVICES = ("auto", "cpu", "cuda", "mps")
NOT_CHECKPOINT_FOLDERS = ("loras", "embeddings")
"""Sub-folders of a model folder that are not listed as checkpoints (LoRAs, textual-inversion embeddings)."""
SD_DOWNSCALE = 8
"""Pixel-to-latent factor assumed when a node is given no VAE (Stable Diffusion's f = 8)."""


class NodeInputError(LdmGraphError, ValueError):
    """An input value a node cannot use (wrong size, missing model part); says what to change."""


# --- model files ------------------------------------------------------------------------------


def available_models(model_dirs: tuple[Path, ...] | list[Path]) -> list[str]:
    """Names (relative to their model folder) of the checkpoints and diffusers folders found."""
    names: list[str] = []
    for folder in model_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        seen: set[str] = set()
        for root, dirs, files in os.walk(folder, followlinks=True):  # models may be links to another disk
            real = os.path.realpath(root)
            if real in seen:  # a link loop
                dirs.clear()
                continue
            seen.add(real)
            rel = Path(root).relative_to(folder)
            if "model_index.json" in files:
                names.append(rel.as_posix())
                dirs.clear()
                continue
            # loras/ and embeddings/ hold other kinds of files (ComfyUI's layout), not checkpoints
            skip = NOT_CHECKPOINT_FOLDERS if root == str(folder) else ()
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
            names += [(rel / f).as_posix() for f in sorted(files) if f.endswith(CHECKPOINT_SUFFIXES)]
    return sorted(dict.fromkeys(n.removeprefix("./") for n in names))


def find_model(name: str, model_dirs: tuple[Path, ...] | list[Path]) -> Path:
    """Resolve a checkpoint name in the model folders (the extension `.safetensors` may be left out).

    Raises `UnsafePathError` for `..` or absolute names and `FileNotFoundError` naming what is there.
    """
    for folder in model_dirs:
        for candidate in (name, f"{name}.safetensors"):
            path = model_join(folder, candidate)
            if path.is_file() or (path / "model_index.json").is_file():
                return path
    where = ", ".join(str(d) for d in model_dirs) or "(no model folders configured)"
    convertible = pickle_beside(name, model_dirs)
    if convertible is not None:  # the fix first: messages are cut at 800 characters
        raise FileNotFoundError(f"no model named {name!r} in the model folders ({where}), but {convertible}")
    found = available_models(model_dirs)
    listing = ", ".join(found) if found else "none"
    raise FileNotFoundError(
        f"no model named {name!r} in the model folders ({where}); available: {listing}. "
        "Put the file in one of those folders or pass --models-dir"
    )


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def pickle_beside(name: str, model_dirs: tuple[Path, ...] | list[Path]) -> str | None:
    """For a missing ``.safetensors`` model: a pickle of the same stem where it was expected (the
    paper's releases ship ``model.ckpt``), with the exact command that writes the expected file."""
    from ldmgraph.models.errors import convert_command

    for folder in model_dirs:
        wanted = model_join(folder, name if name.endswith(".safetensors") else f"{name}.safetensors")
        for suffix in PICKLE_SUFFIXES:
            pickle = wanted.with_suffix(suffix)
            if pickle.is_file():
                return (f"{pickle.name} is there, a pickled checkpoint (not loaded: pickles can run code). "
                        "Convert it to the file the workflow loads, running none of its code:\n"
                        f"  {convert_command(pickle, wanted)}")
    return None


def model_join(folder: str | os.PathLike[str], name: str) -> Path:
    """A model name inside its folder: absolute names and `..` are refused, symbolic links followed.

    Unlike input and output files, model folders are the user's own, and models linked in from
    another disk are a common set-up, so a link leading out of the folder is not refused here.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"invalid model name {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"model name {name!r} must be relative to its model folder")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafePathError(f"model name {name!r} may not contain '..'")
    return Path(folder) / name


def check_model_name(name: Any, env: Environment, *, need_unet: bool = False) -> list[tuple[str, str]]:
    """Validation-time check of a model-name literal: one (code, message) pair per problem.

    The file's header is read (no weights): a pickle, a damaged file or a broken configuration is
    reported here, before anything runs, with the same message the loader would give.
    """
    from ldmgraph.models.errors import ModelError, PickleRefusedError
    from ldmgraph.models.header import inspect_model

    if not isinstance(name, str):
        return []
    try:
        path = find_model(name, env.model_dirs)
    except UnsafePathError as error:
        return [(codes.UNSAFE_PATH, f"{error}: name a file inside the model folders")]
    except FileNotFoundError as error:
        return [(codes.FILE_NOT_FOUND, str(error))]
    except OSError as error:  # a name too long for the filesystem, a folder that cannot be listed
        return [(codes.FILE_NOT_FOUND, f"cannot look for {name[:80]!r}{'...' if len(name) > 80 else ''} in the "
                                       f"model folders: {error.strerror or error}; name a file that is there")]
    try:
        inspect_model(path, need_unet=need_unet)
    except PickleRefusedError as error:
        return [(codes.PICKLE_CHECKPOINT, str(error))]
    except ModelError as error:
        return [(codes.BAD_MODEL, f"{type(error).__name__}: {error}")]
    except OSError as error:
        return [(codes.BAD_MODEL, f"cannot read {path}: {error.strerror or error}")]
    return []


def model_summary(name: Any, env: Environment, *, need_unet: bool = False) -> Any:
    """The header summary (`ldmgraph.models.header.ModelSummary`) of a named model, or None."""
    from ldmgraph.models.header import inspect_model

    try:
        return inspect_model(find_model(str(name), env.model_dirs), need_unet=need_unet)
    except (OSError, LdmGraphError):
        return None


def model_fingerprint(name: Any, env: Environment) -> str | None:
    """Cache-key material for a model name: the resolved path, size and mtime (a replaced file re-loads)."""
    try:
        path = find_model(str(name), env.model_dirs)
    except (OSError, LdmGraphError):
        return None
    stat = (path / "model_index.json" if path.is_dir() else path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def model_cache(ctx: NodeContext) -> Any:
    """The executor session's model cache: a checkpoint loaded once serves every later workflow."""
    from ldmgraph.models.cache import ModelCache

    return ctx.resource(MODEL_CACHE_KEY, ModelCache)


# --- devices ----------------------------------------------------------------------------------


def device_problem(choice: str | None) -> str | None:
    """Why a device cannot be used on this machine, decided without importing torch (None: usable).

    CUDA needs a torch build with CUDA (its `torch/version.py` names a CUDA version) and an NVIDIA
    driver with a device; MPS needs an Apple-silicon Mac.
    """
    if not choice or choice == "auto":
        return None
    kind = choice.split(":")[0]
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not _torch_built_with_cuda():
            return f"device {choice!r} was asked for but the installed torch has no CUDA support; use 'auto' or 'cpu'"
        if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()
                or os.name == "nt"):
            return f"device {choice!r} was asked for but this machine has no NVIDIA GPU; use 'auto' or 'cpu'"
        return None
    if kind == "mps":
        import platform
        import sys

        if sys.platform != "darwin" or platform.machine() != "arm64":
            return f"device {choice!r} was asked for but MPS needs an Apple-silicon Mac; use 'auto' or 'cpu'"
        return None
    return f"unknown device {choice!r}; use auto, cpu, cuda, cuda:N or mps"


def _torch_built_with_cuda() -> bool:
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        match = re.search(r"^cuda[^=]*=\s*(.+)$", version.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        return True  # cannot tell: leave it to the run
    return bool(match) and match.group(1).strip() not in ("None", "''", '""')


def pick_device(choice: str, ctx: NodeContext) -> str:
    """The device to compute on: the node's choice, else the run's `--device`, else CUDA > MPS > CPU."""
    import torch

    if choice not in ("", "auto"):
        wanted = choice
    elif ctx.device:
        wanted = ctx.device
    elif torch.cuda.is_available():
        return "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    else:
        return "cpu"
    kind = wanted.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise NodeInputError(
            f"device {wanted!r} was asked for but CUDA is not available; use 'auto' or 'cpu'"
        )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NodeInputError(f"device {wanted!r} was asked for but MPS is not available; use 'auto' or 'cpu'")
    return wanted


def load_device(ctx: NodeContext) -> str:
    """Where loaders put a model: the run's `--device`, else CUDA > MPS > CPU, so that the sampler,
    the text encoder and the autoencoder compute where their weights are (a sampler's own device
    choice moves its latents; the model stays where it was loaded). Under a device-memory manager
    (`--gpu-memory`) models are loaded at home, in host memory, and moved when a node calls them."""
    home = getattr(getattr(model_cache(ctx), "runtime", None), "home", None)
    return home if home is not None else pick_device("auto", ctx)


# --- conversions ------------------------------------------------------------------------------


def image_to_torch(image: np.ndarray) -> torch.Tensor:
    """IMAGE (numpy [B, H, W, C] 0..1) -> float32 torch tensor of the same layout (no copy if possible)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def image_to_numpy(image: torch.Tensor) -> np.ndarray:
    """torch [B, H, W, C] -> IMAGE (numpy float32, clipped to 0..1)."""
    return image.detach().to("cpu", dtype=_float32()).clamp(0, 1).numpy()


def _float32() -> Any:
    import torch

    return torch.float32


def mask_to_torch(mask: np.ndarray, batch: int | None = None) -> torch.Tensor:
    """MASK (numpy [B, H, W] or [H, W]) -> torch [B, 1, H, W] float32, repeated to `batch` if given."""
    import numpy as np
    import torch

    array = np.asarray(mask, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    tensor = torch.from_numpy(np.ascontiguousarray(array))[:, None]
    if batch is not None and tensor.shape[0] != batch:
        repeats = -(-batch // tensor.shape[0])
        tensor = tensor.repeat(repeats, 1, 1, 1)[:batch]
    return tensor


def check_mask_size(mask: np.ndarray, image: np.ndarray, node: str) -> None:
    """Refuse a mask whose height and width differ from the image's, saying both sizes."""
    mh, mw = mask.shape[-2:]
    ih, iw = image.shape[1:3]
    if (mh, mw) != (ih, iw):
        raise NodeInputError(
            f"{node}: the mask is {mw}x{mh} but the image is {iw}x{ih}; "
            "give a mask of the image's size (resize it with an ImageScale node first)"
        )


def latent_size(width: int, height: int, factor: int, node: str) -> tuple[int, int]:
    """Pixel size -> latent size, refusing sizes that are not multiples of the VAE's factor."""
    if width % factor or height % factor:
        raise NodeInputError(
            f"{node}: {width}x{height} is not a multiple of the VAE's downscale factor {factor}; "
            f"use multiples of {factor}"
        )
    return width // factor, height // factor


# --- sampler progress ---------------------------------------------------------------------------


def step_reporter(ctx: NodeContext, total: int, model: Any = None) -> Any:
    """The sampler callback of a node: progress k of ``total`` per step, with a latent preview of
    the current x0 prediction (``ldmgraph.diffusion.preview``) on the steps the run wants one."""
    previewer: Any = None

    def report(state: dict[str, Any]) -> None:
        nonlocal previewer
        k = min(int(state["i"]) + 1, total)
        preview = None
        if ctx.wants_preview(k, total):
            if previewer is None:
                from ldmgraph.diffusion.preview import LatentPreviewer

                previewer = LatentPreviewer.for_model(model)
            preview = previewer(state["denoised"])
        ctx.progress(k, total, preview)

    return report
