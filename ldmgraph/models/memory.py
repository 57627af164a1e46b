"""Working memory of the U-Net and the autoencoder at a given size, from their configuration. No torch.

Inference keeps no autograd graph, so what lives at once is: the U-Net's skip connections (one
feature map per input block, Ronneberger et al. 2015), plus the temporaries of the largest block
at the finest level. A transformer block's feed-forward layer is the widest of those: GEGLU
projects C channels to 8C and splits them into two halves of 4C (Shazeer 2020), so about 18C
channels per token are alive; attention itself goes through `scaled_dot_product_attention`, whose
fused kernels never hold the (hw)^2 score matrix. Measured, the finest transformer level holds
about 32C per token at its peak (the bundled model's U-Net, batch 2: 148 MiB at 128x128 latents and
538 MiB at 256x256, where 18C gave 84 and 336), counted so since the estimate must not fall below
the measured peak. A residual block holds about 6C. The decoder's
finest level takes the upsampled maps of the level below (mult[1] C channels) at full resolution.
The figures are checked against measured peak memory in tests/nodes/test_memory_estimate.py.
"""

from __future__ import annotations

from typing import Any

ATTENTION_BLOCK_CHANNELS = 32  # alive per token, in units of the block's channels (feed-forward peak)
RESBLOCK_CHANNELS = 6
# The autoencoder's mid-block attention holds at most this many bytes of scores at once (it
# attends in chunks of queries above that; `ldmgraph.models.autoencoder`).
ATTENTION_CHUNK_BYTES = 256 * 2**20
DECODER_BELOW, DECODER_TOP = 2, 4  # full-resolution maps alive while decoding, per channel of each width


def unet_bytes(unet: dict[str, Any], batch: int, height: int, width: int, itemsize: int = 4) -> int:
    """Peak bytes of one U-Net call on ``batch`` latents of ``height`` x ``width``."""
    base = int(unet["model_channels"])
    mult = [int(m) for m in unet["channel_mult"]]
    per = unet["num_res_blocks"]
    per = per if isinstance(per, list) else [per] * len(mult)
    attention = {int(r) for r in unet.get("attention_resolutions") or []}
    skips, peak = base * height * width, 0
    for level, m in enumerate(mult):
        cells = -(-height // 2**level) * -(-width // 2**level)
        channels = base * m
        skips += int(per[level]) * channels * cells
        if level + 1 < len(mult):
            skips += channels * -(-height // 2 ** (level + 1)) * -(-width // 2 ** (level + 1))
        factor = ATTENTION_BLOCK_CHANNELS if 2**level in attention else RESBLOCK_CHANNELS
        peak = max(peak, factor * channels * cells, 2 * RESBLOCK_CHANNELS * channels * cells)
    return batch * (skips + peak) * itemsize


def _mid_attention_bytes(mult: list[int], height: int, width: int, itemsize: int) -> int:
    """The autoencoder's middle block attends over every cell at its coarsest level; on the CPU the
    fused kernel is not taken for its single-head [N, C] layout, so the N x N scores and their
    softmax are held (measured: about 2 N^2 floats)."""
    cells = -(-height // 2 ** (len(mult) - 1)) * -(-width // 2 ** (len(mult) - 1))
    return min(2 * cells * cells * itemsize, 2 * ATTENTION_CHUNK_BYTES)


def vae_decode_bytes(vae: dict[str, Any], batch: int, height: int, width: int, itemsize: int = 4) -> int:
    """Peak bytes of decoding ``batch`` latents to ``height`` x ``width`` pixels (one image at a time,
    as `VAEHandle.decode` does, plus the decoded batch)."""
    dd = vae["ddconfig"]
    ch, mult = int(dd["ch"]), [int(m) for m in dd["ch_mult"]]
    below = mult[1] if len(mult) > 1 else mult[0]
    one = height * width * ch * (DECODER_BELOW * below + DECODER_TOP * mult[0]) * itemsize
    return one + _mid_attention_bytes(mult, height, width, itemsize) + 2 * batch * height * width * 3 * 4


def vae_encode_bytes(vae: dict[str, Any], batch: int, height: int, width: int, itemsize: int = 4) -> int:
    """Peak bytes of encoding ``batch`` images of ``height`` x ``width`` pixels (the batch at once)."""
    dd = vae["ddconfig"]
    ch, mult = int(dd["ch"]), [int(m) for m in dd["ch_mult"]]
    linear = height * width * ch * RESBLOCK_CHANNELS * mult[0] * itemsize
    return batch * (linear + _mid_attention_bytes(mult, height, width, itemsize))
