"""``ldmgraph train controlnet``: a ControlNet for the bundled text-to-image model.

The recipe of Zhang et al. 2023 (Sec. 3.2-3.3): a trainable copy of the frozen U-Net's encoder
(time embedding, input blocks, middle block), initialised from the U-Net's weights and joined to
it by zero-initialised 1x1 convolutions, learns eps-prediction with
L = E || eps - eps_theta(z_t, t, c_text, c_hint) ||^2 while the text-to-image U-Net stays frozen.
Prompts are dropped (replaced by "") part of the time, so the control alone steers the layout.

Data: scenes of one or two shapes anywhere on the canvas, of any size between SIZE_RANGE (the
text model's five positions and two sizes are only the nearest words of the caption). The hint is
the scene's silhouette (white shapes on black, anti-aliased) or, part of the time, the Canny edge
map of the rendered scene (CANNY_THRESHOLDS), so both kinds of control image work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ldmgraph.models.controlnet import ControlNet

from .common import (
    EMA,
    restores_torch_threads,
    step_generator,
    to_model,
    train_loop,
)
from .data.scenes import (
    GAP,
    SUPERSAMPLE,
    Scene,
    ShapeSpec,
    _shape_mask,
    caption_of,
    render,
    sample_background,
)
from .data.vocab import COLOURS, POSITIONS, SHAPES, SIZES

SIZE_RANGE = (5.0, 15.0)  # half extent of a shape, pixels
HINT_CHANNELS = (16, 32, 64)  # two stride-2 steps: 64x64 hint -> 16x16 latent
SPLIT_STREAM = {"train": 20, "heldout": 21}
# Canny thresholds of the training hints (gradient magnitude of the 0..1 grey image; ComfyUI's
# defaults 0.4 / 0.8 miss most edges of 64x64 scenes) and of workflows/controlnet.json
CANNY_THRESHOLDS = (0.1, 0.2)
BUNDLED_NAME = "ldmgraph-shapes-controlnet.safetensors"


def _nearest(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def control_scene(seed: int, split: str, index: int, two_object_prob: float = 0.25) -> Scene:
    """Scene ``index`` of a split: shapes of any colour and kind at any place and size; the
    caption names each shape's colour, kind and nearest position word."""
    rng = np.random.default_rng([seed, SPLIT_STREAM[split], index])
    n = 2 if rng.random() < two_object_prob else 1
    while True:
        shapes = []
        for _ in range(n):
            half = float(rng.uniform(*SIZE_RANGE))
            cx, cy = (float(v) for v in rng.uniform(half + 1, 64 - half - 1, size=2))
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            size = "small" if half < sum(SIZES.values()) / 2 else "large"
            shapes.append(ShapeSpec(colour, shape, _nearest(cx, cy), size, cx, cy, half))
        if n == 1 or (abs(shapes[0].cx - shapes[1].cx) > shapes[0].half + shapes[1].half + GAP
                      or abs(shapes[0].cy - shapes[1].cy) > shapes[0].half + shapes[1].half + GAP):
            break
    with_size = [bool(rng.random() < 0.5) for _ in shapes]
    return Scene(sample_background(rng), tuple(shapes), caption_of(shapes, with_size))


def silhouette(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene's shapes as coverage [H, W] in 0..1 (anti-aliased like `render`)."""
    sub = (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    gx, gy = np.meshgrid(sub, sub)
    cover = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), bool)
    for spec in scene.shapes:
        cover |= _shape_mask(spec, gx, gy)
    return cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def silhouette_image(scene: Scene) -> np.ndarray:
    """The control image of a scene: [64, 64, 3], white shapes on black."""
    return np.repeat(silhouette(scene)[..., None], 3, axis=-1)


@torch.no_grad()
def build_control_pool(vae: Any, out: Path, seed: int, count: int, batch: int = 100) -> Path:
    """Encode the control pool once: latent posteriors, silhouettes, Canny edges, caption contexts."""
    from ldmgraph.models.hints import canny_edges

    from .text import encode_captions, unique_index

    scenes = [control_scene(seed, "train", i) for i in range(count)]
    means, stds, sils, edges = [], [], [], []
    for start in tqdm(range(0, count, batch), desc="encode control pool"):
        chunk = scenes[start : start + batch]
        images = np.stack([render(s) for s in chunk])
        posterior = vae.encode(to_model(images))
        means.append(posterior.mean.clone())
        stds.append(posterior.std.clone())
        sils.append(torch.from_numpy(np.stack([silhouette(s) for s in chunk]))[:, None])
        edges.append(torch.from_numpy(canny_edges(images, *CANNY_THRESHOLDS)[..., 0])[:, None])
    table, index = unique_index([s.caption for s in scenes])
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"mean": torch.cat(means), "std": torch.cat(stds), "silhouette": (torch.cat(sils) * 255).round().to(torch.uint8),
         "edges": (torch.cat(edges) > 0.5).to(torch.uint8), "caption_index": index,
         "contexts": encode_captions(table).contiguous()},
        str(out / "control_pool.safetensors"),
        metadata={"seed": str(seed), "count": str(count), "captions": json.dumps(table)},
    )
    return out


@dataclass
class ControlConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 50
    ema_decay: float = 0.99
    caption_dropout: float = 0.2
    edge_prob: float = 0.35  # share of examples whose hint is the Canny edge map instead of the silhouette
    grad_clip: float = 1.0
    offset_noise: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    minutes: float = 0.0
    scale_factor: float = 1.0
    base: str = ""  # the frozen text-to-image model (bundled file)


def _batch(cfg: ControlConfig, pool: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    g = step_generator(cfg.seed, step, stream=2)
    idx = torch.randint(0, pool["mean"].shape[0], (cfg.batch_size,), generator=g)
    z0 = (pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=g)) * cfg.scale_factor
    use_edges = (torch.rand(cfg.batch_size, generator=g) < cfg.edge_prob).view(-1, 1, 1, 1)
    hint = torch.where(use_edges, pool["edges"][idx].float(), pool["silhouette"][idx].float() / 255)
    captions = pool["caption_index"][idx]
    dropped = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
    captions = torch.where(dropped, torch.zeros_like(captions), captions)
    return {"z0": z0, "hint": hint.expand(-1, 3, -1, -1), "context": pool["contexts"][captions]}


def init_from_unet(control: ControlNet, unet: torch.nn.Module) -> None:
    """Copy the U-Net's encoder into the ControlNet (the paper's trainable copy)."""
    own = control.state_dict()
    with torch.no_grad():
        for name, value in unet.state_dict().items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)


def control_loss(unet: torch.nn.Module, control: ControlNet, batch: dict[str, torch.Tensor], abar: torch.Tensor,
                 g: torch.Generator, offset_noise: float) -> torch.Tensor:
    """|| eps - eps_theta(z_t, t, c, control(z_t, hint, t, c)) ||^2 with the U-Net frozen."""
    z0 = batch["z0"]
    t = torch.randint(0, abar.shape[0], (z0.shape[0],), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    residuals = control(zt, batch["hint"], t, context=batch["context"])
    return (unet(zt, t, context=batch["context"], control=residuals) - eps).pow(2).mean()


def base_unet(path: Path) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """The frozen U-Net of a bundled text-to-image file, its config and scale factor."""
    from safetensors import safe_open

    from ldmgraph.models.files import UNET_PREFIX
    from ldmgraph.models.unet import UNetModel

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
        state = {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    unet = UNetModel(**meta["unet"])
    unet.load_state_dict(state)
    unet.eval().requires_grad_(False)
    return unet, meta, float(meta["scale_factor"])


@restores_torch_threads
def train_controlnet(cfg: ControlConfig, pool_folder: Path, out: Path, resume: bool = False,
                     progress: bool = True, threads: int = 1) -> Path:
    """Train (or resume) the ControlNet in run folder ``out``."""
    from .ldm import alphas_cumprod

    torch.set_num_threads(threads)
    unet, meta, scale = base_unet(Path(cfg.base))
    cfg.scale_factor = scale
    torch.manual_seed(cfg.seed)
    control = ControlNet(meta["unet"], HINT_CHANNELS, 3)
    init_from_unet(control, unet)
    ema = EMA(control, decay=cfg.ema_decay)
    opt = torch.optim.AdamW(control.parameters(), lr=cfg.lr, weight_decay=0.0)
    pool = load_file(str(pool_folder / "control_pool.safetensors"))
    if meta.get("clause_tokens"):  # the base reads clause tokens: give the copy the contexts the base reads
        pool["contexts"] = base_contexts(Path(cfg.base), pool_folder)
    abar = alphas_cumprod()
    state = {"kind": "controlnet", "config": asdict(cfg), "unet": meta["unet"], "hint_channels": list(HINT_CHANNELS)}

    def loss_at(step: int) -> torch.Tensor:
        return control_loss(unet, control, _batch(cfg, pool, step), abar, step_generator(cfg.seed, step, stream=3),
                            cfg.offset_noise)

    train_loop(out, control, ema, opt, cfg, state, loss_at, resume=resume, progress=progress, desc="controlnet")
    return out


def export_controlnet(run: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the run's EMA ControlNet as a bundled file: keys `control_model.*` (the original layout)
    and the `ldmgraph` metadata the loader rebuilds it from."""
    import os

    from .common import load_ema_weights

    state = json.loads((run / "state.json").read_text())
    control = ControlNet(state["unet"], state["hint_channels"], 3)
    load_ema_weights(run, control)
    cfg = state["config"]
    meta = {
        "format": "ldmgraph-bundled/1",
        "kind": "controlnet",
        "unet": state["unet"],
        "hint_channels": state["hint_channels"],
        "hint_in": 3,
        "control_input": "64x64 RGB image, white on black: the silhouette of the shapes, or Canny edges "
        f"(low {CANNY_THRESHOLDS[0]}, high {CANNY_THRESHOLDS[1]}) of a scene",
        "base_model": Path(cfg["base"]).name,
        "training": {"steps": state["step"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
                     "seconds": round(float(state.get("seconds", 0.0))), "caption_dropout": cfg["caption_dropout"],
                     "edge_prob": cfg["edge_prob"], "size_range": list(SIZE_RANGE),
                     "loss": "||eps - eps_theta(z_t, t, c, control(z_t, hint))||^2, U-Net frozen "
                             "(Zhang et al. 2023)"},
    }
    tensors = {f"control_model.{k}": v.to(dtype).contiguous() for k, v in control.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"ldmgraph": json.dumps(meta)})
    os.chmod(tmp, 0o644)  # a shipped asset, readable like the others
    os.replace(tmp, out)
    return out


def base_contexts(base: Path, pool_folder: Path) -> torch.Tensor:
    """The control pool's captions encoded by the base model's own text encoder (its clause tokens too),
    in the order of the pool's caption table."""
    from safetensors import safe_open

    from ldmgraph.models.checkpoint import load_text_encoder

    with safe_open(str(pool_folder / "control_pool.safetensors"), "pt") as f:
        captions = json.loads(f.metadata()["captions"])
    encoder = load_text_encoder(base)  # the text encoder alone: no U-Net or VAE built again
    return torch.cat([encoder.encode(captions[i : i + 256]).context.float()
                      for i in range(0, len(captions), 256)]).contiguous()


def cmd_train_controlnet(args: Any) -> int:
    """The ``ldmgraph train controlnet`` command: build the control pool when missing, train, export."""
    from ldmgraph.models.checkpoint import load_checkpoint as load_model

    from .export import BUNDLED_NAMES, assets_dir

    base = args.base or assets_dir() / BUNDLED_NAMES["ldm"]
    out = args.out or Path("runs") / "controlnet"
    if not (args.pool / "control_pool.safetensors").exists():
        torch.set_num_threads(args.threads)
        vae = load_model(base, text_encoder=False).vae.first_stage_model
        build_control_pool(vae, args.pool, args.seed, args.pool_size)
    cfg = ControlConfig(seed=args.seed, minutes=args.minutes, base=str(base))
    for name in ("steps", "batch_size", "lr", "offset_noise"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    train_controlnet(cfg, args.pool, out, resume=args.resume, progress=not args.no_progress, threads=args.threads)
    print(f"controlnet run: {out}")
    if args.export is not None:
        print(f"exported: {export_controlnet(out, args.export)}")
    return 0


def judge_mask(image: np.ndarray) -> np.ndarray:
    """The judge's shape mask: the largest connected region of high-chroma pixels (bool [H, W])."""
    from .data.judge import CHROMA_MIN, _regions

    chroma = image.max(axis=-1) - image.min(axis=-1)
    regions = sorted(_regions(chroma > CHROMA_MIN), key=len, reverse=True)
    mask = np.zeros(image.shape[:2], bool)
    if regions:
        mask[regions[0][:, 0], regions[0][:, 1]] = True
    return mask


def control_figures(txt: Any, models: Path, samples: int, steps: int, cfg: float, seed: int,
                    batch_size: int = 64, log: Any = print, grid: Path | None = None) -> tuple[float, float]:
    """(control_iou, control_colour) of the bundled ControlNet on held-out scenes.

    Each scene is one shape at a place and size drawn from a stream the training pool never used;
    the ControlNet gets its silhouette (on both CFG sides, as ControlNetApplyAdvanced does) and the
    text model its caption. control_iou: mean intersection over union of the judge's shape mask
    (the largest high-chroma region) with the silhouette; control_colour: the share of images whose
    largest shape the judge reads in the caption's colour. NaN when the file is not there.
    """
    from ldmgraph.diffusion import CondEntry, Latent, sample
    from ldmgraph.models.controlnet import ControlNetApplied, load_controlnet

    from .data.judge import read_image
    from .sampling import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, _contexts

    path = models / BUNDLED_NAME
    if not path.exists():
        return float("nan"), float("nan")
    handle = load_controlnet(path)
    scenes = [control_scene(seed, "heldout", i, two_object_prob=0.0) for i in range(samples)]
    images = []
    for start in range(0, samples, batch_size):
        chunk = scenes[start : start + batch_size]
        cond, uncond = _contexts(txt, [s.caption for s in chunk])
        hint = torch.from_numpy(np.stack([silhouette_image(s) for s in chunk])).permute(0, 3, 1, 2).contiguous()
        control = (ControlNetApplied(handle, hint, 1.0, 0.0, 1.0),)
        out = sample(txt.unet, Latent(samples=torch.zeros(len(chunk), 4, 16, 16)),
                     [CondEntry(context=cond, control=control)], [CondEntry(context=uncond, control=control)],
                     seed=seed + start, steps=steps, cfg=cfg, sampler=DEFAULT_SAMPLER, schedule=DEFAULT_SCHEDULE)
        images.append(txt.vae.decode(out.samples).numpy())
    pictures = np.concatenate(images)
    ious, colours = [], []
    for picture, scene in zip(pictures, scenes, strict=True):
        mask, truth = judge_mask(picture), silhouette(scene) > 0.5
        ious.append(float((mask & truth).sum() / max(int((mask | truth).sum()), 1)))
        readings = read_image(picture)
        colours.append(bool(readings) and readings[0].colour == scene.shapes[0].colour)
    iou, colour = float(np.mean(ious)), float(np.mean(colours))
    log(f"controlnet: control_iou {iou:.3f}, colour read {colour:.3f} on {samples} held-out silhouettes")
    if grid is not None:
        from .common import save_grid

        save_grid(np.concatenate([np.stack([silhouette_image(s) for s in scenes[:8]]), pictures[:8]]),
                  grid.with_name(grid.stem + "_controlnet" + grid.suffix))
    return iou, colour
