"""Fit the latent -> RGB preview factors of an autoencoder's latent space by least squares.

Images are encoded (posterior mode, times the scale factor: the latent the samplers see) and
decoded again; the decoded image, box-averaged to latent resolution and mapped to -1..1, is
regressed on the latent plus a constant: ``rgb = z^T W + b`` (``W``: C x 3), with a small ridge
penalty on W (see RIDGE). A quarter of the images is held out to report how well the preview
follows the decoded image (R^2, and the correlation of the clamped preview with the decoded pixels
over all held-out images and the median over single images). The entry is written into
``ldmgraph/assets/data/preview_factors.json`` (``--no-write`` only prints it).

    python benchmarks/fit_preview_factors.py
        the bundled models' autoencoder on 512 procedural scenes (the shipped entry)
    python benchmarks/fit_preview_factors.py --vae sd-vae.safetensors --name sd-kl-f8 --images DIR --size 256
        any VAE file ldmgraph loads (SD's, a checkpoint's first stage), on a folder of images

The last line is ``space= channels= heldout_r2= heldout_corr= heldout_corr_per_image=
max_abs_diff_vs_table=``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldmgraph.diffusion.preview import FACTORS_FILE

BUNDLED = Path(__file__).resolve().parents[1] / "ldmgraph" / "assets" / "models" / "ldmgraph-shapes-txt2img.safetensors"
BUNDLED_NAME = "ldmgraph-shapes-kl-f4"
BUNDLED_MODELS = "the bundled ldmgraph-shapes txt2img, inpaint and superres models (one shared autoencoder)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RIDGE = 0.01
"""Latent channels are correlated (0.88 between two of the bundled autoencoder's), so plain least
squares gives large factors of opposite signs (up to 5.5) that amplify the noise a sampler leaves
in the latent (in directions the decoder ignores) into speckles; this penalty keeps them below 1,
costs a few thousandths of held-out correlation over all images (0.954 -> 0.951 with 160 scenes)
and raises the median correlation per image (0.789 -> 0.800)."""


def scene_images(count: int, size: int, seed: int) -> tuple[np.ndarray, str]:
    """Procedural scenes of the bundled data set's test split (every colour, shape and place)."""
    from ldmgraph.train.data import batch

    images, _ = batch(seed, "test", 0, count)
    if size != images.shape[1]:
        images = resized(images, size)
    return images, f"{count} procedural scenes (ldmgraph.train.data, test split, seed {seed}) at {size} px"


def folder_images(folder: Path, count: int, size: int) -> tuple[np.ndarray, str]:
    """Up to ``count`` images of a folder, centre-cropped to squares and resized to ``size``."""
    from PIL import Image

    names = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not names:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    out = []
    for path in names:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            side = min(rgb.size)
            left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
            rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            out.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    return np.stack(out), f"{len(out)} images of {folder.name}/ at {size} px"


def resized(images: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1).numpy()


def pairs(vae: Any, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(latents [N, h, w, C], decoded colours at latent resolution in -1..1 [N, h, w, 3])."""
    latents, colours = [], []
    for start in range(0, len(images), batch_size):
        z = vae.encode(images[start : start + batch_size], tiled="off")
        decoded = vae.decode(z, tiled="off").permute(0, 3, 1, 2) * 2.0 - 1.0
        small = F.adaptive_avg_pool2d(decoded, tuple(z.shape[-2:]))
        latents.append(z.permute(0, 2, 3, 1).numpy())
        colours.append(small.permute(0, 2, 3, 1).numpy())
    return np.concatenate(latents), np.concatenate(colours)


def fit(latents: np.ndarray, colours: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares ``colours ~ latents @ W + b``; returns (W [C, 3], b [3]).

    Minimises ``mean ||y - x W - b||^2 + ridge ||W||^2`` (b not penalised): ``W = (Xc^T Xc + ridge
    N I)^-1 Xc^T Yc`` on centred data, ``b = mean(y) - mean(x) W``.
    """
    x = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    y = colours.reshape(-1, 3).astype(np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    weights = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ yc)
    return weights, y_mean - x_mean @ weights


def score(latents: np.ndarray, colours: np.ndarray, weights: np.ndarray,
          bias: np.ndarray) -> tuple[float, float, float]:
    """(R^2 of the linear map, correlation of the clamped preview with the decoded colours over all
    images, median of that correlation over single images)."""
    x = latents.reshape(len(latents), -1, latents.shape[-1]).astype(np.float64)
    y = colours.reshape(len(colours), -1, 3).astype(np.float64)
    predicted = x @ weights + bias
    r2 = 1.0 - float(((y - predicted) ** 2).sum() / ((y - y.reshape(-1, 3).mean(0)) ** 2).sum())
    preview = np.clip(predicted, -1.0, 1.0)
    corr = float(np.corrcoef(preview.ravel(), y.ravel())[0, 1])
    each = [np.corrcoef(p.ravel(), t.ravel())[0, 1] for p, t in zip(preview, y, strict=True) if t.std() > 0]
    return r2, corr, float(np.median(each))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, default=BUNDLED, help="VAE or checkpoint file (default: the bundled one)")
    parser.add_argument("--name", default=None, help=f"table entry (default {BUNDLED_NAME} for the bundled VAE)")
    parser.add_argument("--models", default=None, help="which models sample in this space (for the table)")
    parser.add_argument("--images", type=Path, help="folder of images (default: procedural scenes)")
    parser.add_argument("--count", type=int, default=512, help="images to use (default 512)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--ridge", type=float, default=RIDGE, help=f"ridge penalty on the factors (default {RIDGE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path, default=FACTORS_FILE, help="the factor table to update")
    parser.add_argument("--no-write", action="store_true", help="print the entry, do not write the table")
    args = parser.parse_args(argv)

    from ldmgraph.models import load_vae

    bundled = args.vae.resolve() == BUNDLED.resolve()
    name = args.name or (BUNDLED_NAME if bundled else None)
    if name is None:
        parser.error("--name is required for a VAE other than the bundled one")
    torch.manual_seed(args.seed)
    vae = load_vae(args.vae, dtype="float32")
    if args.images is not None:
        images, described = folder_images(args.images, args.count, args.size)
    else:
        images, described = scene_images(args.count, args.size, args.seed)
    latents, colours = pairs(vae, images)
    cut = max(1, len(images) * 3 // 4)
    weights, bias = fit(latents[:cut], colours[:cut], args.ridge)
    r2, corr, each = score(latents[cut:], colours[cut:], weights, bias) if cut < len(images) else (float("nan"),) * 3

    table = json.loads(args.table.read_text(encoding="utf-8")) if args.table.exists() else {"spaces": {}}
    old = table["spaces"].get(name)
    entry = {
        "channels": int(latents.shape[-1]),
        "scale_factor": round(float(vae.scale_factor), 8),
        "factors": [[round(float(v), 4) for v in row] for row in weights],
        "bias": [round(float(v), 4) for v in bias],
        "models": args.models or (BUNDLED_MODELS if bundled else (old or {}).get("models", "")),
        "source": f"fitted by benchmarks/fit_preview_factors.py: {args.vae.name}, {described}, ridge {args.ridge}; "
                  f"held-out R^2 {r2:.3f}, preview-to-decoded correlation {corr:.3f} over all images "
                  f"(median {each:.3f} per image)",
    }
    diff = float("nan")
    if old is not None and old.get("channels") == entry["channels"]:
        diff = float(np.abs(np.asarray(old["factors"]) - np.asarray(entry["factors"])).max())
    print(json.dumps({name: entry}, indent=2))
    if not args.no_write:
        table["spaces"][name] = entry
        args.table.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.table}")
    print(f"space={name} channels={entry['channels']} heldout_r2={r2:.4f} heldout_corr={corr:.4f} "
          f"heldout_corr_per_image={each:.4f} max_abs_diff_vs_table={diff:.4f}")


if __name__ == "__main__":
    main()
