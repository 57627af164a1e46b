"""``ldmgraph train lora``: a low-rank adapter (LoRA, Hu et al. 2021) for the bundled text-to-image model.

The objective is the one the base model was trained with, L = E ||eps - eps_theta(z_t, t, tau(y))||^2
(Rombach et al. 2022, eq. 2), on images from a folder (``name.png`` + ``name.txt`` caption, the
layout kohya's scripts read), but only the low-rank factors train: each targeted linear layer
W (the spatial transformers' projections: ``proj_in``, ``proj_out``, attention ``to_q`` / ``to_k`` /
``to_v`` / ``to_out.0`` and the feed-forward layers) computes W x + (alpha / rank) * up(down(x)), with
``down`` [rank, in] random and ``up`` [out, rank] zero at the start, so step 0 is the base model. The
base weights are frozen and never copied: the factors act through forward hooks.

The result is written in the kohya / A1111 format (``ldmgraph.models.lora.write_kohya_lora``):
``lora_unet_<module path, dots as underscores>.lora_down.weight`` [rank, in], ``.lora_up.weight``
[out, rank] and ``.alpha`` (a scalar; the delta is up @ down * alpha / rank), module paths in the
original LDM layout as kohya names SDXL's (``input_blocks_1_1_transformer_blocks_0_attn1_to_q``),
half precision.
The run folder keeps resumable checkpoints (``checkpoint.safetensors``, ``state.json``) and the
current EMA adapter as ``lora.safetensors``, rewritten at each checkpoint.

``write_style_dataset`` draws the procedural shapes data set in a style the base model never saw
(``outlined``: each shape as a 3-pixel outline of its colour, its inside left to the background),
with the base data set's captions, so a LoRA trained on it changes the style and keeps the content.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import EMA, restores_torch_threads, step_generator, train_loop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TARGETS = re.compile(r"(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$")
"""The U-Net's linear layers that get factors: those of the spatial transformers (cross- and self-attention
and feed-forward), as kohya's default LoRA network chooses them."""
CONV_TARGETS = re.compile(r"(in_layers\.2|out_layers\.3)$")
"""With ``conv_rank`` > 0, the residual blocks' 3x3 convolutions get factors too (kohya's "conv_dim",
LyCORIS LoCon): down a kxk convolution to ``conv_rank`` channels, up a 1x1 one."""
STYLES = ("outlined",)
OUTLINE_PIXELS = 3.0


@dataclass
class LoraConfig:
    """One LoRA run (the defaults made the shipped adapter)."""

    base: str = ""  # the text-to-image checkpoint; "" = the bundled one
    rank: int = 8
    alpha: float = 8.0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.99
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    minutes: float = 0.0
    size: int = 64  # the base model's training resolution; other images are resized to it
    conv_rank: int = 0  # > 0: the residual blocks' 3x3 convolutions get factors of this rank too (LoCon)

    def check(self) -> None:
        if not 1 <= self.rank <= 256:
            raise ValueError(f"--rank {self.rank}: use 1..256")
        if not 0 <= self.conv_rank <= 256:
            raise ValueError(f"--conv-rank {self.conv_rank}: use 0 (linear layers only) .. 256")
        if self.alpha <= 0:
            raise ValueError(f"--alpha {self.alpha}: use a positive number (the delta is scaled by alpha / rank)")


# --- the adapter -----------------------------------------------------------------------------------


def target_layers(unet: nn.Module, convolutions: bool = False) -> dict[str, nn.Module]:
    """The U-Net's layers that the adapter trains, by module path (original LDM names): the transformers'
    linear layers, and with ``convolutions`` the residual blocks' 3x3 convolutions."""
    return {name: m for name, m in unet.named_modules()
            if (isinstance(m, nn.Linear) and TARGETS.search(name))
            or (convolutions and isinstance(m, nn.Conv2d) and CONV_TARGETS.search(name))}


def _factor_pair(layer: nn.Module, rank: int, g: torch.Generator) -> nn.ModuleDict:
    """down (random, nn.Linear's / nn.Conv2d's default bound) and up (zero) for one layer."""
    if isinstance(layer, nn.Conv2d):
        down: nn.Module = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
        up: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    else:
        down, up = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=False)
    fan_in = down.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5), torch's default for both
    with torch.no_grad():
        down.weight.uniform_(-bound, bound, generator=g)
    nn.init.zeros_(up.weight)
    return nn.ModuleDict({"lora_down": down, "lora_up": up})


class LoraNetwork(nn.Module):
    """The low-rank factors of every targeted layer (``layers.<module path, dots as _>.lora_down / lora_up``)."""

    def __init__(self, layers: dict[str, nn.Module], rank: int, alpha: float, seed: int = 0,
                 conv_rank: int = 0) -> None:
        super().__init__()
        self.rank, self.alpha, self.conv_rank = rank, float(alpha), conv_rank
        self.paths = {p.replace(".", "_"): p for p in layers}
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict({
            path.replace(".", "_"): _factor_pair(layer, conv_rank if isinstance(layer, nn.Conv2d) else rank, g)
            for path, layer in layers.items()
        })

    def alpha_of(self, stem: str) -> float:
        """alpha of a layer's factors: ``alpha`` for linear layers, ``conv_rank`` (scale 1) for convolutions."""
        return float(self.conv_rank) if isinstance(self.layers[stem]["lora_down"], nn.Conv2d) else self.alpha

    def scale_of(self, stem: str) -> float:
        return self.alpha_of(stem) / self.layers[stem]["lora_down"].weight.shape[0]

    def attach(self, unet: nn.Module, strength: float = 1.0) -> list[Any]:
        """Forward hooks on ``unet`` that add strength * scale * up(down(x)) to each targeted layer's output;
        remove them with ``h.remove()``. The base weights are not touched."""
        modules = dict(unet.named_modules())
        handles = []
        for stem, pair in self.layers.items():
            def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor, pair: Any = pair,
                     scale: float = strength * self.scale_of(stem)) -> torch.Tensor:
                return out + scale * pair["lora_up"](pair["lora_down"](args[0]))

            handles.append(modules[self.paths[stem]].register_forward_hook(hook))
        return handles

    def factors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """module path -> (down, up, alpha) of these factors (or of ``state``, e.g. the EMA's copy of them)."""
        state = state if state is not None else self.state_dict()
        return {path: (state[f"layers.{stem}.lora_down.weight"], state[f"layers.{stem}.lora_up.weight"],
                       self.alpha_of(stem)) for stem, path in self.paths.items()}


def save_kohya(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], record: dict[str, Any],
               dtype: torch.dtype = torch.float16) -> Path:
    """Write the factors as a kohya-format LoRA (`ldmgraph.models.lora.write_kohya_lora`, the writer the
    loader is tested against) atomically, with kohya's ``ss_network_*`` metadata and our training record."""
    import os

    from ldmgraph.models.lora import write_kohya_lora

    meta = {"ss_network_dim": str(record["rank"]), "ss_network_alpha": str(record["alpha"]),
            "ldmgraph": json.dumps(record)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_kohya_lora(tmp, factors, part="unet", metadata=meta, dtype=dtype)
    os.replace(tmp, path)
    return path


# --- the data --------------------------------------------------------------------------------------


def read_image_folder(folder: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """Images [N, size, size, 3] (0..1) and captions of a folder of ``name.<image>`` + ``name.txt``.

    Images of another size are resized (bicubic) to the base model's ``size``; an image without its
    caption file is an error naming it.
    """
    from PIL import Image

    if not folder.is_dir():
        raise ValueError(f"--data {folder}: no such folder; give a folder of images with .txt captions "
                         "(or add --make-data outlined to draw one)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(f"--data {folder}: {len(missing)} images have no caption file, e.g. {missing[0]} "
                         f"(expected {Path(missing[0]).with_suffix('.txt').name} beside it)")
    images, captions = [], []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            images.append(np.asarray(im, np.float32) / 255.0)
        captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return np.stack(images), captions


def render_outlined(scene: Any) -> np.ndarray:
    """A procedural scene drawn in the outlined style: each shape's outer band of OUTLINE_PIXELS in its
    colour (the shape minus the same shape shrunk by that width), the inside showing the background."""
    from dataclasses import replace

    from .data.scenes import Scene, render

    empty = render(Scene(scene.background, (), scene.caption))
    full = render(scene)
    inner = render(replace(scene, shapes=tuple(replace(s, half=s.half - OUTLINE_PIXELS) for s in scene.shapes)))
    # full = bg + c_full (colour - bg), inner = bg + c_inner (colour - bg): the band's coverage is their difference
    ring = full - inner
    return np.clip(empty + ring, 0.0, 1.0).astype(np.float32)


def write_style_dataset(folder: Path, style: str, count: int, seed: int = 7) -> Path:
    """Draw ``count`` training scenes (the base data set's captions) in ``style`` as ``NNNNN.png`` + ``.txt``."""
    from PIL import Image

    from .data.scenes import scene_at

    if style not in STYLES:
        raise ValueError(f"--make-data {style!r}: known styles are {', '.join(STYLES)}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = scene_at(seed, "train", i, two_object_prob=0.3)
        image = render_outlined(scene)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return folder


# --- training --------------------------------------------------------------------------------------


def bundled_base() -> Path:
    from .export import BUNDLED_NAMES, assets_dir

    return assets_dir() / BUNDLED_NAMES["ldm"]


def encode_folder(ckpt: Any, images: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
    """Latents (posterior mean, times the scale factor) and one context per distinct caption (entry 0: "")."""
    latents = torch.cat([ckpt.vae.encode(images[i : i + 64]) for i in range(0, len(images), 64)])
    distinct = ["", *sorted(set(captions) - {""})]
    row = {c: i for i, c in enumerate(distinct)}
    with torch.no_grad():
        contexts = torch.cat([ckpt.text_encoder.encode(distinct[i : i + 256]).context.float()
                              for i in range(0, len(distinct), 256)])
    return {"latents": latents, "contexts": contexts, "caption_index": torch.tensor([row[c] for c in captions])}


def lora_batch(cfg: LoraConfig, data: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """The step's examples: z0 and context (the caption dropped to "" with probability caption_dropout)."""
    g = step_generator(cfg.seed, step, stream=2)
    idx = torch.randint(0, data["latents"].shape[0], (cfg.batch_size,), generator=g)
    captions = data["caption_index"][idx]
    dropped = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
    captions = torch.where(dropped, torch.zeros_like(captions), captions)
    return {"z0": data["latents"][idx], "concat": None, "context": data["contexts"][captions]}


@restores_torch_threads
def train_lora(cfg: LoraConfig, data_folder: Path, out: Path, *, resume: bool = False, progress: bool = True,
               threads: int = 1, export: Path | None = None) -> Path:
    """Train (or resume) a LoRA for the base text-to-image model in run folder ``out``; returns the path of
    the kohya file (``out/lora.safetensors``, also copied to ``export`` when given)."""
    from ldmgraph.models.checkpoint import load_checkpoint

    from .ldm import alphas_cumprod, diffusion_loss

    cfg.check()
    torch.set_num_threads(threads)
    base = Path(cfg.base) if cfg.base else bundled_base()
    ckpt = load_checkpoint(base)
    if ckpt.unet is None or ckpt.vae is None or ckpt.text_encoder is None or ckpt.unet.concat_channels:
        raise ValueError(f"--base {base}: not a text-to-image checkpoint (U-Net, VAE and text encoder)")
    unet = ckpt.unet.diffusion_model.eval().requires_grad_(False)
    images, captions = read_image_folder(data_folder, cfg.size)
    data = encode_folder(ckpt, images, captions)
    layers = target_layers(unet, convolutions=cfg.conv_rank > 0)
    network = LoraNetwork(layers, cfg.rank, cfg.alpha, seed=cfg.seed, conv_rank=cfg.conv_rank)
    network.attach(unet)
    ema = EMA(network, decay=cfg.ema_decay)
    opt = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = alphas_cumprod()
    record = {"format": "kohya-lora", "base": base.name, "rank": cfg.rank, "alpha": cfg.alpha, "conv_rank": cfg.conv_rank,
              "images": len(captions), "data": data_folder.name, "config": asdict(cfg),
              "targets": "spatial transformers' linear layers (proj_in/out, attention q/k/v/out, feed-forward)"
              + (", residual blocks' 3x3 convolutions" if cfg.conv_rank else ""),
              "loss": "||eps - eps_theta(z_t, t, c)||^2 on the low-rank factors only (Rombach et al. 2022, eq. 2)"}

    def loss_at(step: int) -> torch.Tensor:
        return diffusion_loss(unet, lora_batch(cfg, data, step), abar, step_generator(cfg.seed, step, stream=3))

    def after_step(done: int, saved: bool, out_of_time: bool) -> None:
        if saved:
            save_kohya(out / "lora.safetensors", network.factors(ema.shadow), {**record, "steps": done})

    state: dict[str, Any] = {"kind": "lora", "config": asdict(cfg), "data": str(data_folder)}
    train_loop(out, network, ema, opt, cfg, state, loss_at, resume=resume, progress=progress, desc="lora",
               after_step=after_step)
    path = out / "lora.safetensors"
    if export is not None:
        import shutil

        export.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, export)
    return path



# --- reading the style back ------------------------------------------------------------------------


def hollowness(image: np.ndarray) -> float:
    """How outlined an image's shapes are: 1 - the share of shape-coloured pixels in a 3x3 window at the
    centre of each shape the judge finds (averaged over shapes). A filled shape reads ~0, an outline ~1
    (its centre shows the background); NaN when the judge finds no shape."""
    from .data.judge import CHROMA_MIN, read_image

    image = np.asarray(image, np.float32)
    chroma = image.max(axis=-1) - image.min(axis=-1)
    readings = read_image(image)
    if not readings:
        return float("nan")
    fills = []
    for r in readings:
        x, y = int(r.cx), int(r.cy)
        window = chroma[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        fills.append(float((window > CHROMA_MIN).mean()))
    return 1.0 - float(np.mean(fills))
