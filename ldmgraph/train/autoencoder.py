"""Stage 1: the KL autoencoder, f = 4 (64x64x3 -> 16x16x4), Rombach et al. 2022 Sec. 3.1.

Loss per image: L1 + L2 reconstruction (the perceptual and adversarial terms of the paper are
left out: our images are flat shapes, where they add little) + ``kl_weight`` * KL(q(z|x) || N(0, I)),
with the paper's tiny KL weight (1e-6 on sums) so the latent space stays close to the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmgraph.models.autoencoder import AutoencoderKL

from .common import (
    EMA,
    load_ema_weights,
    psnr,
    restores_torch_threads,
    save_grid,
    step_generator,
    to_images,
    to_model,
    train_loop,
)
from .data.scenes import batch as data_batch


def default_ddconfig() -> dict[str, Any]:
    """The bundled autoencoder: 0.95M parameters, widths 32/64/64, one residual block per level.

    GroupNorm uses 8 groups, not the original 32. With 32 groups on 32 or 64 channels each group
    holds one or two channels, so the norm removes each channel's mean over the image: a flat
    background's brightness and tint then cannot pass through the encoder's last norm, and the
    decoder cannot set it either. Our images are mostly flat background, and a first model built
    that way stopped at 23 dB with greyed backgrounds. With 4 to 8 channels a group, the relations
    between channels carry the level through.
    """
    return {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
        "norm_groups": 8,
    }


@dataclass
class AEConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-6
    seed: int = 0
    data_seed: int = 0
    grid_every: int = 200
    checkpoint_every: int = 100
    # Train on random crops (side a multiple of 4): the model is convolutional and a 32x32 crop
    # costs a quarter of the whole image. Measured on 2 CPU cores: 27.4 dB after 900 steps of 32
    # crops (10 min) against 25.5 dB after 900 steps of 16 whole images (20 min); GroupNorm's
    # statistics over a crop differ little from those over the whole (mostly flat) image.
    crop: int = 32
    minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    init_from: str | None = None  # start from this run folder's EMA weights
    train_encoder: bool = True  # False: fine-tune the decoder only; latents (and the LDM pools) stay valid
    shape_weight: float = 0.0  # extra loss weight on shape pixels (chroma > 0.3): colours matter most
    # Initial log-variance of the posterior (the bias of quant_conv's second half). At 0 the
    # sampled latents start with unit noise, as large as the signal; -6 starts at std 0.05, where
    # trained LDM autoencoders end up anyway (the KL weight is tiny). In a 400-step comparison on
    # whole images it changed PSNR by less than the run-to-run spread; the shipped model used it.
    logvar_init: float = -6.0
    ddconfig: dict[str, Any] = field(default_factory=default_ddconfig)
    embed_dim: int = 4


def build(cfg: AEConfig) -> AutoencoderKL:
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(ddconfig=dict(cfg.ddconfig), embed_dim=cfg.embed_dim)
    with torch.no_grad():
        model.quant_conv.bias[cfg.embed_dim :] = cfg.logvar_init
    return model


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random crop of side ``size`` per image, at offsets that are multiples of 4 (the latent grid)."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 4 + 1
    offsets = torch.randint(0, cells, (x.shape[0], 2), generator=generator) * 4
    return torch.stack([img[:, oy : oy + size, ox : ox + size] for img, (oy, ox) in zip(x, offsets.tolist(), strict=True)])


def ae_loss(model: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator,
            shape_weight: float = 0.0) -> torch.Tensor:
    """Mean over pixels of w * (|x - x'| + (x - x')^2), plus kl_weight * KL summed per image / pixels.

    w = 1 + shape_weight on the shapes' pixels (high chroma), 1 elsewhere.
    """
    recon, posterior = model(x, sample_posterior=True, generator=generator)
    err = (recon - x).abs() + (recon - x).pow(2)
    if shape_weight:
        chroma = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2  # x is -1..1
        err = err * (1 + shape_weight * (chroma > 0.3).float())
    return err.mean() + kl_weight * posterior.kl().mean() / x[0].numel()


@restores_torch_threads
def train_autoencoder(
    cfg: AEConfig, out: Path, resume: bool = False, progress: bool = True, threads: int = 1
) -> Path:
    """Train (or resume) the autoencoder in run folder ``out``; returns the folder."""
    torch.set_num_threads(threads)
    model = build(cfg)
    if cfg.init_from:
        load_ema_weights(Path(cfg.init_from), model)
    ema = EMA(model, decay=0.999)
    params = model.parameters()
    if not cfg.train_encoder:
        for p in [*model.encoder.parameters(), *model.quant_conv.parameters()]:
            p.requires_grad_(False)
        params = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def loss_at(step: int) -> torch.Tensor:
        images, _ = data_batch(cfg.data_seed, "train", step * cfg.batch_size, cfg.batch_size)
        x = random_crops(to_model(images), cfg.crop, step_generator(cfg.seed, step, stream=1))
        return ae_loss(model, x, cfg.kl_weight, step_generator(cfg.seed, step), cfg.shape_weight)

    def after_step(done: int, saved: bool, out_of_time: bool) -> None:
        if done % cfg.grid_every == 0 or done == cfg.steps or out_of_time:
            save_recon_grid(model, ema, out / f"recon_{done:06d}.png", cfg.data_seed)

    train_loop(out, model, ema, opt, cfg, {"kind": "autoencoder", "config": asdict(cfg)}, loss_at,
               resume=resume, progress=progress, desc="autoencoder", clip=False, after_step=after_step)
    return out


@torch.no_grad()
def save_recon_grid(model: AutoencoderKL, ema: EMA, path: Path, data_seed: int) -> None:
    """Originals (odd rows) above EMA reconstructions (even rows) of 16 test images."""
    backup = {k: v.clone() for k, v in model.state_dict().items()}
    ema.copy_to(model)
    model.eval()
    images, _ = data_batch(data_seed, "test", 0, 16)
    recon = to_images(model(to_model(images), sample_posterior=False)[0])
    model.load_state_dict(backup)
    model.train()
    rows = np.concatenate([images[:8], recon[:8], images[8:], recon[8:]])
    save_grid(rows, path)


@torch.no_grad()
def reconstruction_psnr(model: AutoencoderKL, count: int = 1000, data_seed: int = 0, batch: int = 100) -> float:
    """PSNR (dB) of posterior-mode reconstructions of ``count`` test-split images (unseen in training)."""
    model.eval()
    originals, recons = [], []
    for start in range(0, count, batch):
        images, _ = data_batch(data_seed, "test", start, min(batch, count - start))
        originals.append(images)
        recons.append(to_images(model(to_model(images), sample_posterior=False)[0]))
    return psnr(np.concatenate(originals), np.concatenate(recons))
