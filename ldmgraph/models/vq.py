"""The VQ-regularised autoencoders of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G).

The paper's second first-stage family: the encoder E and decoder D of the KL model
(`autoencoder.Encoder` / `Decoder`, with `double_z: false`), a 1x1 `quant_conv` to `embed_dim`
channels, a codebook of `n_embed` vectors (`quantize.embedding.weight` [n_embed, embed_dim]) and a
1x1 `post_quant_conv` back. As in the original `VQModelInterface`, the diffusion model works on
the unquantized latent (`encode` does not quantize) and `decode` first snaps every latent vector
to its nearest codebook entry (van den Oord et al. 2017, "Neural Discrete Representation
Learning", Eq. 1), unless told not to (`force_not_quantize`). The latent scale factor is 1.
Attribute names copy the original keys under `first_stage_model.`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldmgraph.models.autoencoder import AutoencoderKL, Decoder, Encoder


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (key `embedding.weight` [n_embed, embed_dim])."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index [B, h, w] of each latent vector of z [B, embed_dim, h, w] (squared L2 distance)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codebook = self.embedding.weight.to(flat.dtype)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as the original VectorQuantizer computes it
        distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2.0 * flat @ codebook.t()
        b, _, h, w = z.shape
        return distance.argmin(dim=1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] with every vector replaced by its nearest codebook entry."""
        idx = self.indices(z)
        return self.embedding(idx).permute(0, 3, 1, 2).to(z.dtype).contiguous()


class Deterministic:
    """A posterior with no spread: what `VQModel.encode` returns, so VAE nodes treat both families alike."""

    def __init__(self, latent: torch.Tensor) -> None:
        self.mean = latent

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class VQModel(nn.Module):
    """The VQ autoencoder (original `ldm.models.autoencoder.VQModelInterface`), images in -1..1.

    `ddconfig` as for `AutoencoderKL` (`double_z` false; `attn_type` "none" for the attention-free
    variant of the inpainting model), `embed_dim` latent channels, `n_embed` codebook size.
    """

    def __init__(
        self,
        ddconfig: dict[str, Any],
        embed_dim: int,
        n_embed: int,
        force_not_quantize: bool = False,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if ddconfig.get("double_z", False):
            raise ValueError("VQModel: ddconfig.double_z must be false (the encoder predicts the latent itself)")
        self.ddconfig = dict(ddconfig)
        self.embed_dim, self.n_embed = embed_dim, n_embed
        self.force_not_quantize = force_not_quantize
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ddconfig.get("ch_mult", (1, 2, 4))) - 1)

    def encode(self, x: torch.Tensor) -> Deterministic:
        """Image [B, C, H, W] in -1..1 -> the unquantized latent [B, embed_dim, H / f, W / f]."""
        return Deterministic(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, force_not_quantize: bool | None = None) -> torch.Tensor:
        """Latent -> image about -1..1; the latent is quantized first unless `force_not_quantize`."""
        skip = self.force_not_quantize if force_not_quantize is None else force_not_quantize
        return self.decoder(self.post_quant_conv(z if skip else self.quantize(z)))


def autoencoder_class(config: dict[str, Any]) -> type[nn.Module]:
    """VQModel for a config with a codebook (`n_embed`), else AutoencoderKL."""
    return VQModel if "n_embed" in config else AutoencoderKL


def detect_vq_config(vae: dict[str, torch.Tensor], kl_config: Any) -> dict[str, Any]:
    """VQModel kwargs from first-stage weights (prefix removed); `kl_config` detects the shared encoder/decoder."""
    codebook = vae["quantize.embedding.weight"]
    quant = vae["quant_conv.weight"]
    ddconfig = dict(kl_config["ddconfig"])
    ddconfig["double_z"] = False
    if "encoder.mid.attn_1.q.weight" not in vae:
        ddconfig["attn_type"] = "none"
    return {"ddconfig": ddconfig, "embed_dim": int(quant.shape[0]), "n_embed": int(codebook.shape[0])}
