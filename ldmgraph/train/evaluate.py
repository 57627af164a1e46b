"""``ldmgraph evaluate``: score the shipped models with the judge, as the issue's checks ask.

- ae_psnr: posterior-mode reconstructions of 1,000 test-split images (never trained on).
- color / shape / position: images generated from one-object captions of held-out combinations
  (never in training, as one object or in a pair), read back by the judge. Two-object captions
  (pairs of held-out combinations) are scored the same way and reported on the line before.
- sr_psnr_gain: PSNR of 16x16 -> 64x64 super-resolution minus that of PIL bicubic upsampling, for
  the super-resolution workflow's output: the model's image, then ImageMatchLowRes (4 steps of
  back-projection onto the low-resolution input). The model's image alone is logged too.
- inpaint_object: the centre box (32x32) is masked and the caption names a new object "in the
  centre"; the judge must read that colour and shape inside the hole. The decoded image is
  composited with the original pixels outside the mask (as a workflow's composite node does);
  inpaint_outside_delta is the mean absolute change outside the mask in 0..255 units after that.
- control_iou / control_colour: the bundled ControlNet on held-out silhouettes: IoU of the judge's
  shape mask with the silhouette, and how often the caption's colour is still read
  (``ldmgraph.train.controlnet.control_figures``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import restores_torch_threads
from .data.judge import read_in_box, score
from .data.scenes import ShapeSpec, batch
from .data.vocab import COLOURS, SHAPES, SIZES, held_out_combos
from .pool import CENTRE_BOX


@dataclass
class Figures:
    ae_psnr: float = float("nan")
    color: float = float("nan")
    shape: float = float("nan")
    position: float = float("nan")
    two_color: float = float("nan")
    two_shape: float = float("nan")
    two_position: float = float("nan")
    sr_psnr_gain: float = float("nan")
    sr_psnr: float = float("nan")
    sr_psnr_model_only: float = float("nan")
    bicubic_psnr: float = float("nan")
    inpaint_object: float = float("nan")
    inpaint_colour: float = float("nan")
    inpaint_outside_delta: float = float("nan")
    inpaint_outside_delta_raw: float = float("nan")
    control_iou: float = float("nan")
    control_colour: float = float("nan")

    def two_object_line(self) -> str:
        return f"two_object color={self.two_color:.3f} shape={self.two_shape:.3f} position={self.two_position:.3f}"

    def line(self) -> str:
        return (
            f"ae_psnr={self.ae_psnr:.2f} color={self.color:.3f} shape={self.shape:.3f} "
            f"position={self.position:.3f} sr_psnr_gain={self.sr_psnr_gain:.2f} "
            f"inpaint_object={self.inpaint_object:.3f} inpaint_outside_delta={self.inpaint_outside_delta:.3f} "
            f"control_iou={self.control_iou:.3f} control_colour={self.control_colour:.3f}"
        )


def _phrase(combo: tuple[str, str, str]) -> str:
    c, s, p = combo
    return ShapeSpec(c, s, p, "small", 0, 0, SIZES["small"]).phrase(with_size=False)


def one_object_prompts(n: int) -> list[tuple[tuple[str, str, str], str]]:
    """n (combo, caption) pairs cycling through the held-out combinations."""
    combos = held_out_combos()
    return [(combos[i % len(combos)], _phrase(combos[i % len(combos)])) for i in range(n)]


def two_object_prompts(n: int) -> list[tuple[list[tuple[str, str, str]], str]]:
    """n pairs of held-out combinations at opposite positions (left/right, top/bottom)."""
    combos = held_out_combos()
    opposite = {("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top")}
    pairs = [(a, b) for a, b in itertools.permutations(combos, 2) if (a[2], b[2]) in opposite]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(pairs), size=n, replace=len(pairs) < n)
    return [([pairs[k][0], pairs[k][1]], f"{_phrase(pairs[k][0])} and {_phrase(pairs[k][1])}") for k in picks]


def _mean_scores(images: np.ndarray, expected: list[list[tuple[str, str, str]]]) -> dict[str, float]:
    scores = [score(im, exp) for im, exp in zip(images, expected, strict=True)]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("colour", "shape", "position")}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def prompt_images(txt: Any, captions: list[str], steps: int = 20, cfg: float = 4.0, seed: int = 1234,
                  batch_size: int = 64) -> np.ndarray:
    """The images `evaluate` scores for these captions: chunk i of ``batch_size`` uses seed + i * batch_size."""
    from . import sampling

    return np.concatenate([
        sampling.txt2img(txt, chunk, seed=seed + i * batch_size, steps=steps, cfg=cfg)
        for i, chunk in enumerate(_chunks(captions, batch_size))
    ])


def two_object_figures(txt: Any, pairs: int = 128, steps: int = 20, cfg: float = 4.0, seed: int = 1234,
                       batch_size: int = 64, grid: Path | None = None) -> dict[str, float]:
    """Judge scores (colour, shape, position) of a text-to-image checkpoint on ``pairs`` two-object
    captions of held-out combinations (:func:`two_object_prompts`), drawn as :func:`prompt_images`."""
    from .common import save_grid

    prompts = two_object_prompts(pairs)
    images = prompt_images(txt, [p for _, p in prompts], steps, cfg, seed, batch_size)
    if grid is not None:
        save_grid(images[:32], grid)
    return _mean_scores(images, [c for c, _ in prompts])


@restores_torch_threads
def evaluate(models: Path, samples: int = 256, steps: int = 20, cfg: float = 4.0, seed: int = 1234,
             batch_size: int = 64, grid: Path | None = None, log: Any = print,
             only: tuple[str, ...] = ()) -> Figures:
    """Score the bundled checkpoints in folder ``models``; see the module docstring. ``only`` limits
    the run to some figure groups ("control" alone: the ControlNet's figures); CPU threads are the
    caller's (``ldmgraph evaluate --threads N``)."""
    from PIL import Image

    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.nodes.image_ops import ImageMatchLowRes

    from . import sampling
    from .autoencoder import reconstruction_psnr
    from .common import psnr, save_grid
    from .export import BUNDLED_NAMES

    figures = Figures()
    txt = load_checkpoint(models / BUNDLED_NAMES["ldm"])
    if "control" in only or not only:
        from .controlnet import control_figures

        figures.control_iou, figures.control_colour = control_figures(
            txt, models, samples, steps, cfg, seed, batch_size, log, grid)
        if only == ("control",):
            return figures

    # autoencoder
    n_ae = min(1000, max(100, 4 * samples))
    figures.ae_psnr = reconstruction_psnr(txt.vae.first_stage_model.float(), count=n_ae, data_seed=seed)
    log(f"autoencoder: PSNR {figures.ae_psnr:.2f} dB on {n_ae} test images")

    # text-to-image, one object
    prompts = one_object_prompts(samples)
    images = prompt_images(txt, [p for _, p in prompts], steps, cfg, seed, batch_size)
    s = _mean_scores(images, [[c] for c, _ in prompts])
    figures.color, figures.shape, figures.position = s["colour"], s["shape"], s["position"]
    log(f"txt2img one object ({samples} held-out captions): {s}")
    if grid is not None:
        save_grid(images[:64], grid)

    # text-to-image, two objects
    n_pairs = max(8, samples // 2)
    s2 = two_object_figures(txt, n_pairs, steps=steps, cfg=cfg, seed=seed, batch_size=batch_size,
                            grid=None if grid is None else grid.with_name(grid.stem + "_two" + grid.suffix))
    figures.two_color, figures.two_shape, figures.two_position = s2["colour"], s2["shape"], s2["position"]
    log(f"txt2img two objects ({n_pairs} captions of held-out pairs): {s2}")

    # super-resolution
    sr_path = models / BUNDLED_NAMES["superres"]
    if sr_path.exists():
        sr = load_checkpoint(sr_path, text_encoder=False)
        n_sr = max(8, samples // 2)
        truth, _ = batch(seed + 1, "test", 0, n_sr)
        low = sampling.lowres_of(truth)
        ups = np.concatenate([sampling.superres(sr, chunk, seed=seed, steps=steps) for chunk in low.split(batch_size)])
        low_pil = ((low.permute(0, 2, 3, 1).numpy() + 1) / 2 * 255).round().clip(0, 255).astype(np.uint8)
        bicubic = np.stack([
            np.asarray(Image.fromarray(im).resize((64, 64), Image.BICUBIC), np.float32) / 255 for im in low_pil
        ])
        matched = ImageMatchLowRes().run(
            ImageMatchLowRes.Inputs(image=ups, lowres=(low.permute(0, 2, 3, 1).numpy() + 1) / 2), None
        ).image
        figures.sr_psnr_model_only, figures.sr_psnr = psnr(truth, ups), psnr(truth, matched)
        figures.bicubic_psnr = psnr(truth, bicubic)
        figures.sr_psnr_gain = figures.sr_psnr - figures.bicubic_psnr
        log(f"superres: {figures.sr_psnr:.2f} dB ({figures.sr_psnr_model_only:.2f} dB before ImageMatchLowRes) "
            f"vs bicubic {figures.bicubic_psnr:.2f} dB ({n_sr} test images)")
        if grid is not None:  # rows: the truth, bicubic, the model, the model + ImageMatchLowRes
            save_grid(np.concatenate([truth[:8], bicubic[:8], ups[:8], matched[:8]]),
                      grid.with_name(grid.stem + "_superres" + grid.suffix))

    # inpainting
    inp_path = models / BUNDLED_NAMES["inpaint"]
    if inp_path.exists():
        inp = load_checkpoint(inp_path)
        n_inp = max(8, samples // 2)
        base, _ = batch(seed + 2, "test", 0, n_inp)
        rng = np.random.default_rng(seed)
        wants = [(list(COLOURS)[rng.integers(8)], SHAPES[rng.integers(3)]) for _ in range(n_inp)]
        captions = [_phrase((c, s, "centre")) for c, s in wants]
        mask = np.zeros((n_inp, 64, 64), np.float32)
        x0, y0, x1, y1 = CENTRE_BOX
        mask[:, y0:y1, x0:x1] = 1
        out = np.concatenate([
            sampling.inpaint(inp, base[i : i + batch_size], mask[i : i + batch_size], captions[i : i + batch_size],
                             seed=seed, steps=steps, cfg=cfg)
            for i in range(0, n_inp, batch_size)
        ])
        composite = out * mask[..., None] + base * (1 - mask[..., None])
        outside = (1 - mask[..., None]).astype(bool).repeat(3, -1)
        q = lambda a: np.round(np.clip(a, 0, 1) * 255)  # noqa: E731 - the saved PNG's 8-bit values
        figures.inpaint_outside_delta = float(np.abs(q(composite) - q(base))[outside].mean())
        figures.inpaint_outside_delta_raw = float(np.abs(q(out) - q(base))[outside].mean())
        hits, colour_hits = [], []
        for im, (c, s) in zip(composite, wants, strict=True):
            r = read_in_box(im, CENTRE_BOX)
            hits.append(r is not None and r.colour == c and r.shape == s)
            colour_hits.append(r is not None and r.colour == c)
        figures.inpaint_object, figures.inpaint_colour = float(np.mean(hits)), float(np.mean(colour_hits))
        log(f"inpaint: object {figures.inpaint_object:.3f} (colour alone {figures.inpaint_colour:.3f}), "
            f"outside delta {figures.inpaint_outside_delta:.3f} "
            f"(before compositing {figures.inpaint_outside_delta_raw:.3f}) on {n_inp} test images")
        if grid is not None:
            save_grid(np.concatenate([base[:8], composite[:8], base[8:16], composite[8:16]]),
                      grid.with_name(grid.stem + "_inpaint" + grid.suffix))
    return figures
