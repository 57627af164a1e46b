"""Training throughput of one U-Net in pixel space (64x64x3) vs latent space (16x16x4).

The central claim of Rombach et al. 2022 (Sec. 3, Fig. 6): diffusion in an f=4 autoencoder's
latent space costs far less per image than in pixel space. This times full training steps
(forward, eps-MSE loss, backward, AdamW) of the bundled text-to-image U-Net configuration on both
inputs, alternating the two so machine load affects both alike, and prints images per second.

    python benchmarks/latent_vs_pixel.py [--batch 16] [--rounds 3] [--threads 2]

Last line: ``latent_ips=<x> pixel_ips=<y> ratio=<x/y>``.
"""

from __future__ import annotations

import argparse
import time

import torch

from ldmgraph.models.unet import UNetModel
from ldmgraph.train.ldm import default_unet


def make_step(channels: int, side: int, batch: int) -> tuple[UNetModel, object]:
    torch.manual_seed(0)
    unet = UNetModel(**{**default_unet("ldm"), "in_channels": channels, "out_channels": channels})
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, side, side)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, 32, 384)

    def step() -> None:
        loss = (unet(x, t, context=context) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return unet, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per space (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spaces = {"latent": make_step(4, 16, args.batch)[1], "pixel": make_step(3, 64, args.batch)[1]}
    for step in spaces.values():  # warm-up
        step()
    seconds = dict.fromkeys(spaces, 0.0)
    for _ in range(args.rounds):
        for name, step in spaces.items():
            start = time.perf_counter()
            step()
            seconds[name] += time.perf_counter() - start
    ips = {name: args.rounds * args.batch / s for name, s in seconds.items()}
    params = sum(p.numel() for p in make_step(4, 16, 1)[0].parameters())
    print(f"U-Net {params / 1e6:.2f}M parameters, batch {args.batch}, {args.rounds} steps each, "
          f"{args.threads} threads")
    print(f"latent_ips={ips['latent']:.1f} pixel_ips={ips['pixel']:.2f} ratio={ips['latent'] / ips['pixel']:.1f}")


if __name__ == "__main__":
    main()
