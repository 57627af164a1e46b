"""Textual-inversion embeddings (Gal et al. 2022): learned input vectors that a prompt names as `embedding:name`.

A file holds one or more vectors of the text encoder's input width; the encoder puts them where the
prompt names them, in place of token embeddings (`ldmgraph.models.text_encoders`). Files live in an
`embeddings/` folder under each model folder (ComfyUI's layout) and come in the formats in use:

- Automatic1111 `.pt`: `{"string_to_param": {"*": [n, D]}, "name", "step", ...}`, read through the
  allow-list unpickler (`ldmgraph.models.safe_unpickle`: nothing in the file is executed);
- `.safetensors` with `emb_params` [n, D] (Automatic1111's safetensors form);
- SDXL `.safetensors` with `clip_l` [n, 768] and `clip_g` [n, 1280], one part per text encoder;
- diffusers' `learned_embeds.bin` / `.safetensors`: `{"<token>": [D] or [n, D]}`, one entry.

Only safetensors are read without the unpickler; pickled files never go through `torch.load`.
This module is torch-free (the server lists the folders without torch); reading the files, which
needs torch, is `ldmgraph.models.embedding_files`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ldmgraph.models.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

EMBEDDING_FOLDER = "embeddings"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth", ".ckpt")
ENCODER_PARTS = {"clip-l": "clip_l", "openclip-bigg": "clip_g", "openclip-g": "clip_g"}
"""Text encoder kind -> the part of an SDXL embedding file it reads."""


class EmbeddingError(ModelError):
    """An embedding file that cannot be used (unknown layout, wrong width for the text encoder)."""


@dataclass(frozen=True)
class Embedding:
    """The vectors of one embedding file: by part (`clip_l`, `clip_g`) for SDXL files, else under ""."""

    name: str
    parts: Mapping[str, Tensor]

    def vectors_for(self, width: int, kind: str = "") -> Tensor:
        """The [n, width] vectors for a text encoder of input width `width` (and `kind`, for SDXL files)."""
        part = ENCODER_PARTS.get(kind)
        if part in self.parts and self.parts[part].shape[-1] == width:
            return self.parts[part]
        fitting = [v for v in self.parts.values() if v.shape[-1] == width]
        if len(fitting) == 1:
            return fitting[0]
        widths = ", ".join(f"{k or 'vectors'} {v.shape[-1]}" for k, v in self.parts.items())
        raise EmbeddingError(
            self.name, f"its vectors have width {widths}, but the {kind or 'text'} encoder takes {width}: "
            "the embedding was trained for another model family"
        )


def _as_rows(value: Tensor) -> Tensor:
    return (value[None] if value.dim() == 1 else value).float()


def embedding_from_tensors(name: str, tensors: Mapping[str, Tensor]) -> Embedding:
    """Recognise one of the file layouts above from its (flattened, dot-joined) tensor names."""
    if "emb_params" in tensors:
        return Embedding(name, {"": _as_rows(tensors["emb_params"])})
    sdxl = {k: _as_rows(tensors[k]) for k in ("clip_l", "clip_g") if k in tensors}
    if sdxl:
        return Embedding(name, sdxl)
    a1111 = [k for k in tensors if k.startswith("string_to_param.")]
    if len(a1111) == 1:
        return Embedding(name, {"": _as_rows(tensors[a1111[0]])})
    if len(tensors) == 1:  # diffusers: {"<token>": vector(s)}
        (value,) = tensors.values()
        if value.dim() in (1, 2):
            return Embedding(name, {"": _as_rows(value)})
    keys = ", ".join(sorted(tensors)[:5]) or "none"
    raise EmbeddingError(name, f"not a textual-inversion embedding (tensors: {keys}); expected emb_params, "
                               "clip_l/clip_g, string_to_param (Automatic1111) or one token -> vector (diffusers)")


def embedding_folders(model_dirs: tuple[Path, ...] | list[Path]) -> list[Path]:
    return [Path(d) / EMBEDDING_FOLDER for d in model_dirs]


def find_embedding(name: str, model_dirs: tuple[Path, ...] | list[Path]) -> Path:
    """The file of `embedding:name` (extension optional) in the `embeddings/` folders of the model folders.

    Raises `UnsafePathError` for absolute names and `..`, `FileNotFoundError` listing what is there.
    """
    from ldmgraph.nodes.common import model_join

    for folder in embedding_folders(model_dirs):
        for candidate in (name, *(name + s for s in EMBEDDING_SUFFIXES)):
            path = model_join(folder, candidate)
            if path.is_file() and path.suffix in EMBEDDING_SUFFIXES:
                return path
    found = available_embeddings(model_dirs)
    where = ", ".join(str(f) for f in embedding_folders(model_dirs)) or "(no model folders)"
    raise FileNotFoundError(
        f"no embedding named {name!r} in {where}; available: {', '.join(found) or 'none'}. "
        "Put the file in an embeddings folder or correct the name after 'embedding:'"
    )


def available_embeddings(model_dirs: tuple[Path, ...] | list[Path]) -> list[str]:
    """The embedding names found (file names without extension, relative to their folder), sorted."""
    names: list[str] = []
    for folder in embedding_folders(model_dirs):
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(root).relative_to(folder)
            names += [(rel / Path(f).stem).as_posix().removeprefix("./") for f in files
                      if f.endswith(EMBEDDING_SUFFIXES)]
    return sorted(dict.fromkeys(names))
