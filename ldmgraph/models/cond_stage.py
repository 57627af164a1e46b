"""The paper's own conditioning models (original `ldm.modules.encoders.modules`, key names kept under
`cond_stage_model.`).

`ClassEmbedder` (`embedding` [n_classes, dim], a one-token context for cross-attention; the
class-conditional ImageNet model's last class is the unconditional one) and `SpatialRescaler`
(bilinear downsampling by 2 `n_stages` times, then a bias-free 1x1 `channel_mapper`: the
semantic-synthesis model's one-hot maps -> 3 channels, concatenated). The BERT-tokenised text
transformer is `text_encoders.LDMBertTransformer`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


class ClassEmbedder(nn.Module):
    """Class label -> a one-token cross-attention context [B, 1, dim] (original `ClassEmbedder`)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, **ignored: Any) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels.to(self.embedding.weight.device))[:, None]


class SpatialRescaler(nn.Module):
    """Resize by `multiplier` `n_stages` times, then map channels with a 1x1 conv (original `SpatialRescaler`)."""

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
        **ignored: Any,
    ) -> None:
        super().__init__()
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.in_channels = in_channels
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.channel_mapper is not None else x
