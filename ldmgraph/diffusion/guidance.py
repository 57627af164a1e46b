"""Classifier-free guidance over lists of conditioning entries, and the inpainting noise mask.

CFG (Ho & Salimans 2022): D = D_uncond + cfg * (D_cond - D_uncond), with the cond and uncond
passes stacked into one batch; at cfg == 1 the uncond pass is skipped (D = D_cond).
Several entries on one side are combined as ComfyUI does: each entry's prediction covers its
area (h, w, y, x) and is weighted by strength * mask there; the side's prediction is the
weighted sum divided by the summed weights. An area without a mask fades in over its first
FEATHER latent pixels from each edge that lies inside the image (weights 1/8, 2/8, ..., 8/8, as
ComfyUI's area conditioning does; edges on the image border keep full weight), so overlapping
areas cross-fade instead of meeting at a hard seam. Where no positive entry covers a pixel, the
negative prediction is used there (no guidance) instead of a zero latent.

Entries reach the network by route (`ldmgraph.conditioners.CondEntry`): context, concat and vector
are batched across the entries of one call; control contributions are passed on as they are
(entries with the same control stack share a call). An entry limited to start..end percent of the
schedule takes part only while sigma lies in that range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmgraph.diffusion.denoiser import Denoiser
from ldmgraph.diffusion.errors import DiffusionError
from ldmgraph.diffusion.values import CondEntry


def _fit_batch(value: Tensor, batch: int, what: str) -> Tensor:
    """Broadcast a conditioning tensor's batch to the latent batch (1 -> B, or repeat B/b times)."""
    if value.shape[0] == batch:
        return value
    if batch % value.shape[0] == 0:
        return (
            value.repeat_interleave(batch // value.shape[0], dim=0)
            if value.shape[0] > 1
            else value.expand(batch, *value.shape[1:])
        )
    raise DiffusionError(
        f"conditioning {what} has batch {value.shape[0]} but the latent has batch {batch}; "
        "use one conditioning per image or a single one for all"
    )


@dataclass
class _Piece:
    """One conditioning entry prepared for a latent of a given shape."""

    side: int  # 0 = positive, 1 = negative
    region: tuple[slice, slice]
    weight: Tensor | float  # [B or 1, 1, h_a, w_a] or a scalar
    context: Tensor | None
    concat: Tensor | None
    vector: Tensor | None
    control: tuple
    span: tuple[float, float]  # start / end percent of the schedule

    def key(self) -> tuple:
        """Pieces with equal keys run in one batched network call."""
        hw = (self.region[0].stop - self.region[0].start, self.region[1].stop - self.region[1].start)
        return (
            hw,
            tuple(id(c) for c in self.control),
            *(None if v is None else tuple(v.shape[1:]) for v in (self.context, self.concat, self.vector)),
        )


FEATHER = 8
"""Latent pixels over which an unmasked area's weight ramps up from each edge inside the image."""


def area_feather(region: tuple[slice, slice], height: int, width: int) -> Tensor | None:
    """The weight [1, 1, h, w] of an unmasked area: a linear ramp 1/FEATHER .. 1 over the first
    FEATHER rows / columns from each of its edges that lie inside the image (ComfyUI's rule; the
    ramps of opposite edges multiply where they meet); None when every edge is on the border."""
    rows, cols = region
    h, w = rows.stop - rows.start, cols.stop - cols.start
    ramp = torch.arange(1, FEATHER + 1, dtype=torch.float32) / FEATHER

    def along(n: int, inner_start: bool, inner_end: bool) -> Tensor:
        weight = torch.ones(n)
        k = min(FEATHER, n)
        if inner_start:
            weight[:k] *= ramp[:k]
        if inner_end:
            weight[n - k :] *= ramp[:k].flip(0)
        return weight

    if rows.start == 0 and rows.stop == height and cols.start == 0 and cols.stop == width:
        return None
    ys = along(h, rows.start > 0, rows.stop < height)
    xs = along(w, cols.start > 0, cols.stop < width)
    return (ys[:, None] * xs[None, :])[None, None]


def _prepare(entry: CondEntry, side: int, x: Tensor, pooled_as_vector: bool = False, layout: Any = None) -> _Piece:
    """One entry's inputs for latents shaped like x. With `pooled_as_vector` (a U-Net whose `y` is a
    pooled text vector, ``num_classes="sequential"``), a text entry's pooled vector is its vector
    route unless a conditioner gave one. A U-Net with a `vector_layout` (SDXL) builds its `y` from
    the entry's pooled vector and vector contribution, which may be lazy (sizes default to the
    latent's, `ldmgraph.models.sdxl.MicroConditioning`)."""
    batch, _, height, width = x.shape
    if entry.area is None:
        region = (slice(0, height), slice(0, width))
    else:
        h, w, y, xo = (int(v) for v in entry.area)
        y, xo = min(max(y, 0), height - 1), min(max(xo, 0), width - 1)
        region = (slice(y, min(y + max(h, 1), height)), slice(xo, min(xo + max(w, 1), width)))
    weight: Tensor | float = float(entry.strength)
    if entry.mask is not None:
        mask = entry.mask.to(x.device, torch.float32)
        mask = mask.reshape(-1, 1, *mask.shape[-2:])
        if mask.shape[-2:] != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        weight = mask[..., region[0], region[1]] * float(entry.strength)
    elif entry.area is not None:
        feather = area_feather(region, height, width)
        if feather is not None:
            weight = feather.to(x.device) * float(entry.strength)
    device = x.device
    concat = None
    if entry.concat is not None:
        concat = _fit_batch(entry.concat.to(device, x.dtype), batch, "concat")
        if concat.shape[-2:] != (height, width):
            raise DiffusionError(
                f"concat conditioning is {tuple(concat.shape[-2:])} but the latent is {(height, width)}; "
                "encode the conditioning image at the latent's size"
            )
        concat = concat[..., region[0], region[1]]
    if layout is not None:
        vector = layout.vector(entry.pooled, entry.vector, (height, width), side == 1)
    else:
        vector = entry.vector if entry.vector is not None or not pooled_as_vector else entry.pooled
    vector = None if vector is None else _fit_batch(vector.to(device), batch, "vector")
    context = None if entry.context is None else _fit_batch(entry.context.to(device), batch, "context")
    span = (float(entry.start_percent), float(entry.end_percent))
    return _Piece(side, region, weight, context, concat, vector, tuple(entry.control), span)


def _stack(values: list[Tensor | None]) -> Tensor | None:
    return None if values[0] is None else torch.cat(values)  # type: ignore[arg-type]


@dataclass
class _Group:
    """Pieces that run in one network call, with their inputs concatenated once."""

    members: list[int]
    regions: list[tuple[slice, slice]]
    full: bool
    context: Tensor | None
    concat: Tensor | None
    vector: Tensor | None
    control: tuple


@dataclass
class _Plan:
    pieces: list[_Piece]
    groups: list[_Group]
    simple: bool  # one full-size, unmasked entry per side: plain CFG, no weighting


class CFGDenoiser:
    """x0 = D(x, sigma) guided by positive and negative conditioning; what samplers call."""

    def __init__(
        self,
        denoiser: Denoiser,
        positive: Sequence[CondEntry],
        negative: Sequence[CondEntry],
        cfg: float,
    ) -> None:
        if not positive:
            raise DiffusionError("positive conditioning is empty; connect at least one CONDITIONING entry")
        self.denoiser = denoiser
        self.positive = list(positive)
        self.negative = list(negative) if cfg != 1.0 else []
        if cfg != 1.0 and not self.negative:
            raise DiffusionError(
                f"cfg is {cfg} but the negative conditioning is empty; connect one or set cfg 1"
            )
        self.cfg = float(cfg)
        self.noise_schedule = denoiser.noise_schedule
        self._plans: dict[tuple, _Plan] = {}
        # which entries take part depends only on the conditioning when none has a schedule range
        everywhere = all(e.start_percent <= 0.0 and e.end_percent >= 1.0 for e in (*self.positive, *self.negative))
        self._all_active = (tuple(range(len(self.positive))), tuple(range(len(self.negative)))) if everywhere else None
        unet = getattr(denoiser.model, "diffusion_model", None)
        self._pooled_as_vector = getattr(unet, "num_classes", None) == "sequential"
        self._vector_layout = getattr(unet, "vector_layout", None)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        active = self._all_active or self._active(float(sigma.reshape(-1)[0]))
        plan = self._plan(x, active)
        preds = self._run(plan, x, sigma)
        if plan.simple:
            cond = preds[0]
            return cond if not self.negative else torch.lerp(preds[1], cond, self.cfg)
        cond, covered = self._combine(plan.pieces, preds, 0, x)
        if not self.negative:
            return cond
        uncond, _ = self._combine(plan.pieces, preds, 1, x)
        guided = torch.lerp(uncond, cond, self.cfg)  # uncond + cfg * (cond - uncond)
        return guided if covered is None else torch.where(covered, guided, uncond)

    def _active(self, sigma: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Indices of the entries of each side whose schedule range holds sigma (all of a side's
        entries when none does, so that a side is never empty)."""
        sides = []
        for entries in (self.positive, self.negative):
            inside = tuple(
                i for i, e in enumerate(entries) if self.denoiser.in_range(e.start_percent, e.end_percent, sigma)
            )
            sides.append(inside or tuple(range(len(entries))))
        return sides[0], sides[1]

    def _plan(self, x: Tensor, active: tuple[tuple[int, ...], tuple[int, ...]]) -> _Plan:
        """Pieces and batched network inputs for latents of x's shape and the active entries
        (built once per shape and set of entries)."""
        key = (x.shape, x.device, x.dtype, active)
        if key not in self._plans:
            positive = [self.positive[i] for i in active[0]]
            negative = [self.negative[i] for i in active[1]]
            pooled = self._pooled_as_vector
            layout = self._vector_layout
            pieces = [_prepare(e, 0, x, pooled, layout) for e in positive] + [
                _prepare(e, 1, x, pooled, layout) for e in negative
            ]
            by_key: dict[tuple, list[int]] = {}
            for index, piece in enumerate(pieces):
                by_key.setdefault(piece.key(), []).append(index)
            everywhere = (slice(0, x.shape[-2]), slice(0, x.shape[-1]))
            groups = []
            for members in by_key.values():
                chosen = [pieces[i] for i in members]
                groups.append(
                    _Group(
                        members=members,
                        regions=[p.region for p in chosen],
                        full=all(p.region == everywhere for p in chosen),
                        context=_stack([p.context for p in chosen]),
                        concat=_stack([p.concat for p in chosen]),
                        vector=_stack([p.vector for p in chosen]),
                        control=chosen[0].control,
                    )
                )
            simple = (
                len(positive) == 1
                and len(negative) <= 1
                and all(p.region == everywhere and not isinstance(p.weight, Tensor) for p in pieces)
            )
            self._plans[key] = _Plan(pieces, groups, simple)
        return self._plans[key]

    def _run(self, plan: _Plan, x: Tensor, sigma: Tensor) -> list[Tensor]:
        """Network calls, one per group of pieces with equal shapes (cond + uncond batched)."""
        preds: list[Tensor] = [x] * len(plan.pieces)
        for group in plan.groups:
            n = len(group.members)
            if group.full:
                xs = x if n == 1 else torch.cat([x] * n)
            else:
                xs = torch.cat([x[..., rows, cols] for rows, cols in group.regions])
            # sigma stays per image: the denoiser repeats it over the n stacked pieces
            out = self.denoiser(
                xs, sigma, context=group.context, concat=group.concat, y=group.vector, control=group.control
            )
            for i, part in zip(group.members, out.chunk(n), strict=True):
                preds[i] = part
        return preds

    @staticmethod
    def _combine(
        pieces: list[_Piece], preds: list[Tensor], side: int, x: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Weighted average of one side's predictions; also where any entry covers (None = all)."""
        chosen = [(p, d) for p, d in zip(pieces, preds, strict=True) if p.side == side]
        full = all(p.region == (slice(0, x.shape[-2]), slice(0, x.shape[-1])) for p, _ in chosen)
        if len(chosen) == 1 and full and not isinstance(chosen[0][0].weight, Tensor):
            return chosen[0][1], None
        total = torch.zeros_like(x)
        count = torch.zeros_like(x[:, :1])
        for piece, pred in chosen:
            rows, cols = piece.region
            total[..., rows, cols] += pred * piece.weight
            count[..., rows, cols] += piece.weight
        covered = count > 0
        return total / count.clamp_min(1e-8), (None if bool(covered.all()) else covered)


class InpaintDenoiser:
    """Keeps the known latent outside the noise mask (1 = repaint).

    Before each call the region outside the mask is replaced by the known latent re-noised to the
    current sigma (known + noise * sigma, with the run's own starting noise), and the prediction
    there is the known latent, so the sampler only changes the masked region.
    """

    def __init__(self, inner: CFGDenoiser, known: Tensor, noise: Tensor, mask: Tensor) -> None:
        self.inner = inner
        self.known = known
        self.noise = noise
        self.mask = mask
        self.noise_schedule = inner.noise_schedule

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma.reshape(-1)[0])
        keep = 1.0 - self.mask
        x = x * self.mask + (self.known + self.noise * s) * keep
        return self.inner(x, sigma) * self.mask + self.known * keep
