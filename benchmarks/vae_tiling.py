"""Tiled VAE decoding: agreement with the whole-image decode, seams, and memory at 2048 px.

Three figures, one run:
- ``tiled_vs_full_mean_abs``: mean |tiled - untiled| of a 512x512 decode (0..1 scale; 1/255 is
  0.0039), on the bundled trained autoencoder (a test scene encoded and decoded again) with 256 px
  tiles, so the image really is cut into tiles. A randomly initialised SD-size autoencoder is not a
  meaningful reference here: its untrained layers amplify the small differences at tile edges
  (about 20/255 measured), so the trained model gives the figure and the random one is reported
  beside it for information (``--random-too``).
- ``seam_score``: mean |gradient| across the tile borders of the tiled decode over the same for the
  untiled decode (1.0: no more edge at the borders than the image has there).
- ``peak_rss_gib_2048``: peak resident memory of a fresh process that builds an SD-size
  autoencoder (ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, random weights: memory does not depend
  on the values) and decodes a 256x256 latent to 2048x2048 with tiling "auto" (the process's VmHWM).

    python benchmarks/vae_tiling.py [--skip-2048]

Last line: ``tiled_vs_full_mean_abs=<x> seam_score=<y> peak_rss_gib_2048=<z>``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ldmgraph.models.checkpoint import load_checkpoint
from ldmgraph.models.vae_tiling import border_positions, seam_score

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "ldmgraph/assets/models/ldmgraph-shapes-txt2img.safetensors"

_DECODE_2048 = r"""
import resource, sys, time, torch
from ldmgraph.models.autoencoder import AutoencoderKL
from ldmgraph.models.handles import VAEHandle
torch.manual_seed(0)
config = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
vae = VAEHandle(AutoencoderKL(config, embed_dim=4).eval(), scale_factor=0.18215)
side = int(sys.argv[1])
start = time.process_time()
image = vae.decode(torch.randn(1, 4, side // 8, side // 8))
assert image.shape == (1, side, side, 3)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = hwm[0] / 2**20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(peak, time.process_time() - start)  # VmHWM: ru_maxrss would keep the parent's peak across exec
"""


def scene(size: int) -> torch.Tensor:
    """A smooth gradient, a sine pattern and a saturated box: [1, size, size, 3] in 0..1."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(12 * xx * yy)], -1).astype(np.float32)
    img[size // 5 : size // 2, size // 4 : 3 * size // 4] = [0.9, 0.2, 0.1]
    return torch.from_numpy(img)[None]


def agreement(vae: object, size: int, tile: int, overlap: int) -> tuple[float, float]:
    """(mean |tiled - untiled|, seam score) of decoding the encoded test scene."""
    z = vae.encode(scene(size), tiled="off")  # type: ignore[attr-defined]
    full = vae.decode(z, tiled="off")  # type: ignore[attr-defined]
    tiled = vae.decode(z, tiled="on", tile_pixels=tile, overlap_pixels=overlap)  # type: ignore[attr-defined]
    f = vae.downscale  # type: ignore[attr-defined]
    borders = border_positions(z.shape[-1], tile // f, overlap // f, f)
    return float((tiled - full).abs().mean()), seam_score(tiled, full, borders, borders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--big", type=int, default=2048, help="side of the bounded-memory decode")
    parser.add_argument("--skip-2048", action="store_true", help="skip the (slow) big decode")
    parser.add_argument("--random-too", action="store_true", help="also report a random SD-size VAE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mean_abs, seams = agreement(load_checkpoint(BUNDLED).vae, args.size, args.tile, args.overlap)
    print(f"bundled autoencoder, {args.size} px, tiles {args.tile} overlap {args.overlap}: "
          f"mean |tiled - full| = {mean_abs * 255:.3f}/255, seam score {seams:.3f}", flush=True)
    if args.random_too:
        sys.path.insert(0, str(ROOT / "tests/models"))
        from test_vae_tiling import _sd_shaped_vae

        r_mean, r_seams = agreement(_sd_shaped_vae(), args.size, args.tile, args.overlap)
        print(f"random SD-shaped autoencoder (untrained, chaotic): {r_mean * 255:.3f}/255, seams {r_seams:.3f}")
    peak = float("nan")
    if not args.skip_2048:
        out = subprocess.run([sys.executable, "-c", _DECODE_2048, str(args.big)], check=True, capture_output=True,
                             text=True, env={"OMP_NUM_THREADS": str(args.threads), "PATH": ""}, cwd=ROOT)
        peak, cpu = (float(v) for v in out.stdout.split())
        print(f"SD-size autoencoder, {args.big}x{args.big} decode (tiling auto): peak RSS {peak:.2f} GiB, "
              f"{cpu:.0f} s CPU")
    print(f"tiled_vs_full_mean_abs={mean_abs:.5f} seam_score={seams:.3f} peak_rss_gib_2048={peak:.2f}")


if __name__ == "__main__":
    main()
