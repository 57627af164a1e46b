"""CPU kernel choices for the diffusion models' layers (same parameters and checkpoint keys).

`Conv2d` is `torch.nn.Conv2d` with one dispatch added: on CPU, a convolution whose output has at
most `SMALL_MAP_ROWS` positions over the batch (the U-Net's deepest levels: 4x4 and 8x8 maps at
256 px) and whose weight has at least `SMALL_MAP_MIN_WEIGHT` elements (SD's 1280-channel levels,
not a small model's 256) runs as one matrix product over the unfolded input (im2col), rows = output positions,
columns = input patches (Chellapilla et al. 2006, "High Performance Convolutional Neural
Networks for Document Processing"). There oneDNN's direct convolution spends most of its time
reordering the large weight (1280 x 2560 x 3 x 3) into its blocked layout on every call, while
the product reads the weight in place as a [out, in * kh * kw] view (no copy kept). Measured
with torch 2.13 on this project's AVX-512 CPU, one thread, batch 2, CPU time:

    in -> out @ map      fp32 conv / gemm (ms)   bf16 conv / gemm (ms)
    2560 -> 1280 @ 4x4      93.4 / 31.1             41.8 / 15.6
    1280 -> 1280 @ 4x4      43.7 / 15.9              9.0 /  7.5
    2560 -> 1280 @ 8x8     127.8 / 97.0             69.5 / 45.7
    1920 -> 1280 @ 8x8     101.0 / 76.2             52.0 / 34.6
    1280 -> 1280 @ 8x8      63.4 / 49.3             21.9 / 23.0
    1280 -> 1280 @ 16x16   166.5 / 197.3            70.4 / 89.5   (512 rows: direct stays)

Both paths accumulate in fp32 (oneDNN's bf16 matrix products do), so results agree to rounding.
`benchmarks/precision.py --profile-ops` shows the effect on a whole U-Net step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# output positions (batch x height x width) up to which a CPU convolution runs as a matrix product
SMALL_MAP_ROWS = 128
# ... and only when its weight is this large: the reorder the product avoids costs little on small
# weights, where oneDNN's direct convolution wins (fp32, one thread, batch 2, 8x8, CPU time: 256 ->
# 256 direct 1.5 / gemm 2.2 ms, 640 -> 640 10.8 / 13.1, 1024 -> 1024 47.0 / 32.0, 1280 -> 1280 65.7 / 47.6)
SMALL_MAP_MIN_WEIGHT = 1 << 23


def conv_as_matmul(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`conv(x)` as im2col then one matrix product: [B*Ho*Wo, C*kh*kw] @ [C*kh*kw, O] (+ bias)."""
    b, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation  # type: ignore[misc]
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))  # [B, C*kh*kw, Ho*Wo]
    rows = cols.transpose(1, 2).reshape(b * ho * wo, -1)
    weight = conv.weight.view(conv.out_channels, -1).t()
    out = torch.mm(rows, weight) if conv.bias is None else torch.addmm(conv.bias, rows, weight)
    # [B*Ho*Wo, O] -> [B, O, Ho, Wo], contiguous channels-first as the direct convolution returns
    return out.view(b, ho, wo, -1).permute(0, 3, 1, 2).contiguous()


def _small_map(x: Tensor, conv: nn.Conv2d) -> bool:
    if x.device.type != "cpu" or x.dim() != 4 or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str) or conv.kernel_size == (1, 1) or not conv.weight.is_contiguous():
        return False
    if conv.weight.numel() < SMALL_MAP_MIN_WEIGHT:
        return False
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation  # type: ignore[misc]
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.shape[0] * ho * wo <= SMALL_MAP_ROWS


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, keys and results) that runs small CPU maps as a matrix product."""

    def forward(self, x: Tensor) -> Tensor:
        if _small_map(x, self):
            return conv_as_matmul(x, self)
        return super().forward(x)
