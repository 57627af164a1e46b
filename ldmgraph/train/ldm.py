"""Stage 2: diffusion models in the autoencoder's latent space (Rombach et al. 2022, Sec. 3.2-3.3).

L_LDM = E_{z0, y, eps, t} || eps - eps_theta(z_t, t, tau(y)) ||^2 with
z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4 and 14), on SD's
"linear" schedule (linspace over sqrt(beta), 0.00085..0.012, 1000 steps), so every sampler treats
these models as it treats Stable Diffusion. Three kinds, one loop:

- ``ldm``: text-to-image; tau(y) = frozen MiniLM context by cross-attention; the caption is
  dropped (replaced by "") 10% of the time so classifier-free guidance works (Ho & Salimans 2022).
- ``superres``: the 16x16 low-resolution image (-1..1) concatenated to z_t: 4 + 3 = 7 channels.
- ``inpaint``: the mask and the masked image's latent concatenated to z_t (SD inpainting order
  [z_t, mask, masked latent]): 4 + 1 + 4 = 9 channels, with the text context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmgraph.models.unet import UNetModel

from .common import (
    EMA,
    prefixed_tensors,
    restores_torch_threads,
    step_generator,
    train_loop,
)

KINDS = ("ldm", "superres", "inpaint")
SCHEDULE = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
CONCAT = {"ldm": None, "superres": "lowres-image", "inpaint": "inpaint-mask-latent"}
IN_CHANNELS = {"ldm": 4, "superres": 7, "inpaint": 9}


def default_unet(kind: str) -> dict[str, Any]:
    """U-Net of each kind: ~1.7M parameters, widths 32/64/64 over 16/8/4 latent pixels."""
    config: dict[str, Any] = {
        "in_channels": IN_CHANNELS[kind],
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2, 2],
        "num_head_channels": 32,
        "transformer_depth": 1,
        "context_dim": 384,
        "use_linear_in_transformer": True,
        # 8 GroupNorm groups, not 32: with one channel a group (32 on 32 channels) the norm after
        # each residual block's time-embedding addition subtracts that per-channel constant again,
        # so the first level would never see the timestep (see also default_ddconfig).
        "norm_groups": 8,
    }
    if kind == "superres":  # no text: self-attention blocks only where the latent is small
        config.update(context_dim=None, use_linear_in_transformer=False, attention_resolutions=[2])
    return config


@dataclass
class LDMConfig:
    kind: str = "ldm"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    offset_noise: float = 0.0  # std of a per-image, per-channel constant added to eps (see diffusion_loss)
    seed: int = 0
    checkpoint_every: int = 50
    minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    scale_factor: float = 1.0
    init_from: str = ""  # start from these U-Net weights (see initial_weights); "" = random
    unet: dict[str, Any] = field(default_factory=dict)
    # conditioning options of text-to-image (ldmgraph.train.conditioning); the defaults are the shipped model's
    text_encoder: str = "minilm"
    route: str = "crossattn"
    cross_attention: str = "all"
    context_length: int = 32
    text_transformer: dict[str, Any] = field(default_factory=dict)
    # a ContextRefiner inside the U-Net ({"width", "depth", "heads", "max_tokens"}); {} = none
    context_refiner: dict[str, int] = field(default_factory=dict)
    # one pooled MiniLM token per clause of the caption appended to its context (0 = none); see
    # ldmgraph.models.text_encoders.split_clauses
    clause_tokens: int = 0
    clause_only: bool = False  # the context is the clause tokens alone (no per-word tokens)
    # share of each batch whose timestep is drawn from [high_noise_from, T) instead of [0, T) (see diffusion_loss)
    high_noise_share: float = 0.0
    high_noise_from: int = 700
    # weight of each example's eps loss: min(max(1 / SNR(t), 1), high_noise_weight); 1 = the plain loss
    high_noise_weight: float = 1.0

    def __post_init__(self) -> None:
        from .conditioning import adapt_unet, conditioning_of, default_text_transformer

        if self.kind not in KINDS:
            raise ValueError(f"unknown training kind {self.kind!r}; expected one of {KINDS}")
        cond = conditioning_of(self)
        cond.check()
        if not cond.is_default and self.kind != "ldm":
            raise ValueError("the conditioning options (--text-encoder, --conditioning-route, --cross-attention, "
                             "--context-length) are for 'ldmgraph train ldm' only")
        if cond.text_encoder == "transformer" and not self.text_transformer:
            self.text_transformer = default_text_transformer(self.context_length)
        if not self.unet:
            self.unet = default_unet(self.kind)
            if not cond.is_default:
                self.unet = adapt_unet(self.unet, cond, self.text_transformer)
        if self.context_refiner and not self.unet.get("context_refiner"):
            if self.unet.get("context_dim") is None:
                raise ValueError("--context-refiner needs a model with cross-attention (text-to-image or inpainting)")
            self.unet = {**self.unet, "context_refiner": dict(self.context_refiner)}


def alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t of SD's schedule, t = 0..999 (float32)."""
    from ldmgraph.diffusion.noise_schedule import NoiseSchedule

    return NoiseSchedule.from_config(**SCHEDULE).alphas_cumprod.float()


def build_unet(cfg: LDMConfig) -> UNetModel:
    torch.manual_seed(cfg.seed)
    return UNetModel(**cfg.unet)


def initial_weights(unet: UNetModel, source: Path) -> dict[str, int]:
    """Load another model's U-Net weights into ``unet`` before training (fine-tuning).

    ``source`` is a run folder (its EMA weights) or a bundled / LDM-format file
    (``model.diffusion_model.*``). As for SD's inpainting model, which started from the text-to-image
    weights, an input convolution with more input channels keeps the source's channels and starts
    the new ones (mask, masked latent, low-resolution image) at zero, so the first steps behave
    exactly like the source model. Every other tensor must match in shape. Returns counts of the
    tensors copied and widened.
    """
    from ldmgraph.models.files import UNET_PREFIX

    if source.is_dir():
        tensors = prefixed_tensors(source / "checkpoint.safetensors", "ema.")
    else:
        tensors = prefixed_tensors(source, UNET_PREFIX)
    own = unet.state_dict()
    # a context refiner the source lacks starts as it was built (its output layer at zero: no change)
    fresh = {k for k in own if k.startswith("context_refiner.") and k not in tensors}
    own = {k: v for k, v in own.items() if k not in fresh}
    if not tensors or set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors))[:3], sorted(set(tensors) - set(own))[:3]
        raise ValueError(f"--init-from {source}: not a U-Net of this layout (missing {missing}, unexpected {extra}); "
                         "pass a run folder or bundled file of the same widths")
    copied, widened = 0, 0
    with torch.no_grad():
        for name, target in own.items():
            value = tensors[name]
            if value.shape == target.shape:
                target.copy_(value)
                copied += 1
            elif value.dim() == 4 and value.shape[0] == target.shape[0] and value.shape[1] < target.shape[1] \
                    and value.shape[2:] == target.shape[2:]:
                target.zero_()
                target[:, : value.shape[1]] = value
                widened += 1
            else:
                raise ValueError(f"--init-from {source}: {name} has shape {tuple(value.shape)}, this model needs "
                                 f"{tuple(target.shape)}")
    return {"copied": copied, "widened": widened}


def make_batch(cfg: LDMConfig, pool: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    """The step's examples: z0 (scaled), concat (or None) and context (or None)."""
    g = step_generator(cfg.seed, step, stream=2)
    if cfg.kind == "inpaint" and "inpaint_mean" not in pool:
        raise ValueError("this pool has no inpainting examples (inpaint.safetensors); 'ldmgraph train inpaint "
                         "--pool FOLDER' builds them")
    prefix = "inpaint_" if cfg.kind == "inpaint" else ""
    n = pool[prefix + "mean"].shape[0]
    idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
    mean, std = pool[prefix + "mean"][idx], pool[prefix + "std"][idx]
    z0 = (mean + std * torch.randn(mean.shape, generator=g)) * cfg.scale_factor
    out: dict[str, Any] = {"z0": z0, "concat": None, "context": None}
    if cfg.kind == "superres":
        out["concat"] = pool["lowres"][idx]
    if cfg.kind == "inpaint":
        out["concat"] = torch.cat([pool["inpaint_mask"][idx], pool["inpaint_masked"][idx] * cfg.scale_factor], 1)
    if cfg.kind in ("ldm", "inpaint"):
        key = "caption_index" if cfg.kind == "ldm" else "inpaint_caption_index"
        captions = pool[key][idx]
        dropped = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        captions = torch.where(dropped, torch.zeros_like(captions), captions)  # entry 0 is ""
        if "caption_ids" in pool or "pooled" in pool:  # other conditioning options
            from .conditioning import batch_inputs

            out.update(batch_inputs(cfg, pool, captions))
        else:
            out["context"] = pool["contexts"][captions]
            if cfg.clause_tokens:
                if "clause_contexts" not in pool or pool["clause_contexts"].shape[1] != cfg.clause_tokens:
                    raise ValueError(f"this run appends {cfg.clause_tokens} clause tokens but the pool has none of "
                                     "that count; 'ldmgraph train ldm --clause-tokens K' adds them")
                clauses = pool["clause_contexts"][captions]
                out["context"] = clauses if cfg.clause_only else torch.cat([out["context"], clauses], 1)
    return out


def diffusion_loss(unet: torch.nn.Module, batch: dict[str, torch.Tensor], abar: torch.Tensor,
                   generator: torch.Generator, offset_noise: float = 0.0, high_noise_share: float = 0.0,
                   high_noise_from: int = 700, high_noise_weight: float = 1.0) -> torch.Tensor:
    """|| eps - eps_theta(z_t, t, c) ||^2, t uniform in 0..T-1.

    SD's schedule keeps sqrt(alpha_bar_T) = 0.068 of the signal at t = T, so during training the
    spatial mean of z_T leaks each image's brightness, while sampling starts from zero-mean noise
    (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed"). Our
    latents carry dark/light backgrounds as large per-image offsets, so ``offset_noise`` > 0 adds a
    random constant per image and channel to eps ("offset noise", Guttenberg 2023): the model
    then learns to choose the brightness itself from any start.
    """
    z0 = batch["z0"]
    t = torch.randint(0, abar.shape[0], (z0.shape[0],), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=generator)
    if high_noise_share:
        high = int(round(high_noise_share * z0.shape[0]))
        t[:high] = torch.randint(high_noise_from, abar.shape[0], (high,), generator=generator)
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    x = zt if batch["concat"] is None else torch.cat([zt, batch["concat"]], 1)
    if "ids" in batch:  # a JointModel: the text transformer runs inside, in the same graph
        pred = unet(x, t, batch["ids"])
    elif batch.get("y") is not None:
        pred = unet(x, t, context=batch["context"], y=batch["y"])
    else:
        pred = unet(x, t, context=batch["context"])
    if high_noise_weight == 1.0:
        return (pred - eps).pow(2).mean()
    # 1 / SNR = (1 - abar) / abar: the eps loss times it is the x0 loss, which does not vanish at high noise
    weight = ((1 - a) / a).clamp(min=1.0, max=high_noise_weight)
    return ((pred - eps).pow(2) * weight).mean()


@restores_torch_threads
def train_ldm(cfg: LDMConfig, pool: dict[str, Any], out: Path, resume: bool = False,
              progress: bool = True, threads: int = 1, on_checkpoint: Any = None) -> Path:
    """Train (or resume) one latent diffusion model in run folder ``out``."""
    from .conditioning import build_model, prepare_pool

    torch.set_num_threads(threads)
    unet = build_model(cfg)  # a UNetModel, or a JointModel when the text transformer trains too
    pool = prepare_pool(cfg, pool)
    if cfg.init_from and not (resume and (out / "checkpoint.safetensors").exists()):
        initial_weights(getattr(unet, "unet", unet), Path(cfg.init_from))
    ema = EMA(unet, decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = alphas_cumprod()

    def loss_at(step: int) -> torch.Tensor:
        return diffusion_loss(unet, make_batch(cfg, pool, step), abar, step_generator(cfg.seed, step, stream=3),
                              high_noise_share=cfg.high_noise_share, high_noise_from=cfg.high_noise_from,
                              high_noise_weight=cfg.high_noise_weight,
                              offset_noise=cfg.offset_noise)

    def after_step(done: int, saved: bool, out_of_time: bool) -> None:
        if saved and on_checkpoint is not None:
            on_checkpoint(done)

    state: dict[str, Any] = {"kind": cfg.kind, "config": asdict(cfg)}
    source = Path(cfg.init_from) / "state.json" if cfg.init_from else None
    if source is not None and source.is_file():  # the source run may go on: remember the step it started from
        earlier = json.loads((out / "state.json").read_text()) if resume and (out / "state.json").is_file() else {}
        state["init_from_step"] = earlier.get("init_from_step", json.loads(source.read_text()).get("step"))
    train_loop(out, unet, ema, opt, cfg, state, loss_at,
               resume=resume, progress=progress, desc=cfg.kind, after_step=after_step)
    return out
