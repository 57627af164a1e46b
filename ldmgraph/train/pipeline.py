"""The stages between training runs: the latent pool, the scale factor, exports and sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .common import restores_torch_threads
from .export import BUNDLED_NAMES, export_bundled, load_autoencoder
from .pool import TWO_OBJECT_PROB, build_inpaint_latents, build_latents, load_pool


def scale_factor_of(pool: dict[str, Any], seed: int = 0) -> float:
    """1 / std of sampled training latents (Rombach et al. 2022, App. G: unit-variance latents)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = pool["mean"], pool["std"]
    z = mean + std * torch.randn(mean.shape, generator=g)
    return float(1.0 / z.std())


@restores_torch_threads
def prepare_pool(ae_folder: Path, pool_folder: Path, data_seed: int, count: int, inpaint_count: int,
                 threads: int = 1, two_object_prob: float = TWO_OBJECT_PROB) -> float:
    """Encode the pool with the trained autoencoder; write and return its scale factor."""
    torch.set_num_threads(threads)
    ae, _ = load_autoencoder(ae_folder)
    build_latents(ae, pool_folder, data_seed, count, two_object_prob=two_object_prob)
    build_inpaint_latents(ae, pool_folder, data_seed, inpaint_count)
    scale = scale_factor_of(dict(load_pool_latents(pool_folder)))
    (pool_folder / "scale_factor.json").write_text(json.dumps({"scale_factor": scale}))
    return scale


@restores_torch_threads
def prepare_inpaint_pool(ae_folder: Path, pool_folder: Path, data_seed: int, inpaint_count: int,
                         threads: int = 1) -> None:
    """(Re)build only the inpainting examples of an existing pool (same autoencoder)."""
    torch.set_num_threads(threads)
    ae, _ = load_autoencoder(ae_folder)
    build_inpaint_latents(ae, pool_folder, data_seed, inpaint_count)


def load_pool_latents(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "latents.safetensors"))


def read_scale_factor(pool_folder: Path, init_from: Path | None = None) -> float:
    """The pool's latent scale factor, or that of the bundled file or run folder a fine-tuning run starts
    from (its U-Net learned latents at that scale; a new pool's own figure differs in the third digit)."""
    if init_from is not None and init_from.is_file():
        from safetensors import safe_open

        with safe_open(str(init_from), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("ldmgraph", "{}"))
        if "scale_factor" in meta:
            return float(meta["scale_factor"])
    if init_from is not None and (init_from / "state.json").is_file():  # a run folder: the scale it trained at
        trained_at = json.loads((init_from / "state.json").read_text()).get("config", {}).get("scale_factor")
        if trained_at:
            return float(trained_at)
    return float(json.loads((pool_folder / "scale_factor.json").read_text())["scale_factor"])


def export_and_grid(kind: str, unet_folder: Path, ae_folder: Path, pool_folder: Path, out_dir: Path,
                    grid: Path | None = None) -> Path:
    """Export a run as its bundled file in out_dir; for txt2img also save a 16-image sample grid."""
    trained_at = json.loads((unet_folder / "state.json").read_text())["config"].get("scale_factor")
    scale = float(trained_at) if trained_at else read_scale_factor(pool_folder)  # the scale the U-Net learned
    path = export_bundled(kind, unet_folder, ae_folder, scale, out_dir / BUNDLED_NAMES[kind])
    if grid is not None and kind == "ldm":
        from ldmgraph.models.checkpoint import load_checkpoint

        from .common import save_grid
        from .evaluate import one_object_prompts
        from .sampling import txt2img

        ckpt = load_checkpoint(path)
        prompts = [p for _, p in one_object_prompts(16)]
        save_grid(txt2img(ckpt, prompts, seed=0, steps=15), grid)
    return path


__all__ = ["export_and_grid", "load_pool", "prepare_inpaint_pool", "prepare_pool", "read_scale_factor", "scale_factor_of"]
