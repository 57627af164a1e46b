"""The training pool of the diffusion stages, computed once: latents, captions and their contexts.

The LDMs never run the encoders while they train (Rombach et al. 2022 train on fixed first-stage
latents too): a fixed pool of training-split scenes is encoded once into posterior means and
standard deviations (a latent is drawn from them at each step), low-resolution 16x16 images for
super-resolution, masks and masked-image latents for inpainting, and the MiniLM contexts of every
distinct caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .common import to_model
from .data.scenes import Scene, caption_of, render, scene_at
from .text import encode_captions, unique_index

TWO_OBJECT_PROB = 0.4


def pool_scenes(data_seed: int, count: int) -> list[Scene]:
    """The pool's scenes: training split (held-out combinations never appear)."""
    return [scene_at(data_seed, "train", i, two_object_prob=TWO_OBJECT_PROB) for i in range(count)]


def _box_around(cx: float, cy: float, half: float, margin: float = 3.0) -> tuple[int, int, int, int]:
    x0 = int(max(0, np.floor((cx - half - margin) / 4) * 4))
    y0 = int(max(0, np.floor((cy - half - margin) / 4) * 4))
    x1 = int(min(64, np.ceil((cx + half + margin) / 4) * 4))
    y1 = int(min(64, np.ceil((cy + half + margin) / 4) * 4))
    return x0, y0, x1, y1


CENTRE_BOX = (16, 16, 48, 48)  # the hole of the inpainting evaluation (pixels, x0 y0 x1 y1)


def inpaint_task(scene: Scene, data_seed: int, index: int) -> tuple[tuple[int, int, int, int], str]:
    """The mask (a box on the 4-pixel latent grid) and caption of one inpainting example.

    Half the time the box covers one shape and the caption names only that shape (what a user
    asks when repainting an object); otherwise the centre box or a random box, with the full caption.
    """
    rng = np.random.default_rng([data_seed, 7, index])
    u = rng.random()
    if u < 0.5:
        spec = scene.shapes[int(rng.integers(len(scene.shapes)))]
        with_size = bool(rng.random() < 0.5)
        return _box_around(spec.cx, spec.cy, spec.half), caption_of([spec], [with_size])
    if u < 0.7:
        return CENTRE_BOX, scene.caption
    w, h = (int(v) * 4 for v in rng.integers(3, 12, size=2))
    x0, y0 = int(rng.integers(0, (64 - w) // 4 + 1)) * 4, int(rng.integers(0, (64 - h) // 4 + 1)) * 4
    return (x0, y0, x0 + w, y0 + h), scene.caption


def build_contexts(out: Path, data_seed: int, count: int, inpaint_count: int) -> Path:
    """Encode every distinct caption of the pool (ldm and inpaint) with MiniLM, once."""
    scenes = pool_scenes(data_seed, count)
    captions = [s.caption for s in scenes]
    inpaint_captions = [inpaint_task(s, data_seed, i)[1] for i, s in enumerate(scenes[:inpaint_count])]
    table, index = unique_index(captions + inpaint_captions)
    contexts = encode_captions(table)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"contexts": contexts.contiguous(), "caption_index": index[:count].contiguous(),
         "inpaint_caption_index": index[count:].contiguous()},
        str(out / "contexts.safetensors"),
        metadata={"captions": json.dumps(table), "data_seed": str(data_seed)},
    )
    return out


@torch.no_grad()
def build_latents(ae: torch.nn.Module, out: Path, data_seed: int, count: int, inpaint_count: int,
                  batch: int = 100, part: tuple[int, int] | None = None) -> Path:
    """Encode the pool: posterior mean/std [N, 4, 16, 16], LR images [N, 3, 16, 16] (-1..1),
    inpainting masks [M, 1, 16, 16] and masked-image latent means [M, 4, 16, 16].

    ``part`` = (k, parts) encodes only the k-th of ``parts`` equal ranges into
    ``latents.part{k}.safetensors`` (run parts in parallel, then :func:`merge_parts`).
    """
    ae.eval()
    scenes = pool_scenes(data_seed, count)
    means, stds, lows, masks, masked = [], [], [], [], []
    first, stop = 0, count
    if part is not None:
        size = -(-count // part[1])
        first, stop = part[0] * size, min(count, (part[0] + 1) * size)
    for start in tqdm(range(first, stop, batch), desc="encode pool"):
        chunk = scenes[start : min(start + batch, stop)]
        x = to_model(np.stack([render(s) for s in chunk]))
        posterior = ae.encode(x)
        means.append(posterior.mean.clone())
        stds.append(posterior.std.clone())
        lows.append(torch.nn.functional.avg_pool2d(x, 4))
        n_inp = max(0, min(len(chunk), inpaint_count - start))
        if n_inp:
            m = torch.zeros(n_inp, 1, 64, 64)
            for j in range(n_inp):
                x0, y0, x1, y1 = inpaint_task(chunk[j], data_seed, start + j)[0]
                m[j, :, y0:y1, x0:x1] = 1.0
            masks.append(torch.nn.functional.max_pool2d(m, 4))
            masked.append(ae.encode(x[:n_inp] * (1 - m)).mean.clone())
    out.mkdir(parents=True, exist_ok=True)
    empty = torch.zeros(0, 1, 16, 16), torch.zeros(0, 4, 16, 16)
    save_file(
        {"mean": torch.cat(means), "std": torch.cat(stds), "lowres": torch.cat(lows).contiguous(),
         "inpaint_mask": torch.cat(masks) if masks else empty[0],
         "inpaint_masked": torch.cat(masked) if masked else empty[1]},
        str(out / ("latents.safetensors" if part is None else f"latents.part{part[0]}.safetensors")),
        metadata={"data_seed": str(data_seed), "count": str(count)},
    )
    return out


def merge_parts(out: Path, parts: int) -> None:
    """Join ``latents.part*.safetensors`` (in order) into ``latents.safetensors``."""
    loaded = [load_file(str(out / f"latents.part{k}.safetensors")) for k in range(parts)]
    save_file({key: torch.cat([p[key] for p in loaded]).contiguous() for key in loaded[0]},
              str(out / "latents.safetensors"))


def load_pool(folder: Path) -> dict[str, object]:
    """Both pool files as one dict of tensors, plus ``captions`` (the distinct captions)."""
    pool: dict[str, object] = dict(load_file(str(folder / "latents.safetensors")))
    pool.update(load_file(str(folder / "contexts.safetensors")))
    from safetensors import safe_open

    with safe_open(str(folder / "contexts.safetensors"), "pt") as f:
        pool["captions"] = json.loads(f.metadata()["captions"])
    return pool
