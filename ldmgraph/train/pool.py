"""The training pool of the diffusion stages, computed once: latents, captions and their contexts.

The LDMs never run the encoders while they train (Rombach et al. 2022 train on fixed first-stage
latents too): a fixed pool of training-split scenes is encoded once into posterior means and
standard deviations (a latent is drawn from them at each step), low-resolution 16x16 images for
super-resolution, and the MiniLM contexts of every distinct caption. Inpainting has its own file
(``inpaint.safetensors``): each example's target latent, mask and masked-image latent, because a
"replace" example's target is not the scene it starts from (see :func:`inpaint_task`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .common import to_model
from .data.scenes import JITTER, SIZE_JITTER, Scene, ShapeSpec, caption_of, render, scene_at
from .data.vocab import POSITIONS, SIZES, train_combos
from .text import encode_captions, unique_index

TWO_OBJECT_PROB = 0.4


def pool_scenes(data_seed: int, count: int, two_object_prob: float = TWO_OBJECT_PROB) -> list[Scene]:
    """The pool's scenes: training split (held-out combinations never appear); ``two_object_prob``
    of them hold two shapes."""
    return [scene_at(data_seed, "train", i, two_object_prob=two_object_prob) for i in range(count)]


Box = tuple[int, int, int, int]  # pixels, x0 y0 x1 y1


def _box_around(cx: float, cy: float, half: float, margin: float = 3.0) -> Box:
    x0 = int(max(0, np.floor((cx - half - margin) / 4) * 4))
    y0 = int(max(0, np.floor((cy - half - margin) / 4) * 4))
    x1 = int(min(64, np.ceil((cx + half + margin) / 4) * 4))
    y1 = int(min(64, np.ceil((cy + half + margin) / 4) * 4))
    return x0, y0, x1, y1


CENTRE_BOX: Box = (16, 16, 48, 48)  # the hole of the inpainting evaluation
# the share of each kind of inpainting example (the rest: a box around one shape, that shape's caption)
REPLACE_PROB = 0.55
FULL_CAPTION_PROB = 0.15
# bumped whenever inpaint_task changes: the contexts and the inpainting latents must come from the same tasks
INPAINT_TASKS_VERSION = "2"


@dataclass(frozen=True)
class InpaintTask:
    """One inpainting example: the hole (pixels, on the 4-pixel latent grid), the caption and,
    for a "replace" example, the new shape that the hole must show on the background alone."""

    box: Box
    caption: str
    new_shape: ShapeSpec | None = None


def _nearest_position(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def _random_box(rng: np.random.Generator, low: int, high: int) -> Box:
    """A box of (low..high-1) x (low..high-1) latent pixels (4 image pixels each) anywhere on the image."""
    w, h = (int(v) * 4 for v in rng.integers(low, high, size=2))
    x0, y0 = int(rng.integers(0, (64 - w) // 4 + 1)) * 4, int(rng.integers(0, (64 - h) // 4 + 1)) * 4
    return x0, y0, x0 + w, y0 + h


def _replace_task(rng: np.random.Generator) -> InpaintTask:
    """A box (the evaluation's centre box half the time) holding one new training-combination shape.

    The shape fits inside the box with a margin, so its anti-aliased edge never leaves the hole.
    """
    box = CENTRE_BOX if rng.random() < 0.5 else _random_box(rng, 4, 11)  # 16..40 pixels
    x0, y0, x1, y1 = box
    bx, by, room = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2 - 2.0
    position = _nearest_position(bx, by)
    combos = [c for c in train_combos() if c[2] == position]
    colour, shape, _ = combos[int(rng.integers(len(combos)))]
    size = "large" if room >= SIZES["large"] + SIZE_JITTER and rng.random() < 0.5 else "small"
    half = min(SIZES[size] + float(rng.uniform(-SIZE_JITTER, SIZE_JITTER)), room)
    slack = min(JITTER, room - half)
    dx, dy = rng.uniform(-slack, slack, size=2)
    spec = ShapeSpec(colour, shape, position, size, float(bx + dx), float(by + dy), float(half))
    return InpaintTask(box, caption_of([spec], [bool(rng.random() < 0.5)]), spec)


def inpaint_task(scene: Scene, data_seed: int, index: int) -> InpaintTask:
    """The hole and caption of inpainting example ``index`` (a pure function of its arguments).

    - "replace" (REPLACE_PROB): a box, the centre box half the time, is cleared to the background
      and one new shape is drawn in it; the caption names only that shape. Shapes of the scene
      that the box cuts stay cut: what a user means by "put a red circle here".
    - a box around one shape of the scene with a random margin, the caption naming only that shape
      (repainting an object in place);
    - (FULL_CAPTION_PROB) the centre box or a random box with the scene's whole caption.
    """
    rng = np.random.default_rng([data_seed, 7, index])
    u = rng.random()
    if u < REPLACE_PROB:
        return _replace_task(rng)
    if u < 1.0 - FULL_CAPTION_PROB:
        spec = scene.shapes[int(rng.integers(len(scene.shapes)))]
        margin = float(rng.uniform(2.0, 8.0))
        return InpaintTask(_box_around(spec.cx, spec.cy, spec.half, margin),
                           caption_of([spec], [bool(rng.random() < 0.5)]))
    return InpaintTask(CENTRE_BOX if rng.random() < 0.4 else _random_box(rng, 3, 12), scene.caption)


def inpaint_truth(scene: Scene, task: InpaintTask) -> np.ndarray:
    """The image the model must produce for ``task``: the scene, with a replace task's box redrawn
    as the scene's background plus the new shape only."""
    image = render(scene)
    if task.new_shape is not None:
        x0, y0, x1, y1 = task.box
        filled = render(Scene(scene.background, (task.new_shape,), ""))
        image[y0:y1, x0:x1] = filled[y0:y1, x0:x1]
    return image


def build_contexts(out: Path, data_seed: int, count: int, inpaint_count: int,
                   two_object_prob: float = TWO_OBJECT_PROB) -> Path:
    """Encode every distinct caption of the pool (ldm and inpaint) with MiniLM, once."""
    scenes = pool_scenes(data_seed, count, two_object_prob)
    captions = [s.caption for s in scenes]
    inpaint_captions = [inpaint_task(s, data_seed, i).caption
                        for i, s in enumerate(pool_scenes(data_seed, inpaint_count))]
    table, index = unique_index(captions + inpaint_captions)
    contexts = encode_captions(table)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"contexts": contexts.contiguous(), "caption_index": index[:count].contiguous(),
         "inpaint_caption_index": index[count:].contiguous()},
        str(out / "contexts.safetensors"),
        metadata={"captions": json.dumps(table), "data_seed": str(data_seed), "inpaint_count": str(inpaint_count),
                  "inpaint_tasks": INPAINT_TASKS_VERSION, "two_object_prob": str(two_object_prob)},
    )
    return out


def clause_contexts(folder: Path, captions: list[str], clause_tokens: int, batch: int = 256,
                    progress: bool = True) -> torch.Tensor:
    """The clause tokens [captions, clause_tokens, 384] of the pool's caption table (``load_pool``'s
    ``captions``): one pooled MiniLM vector per clause of each caption
    (`ldmgraph.models.text_encoders.split_clauses`), encoded once into ``clauses{K}.safetensors`` beside
    the contexts (written atomically) and read from there afterwards."""
    from ldmgraph.models.single_file import write_state_dict
    from ldmgraph.models.text_encoders import encode_minilm_clauses

    path = folder / f"clauses{clause_tokens}.safetensors"
    if path.exists():
        tokens = load_file(str(path))["clause_contexts"]
        if tokens.shape[0] == len(captions):
            return tokens
    parts = [encode_minilm_clauses(captions[i : i + batch], clause_tokens)
             for i in tqdm(range(0, len(captions), batch), desc="clause tokens", disable=not progress)]
    tokens = torch.cat(parts).float().contiguous()
    write_state_dict(path, {"clause_contexts": tokens}, {})
    return tokens


def _part_range(count: int, part: tuple[int, int] | None) -> tuple[int, int]:
    if part is None:
        return 0, count
    size = -(-count // part[1])
    return part[0] * size, min(count, (part[0] + 1) * size)


@torch.no_grad()
def build_latents(ae: torch.nn.Module, out: Path, data_seed: int, count: int,
                  batch: int = 100, part: tuple[int, int] | None = None,
                  two_object_prob: float = TWO_OBJECT_PROB) -> Path:
    """Encode the text-to-image / super-resolution pool: posterior mean/std [N, 4, 16, 16] and
    low-resolution images [N, 3, 16, 16] (-1..1), into ``latents.safetensors``.

    ``part`` = (k, parts) encodes only the k-th of ``parts`` equal ranges into
    ``latents.part{k}.safetensors`` (run parts in parallel, then :func:`merge_parts`).
    """
    ae.eval()
    scenes = pool_scenes(data_seed, count, two_object_prob)
    means, stds, lows = [], [], []
    first, stop = _part_range(count, part)
    for start in tqdm(range(first, stop, batch), desc="encode pool"):
        x = to_model(np.stack([render(s) for s in scenes[start : min(start + batch, stop)]]))
        posterior = ae.encode(x)
        means.append(posterior.mean.clone())
        stds.append(posterior.std.clone())
        lows.append(torch.nn.functional.avg_pool2d(x, 4))
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"mean": torch.cat(means), "std": torch.cat(stds), "lowres": torch.cat(lows).contiguous()},
        str(out / ("latents.safetensors" if part is None else f"latents.part{part[0]}.safetensors")),
        metadata={"data_seed": str(data_seed), "count": str(count), "two_object_prob": str(two_object_prob)},
    )
    return out


@torch.no_grad()
def build_inpaint_latents(ae: torch.nn.Module, out: Path, data_seed: int, count: int, batch: int = 100,
                          part: tuple[int, int] | None = None) -> Path:
    """Encode the inpainting examples into ``inpaint.safetensors``: the target's posterior
    mean/std [M, 4, 16, 16], the mask [M, 1, 16, 16] (1 = repaint) and the masked image's latent
    mean [M, 4, 16, 16] (the image with the hole set to 0 in -1..1, as the sampler encodes it)."""
    ae.eval()
    scenes = pool_scenes(data_seed, count)
    means, stds, masks, masked = [], [], [], []
    first, stop = _part_range(count, part)
    for start in tqdm(range(first, stop, batch), desc="encode inpainting pool"):
        index = range(start, min(start + batch, stop))
        tasks = [inpaint_task(scenes[i], data_seed, i) for i in index]
        x = to_model(np.stack([inpaint_truth(scenes[i], t) for i, t in zip(index, tasks, strict=True)]))
        m = torch.zeros(len(tasks), 1, 64, 64)
        for j, task in enumerate(tasks):
            x0, y0, x1, y1 = task.box
            m[j, :, y0:y1, x0:x1] = 1.0
        posterior = ae.encode(x)
        means.append(posterior.mean.clone())
        stds.append(posterior.std.clone())
        masks.append(torch.nn.functional.max_pool2d(m, 4))
        masked.append(ae.encode(x * (1 - m)).mean.clone())
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"inpaint_mean": torch.cat(means), "inpaint_std": torch.cat(stds), "inpaint_mask": torch.cat(masks),
         "inpaint_masked": torch.cat(masked)},
        str(out / ("inpaint.safetensors" if part is None else f"inpaint.part{part[0]}.safetensors")),
        metadata={"data_seed": str(data_seed), "count": str(count), "inpaint_tasks": INPAINT_TASKS_VERSION},
    )
    return out


def merge_parts(out: Path, parts: int, name: str = "latents") -> None:
    """Join ``<name>.part*.safetensors`` (in order) into ``<name>.safetensors``."""
    from safetensors import safe_open

    files = [out / f"{name}.part{k}.safetensors" for k in range(parts)]
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata()
    loaded = [load_file(str(path)) for path in files]
    save_file({key: torch.cat([p[key] for p in loaded]).contiguous() for key in loaded[0]},
              str(out / f"{name}.safetensors"), metadata=metadata)


def contexts_inpaint_version(folder: Path) -> str | None:
    """The inpainting task version the pool's contexts were built for (None: older, or no contexts)."""
    from safetensors import safe_open

    path = folder / "contexts.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("inpaint_tasks")


def load_pool(folder: Path) -> dict[str, object]:
    """The pool's files (latents, inpainting examples where built, contexts) as one dict of
    tensors, plus ``captions`` (the distinct captions)."""
    from safetensors import safe_open

    pool: dict[str, object] = dict(load_file(str(folder / "latents.safetensors")))
    pool.update(load_file(str(folder / "contexts.safetensors")))
    with safe_open(str(folder / "contexts.safetensors"), "pt") as f:
        meta = f.metadata()
    pool["captions"] = json.loads(meta["captions"])
    inpaint = folder / "inpaint.safetensors"
    if inpaint.exists():
        with safe_open(str(inpaint), "pt") as f:
            version = f.metadata().get("inpaint_tasks")
        if version != meta.get("inpaint_tasks"):
            raise ValueError(f"{inpaint} and {folder / 'contexts.safetensors'} come from different inpainting "
                             "tasks; delete both and let 'ldmgraph train inpaint' rebuild them")
        pool.update(load_file(str(inpaint)))
        if len(pool["inpaint_caption_index"]) < len(pool["inpaint_mean"]):  # type: ignore[arg-type]
            raise ValueError(f"{folder / 'contexts.safetensors'} has captions for fewer inpainting examples than "
                             f"{inpaint}; build both with the same --inpaint-size")
    return pool
