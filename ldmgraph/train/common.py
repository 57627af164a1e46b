"""Shared training machinery: seeding, EMA, resumable safetensors checkpoints, image grids.

A checkpoint is a run folder holding ``checkpoint.safetensors`` (model, EMA and AdamW tensors;
never a pickle) and ``state.json`` (step, configuration). Every batch is a pure function of
(seed, step), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

_F = TypeVar("_F", bound=Callable[..., Any])


def restores_torch_threads(fn: _F) -> _F:
    """Run ``fn`` and then put torch's thread count back: the trainers pick their own count, and a
    library call must not leave the caller's process (a test run, a server) with another one, which
    would change CPU results in the last bits and break bit-for-bit re-runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one training step: the same (seed, step, stream) gives the same draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


class EMA:
    """Exponential moving average of a model's parameters (decay warms up as (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(
    folder: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write the run's checkpoint atomically (temporary names, then renames)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.shadow.items()})
    tensors.update(_optimizer_tensors(opt))
    tmp = folder / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "checkpoint.safetensors")
    state = {**state, "ema_updates": ema.updates}
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def load_checkpoint(
    folder: Path, model: nn.Module, ema: EMA | None = None, opt: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the state dict (with ``step``)."""
    path = folder / "checkpoint.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {folder} (expected {path.name}); train first or drop --resume")
    tensors = load_file(str(path))
    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.updates = int(state.get("ema_updates", 0))
    if opt is not None:
        _load_optimizer_tensors(opt, {k: v for k, v in tensors.items() if k.startswith("opt.")})
    return state


def prefixed_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose keys start with ``prefix``, the prefix removed; the
    others (a run's model and optimizer state, a bundled file's autoencoder) are not read."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def load_ema_weights(folder: Path, model: nn.Module) -> dict[str, Any]:
    """Load a run's EMA weights into ``model`` (for sampling, evaluation and export)."""
    model.load_state_dict(prefixed_tensors(folder / "checkpoint.safetensors", "ema."))
    return json.loads((folder / "state.json").read_text())


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """Save images [N, H, W, 3] (0..1) as one PNG grid, N padded up to a multiple of columns."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * h, columns * w, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)).save(path)


def to_model(images: np.ndarray) -> torch.Tensor:
    """Images [N, H, W, 3] in 0..1 -> tensor [N, 3, H, W] in -1..1 (the autoencoder's range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()


def to_images(x: torch.Tensor) -> np.ndarray:
    """Tensor [N, 3, H, W] in -1..1 -> images [N, H, W, 3] in 0..1 (clipped)."""
    return x.detach().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in 0..1, over the whole set (dB)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (the EMA does the averaging a decay would do)."""
    return base * min(1.0, (step + 1) / max(warmup, 1))


def train_loop(
    out: Path,
    model: nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    cfg: Any,
    state: dict[str, Any],
    loss_at: Callable[[int], torch.Tensor],
    *,
    resume: bool,
    progress: bool,
    desc: str,
    clip: bool = True,
    after_step: Callable[[int, bool, bool], None] | None = None,
) -> None:
    """The loop every trainer shares: resume from ``out``, then per step set the warm-up learning
    rate, take ``loss_at(step)``'s gradient (clipped to ``cfg.grad_clip`` when ``clip``), step AdamW
    and the EMA, and checkpoint every ``cfg.checkpoint_every`` steps, at the last step and when
    ``cfg.minutes`` of training have passed (then stop). ``after_step(done, saved, out_of_time)``
    runs after each step for what a trainer adds (sample grids, callbacks).

    ``cfg`` supplies ``steps``, ``lr``, ``warmup``, ``minutes``, ``checkpoint_every`` and, when
    clipping, ``grad_clip``; ``state`` is written to ``state.json`` with the step and seconds.
    """
    start, earlier = 0, 0.0  # earlier: training seconds of the segments before a resume
    if resume and (out / "checkpoint.safetensors").exists():
        loaded = load_checkpoint(out, model, ema, opt)
        start, earlier = int(loaded["step"]), float(loaded.get("seconds", 0.0))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, disable=not progress)
    t0 = time.time()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        out_of_time = cfg.minutes > 0 and time.time() - t0 > cfg.minutes * 60
        saved = done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time
        if saved:
            save_checkpoint(out, model, ema, opt, {**state, "step": done, "seconds": earlier + time.time() - t0})
        if after_step is not None:
            after_step(done, saved, out_of_time)
        if out_of_time:
            break
