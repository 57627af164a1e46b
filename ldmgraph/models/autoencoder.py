"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1, App. G).

The encoder E maps an image x in -1..1 to the moments of a diagonal Gaussian posterior
q(z|x) = N(mean, exp(logvar)); the decoder D maps a latent back to pixels. A downsampling factor
f = 2^(len(ch_mult) - 1) (4 or 8). The constructor takes the original config names
(`first_stage_config.params`: `ddconfig`, `embed_dim`) and attribute names mirror the original
keys under `first_stage_model.` (`encoder.down.0.block.0.norm1.weight`, `quant_conv.weight`,
`decoder.up.3.upsample.conv.weight`, ...). Normalisation is GroupNorm(32), eps 1e-6, as the
original `Normalize`; the nonlinearity is SiLU ("swish").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmgraph.models.attention import GroupNorm32
from ldmgraph.models.memory import ATTENTION_CHUNK_BYTES


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Residual block without timestep: GN, SiLU, conv, GN, SiLU, dropout, conv, plus shortcut.

    Keys `norm1`, `conv1`, `norm2`, `conv2`, and `nin_shortcut` (1x1) or `conv_shortcut` (3x3)
    when the width changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        conv_shortcut: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut_name: str | None = None
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                self.shortcut_name = "conv_shortcut"
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
                self.shortcut_name = "nin_shortcut"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut_name is not None:
            x = getattr(self, self.shortcut_name)(x)
        return x + h


# Most bytes of attention scores held at once (ATTENTION_CHUNK_BYTES): big latents (a 2048 px SD
# image has 65,536 latent pixels, whose full score matrix is 16 GiB) attend in chunks of queries.


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over query chunks: each query's softmax is over all keys, so the result is the same."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    chunk = max(1, ATTENTION_CHUNK_BYTES // (4 * n_k * q.shape[0] * q.shape[1]))
    if n_q <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.split(chunk, dim=-2)], dim=-2)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with 1x1 convolutions `q`, `k`, `v`, `proj_out`."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C] views; one head of width C, scale 1/sqrt(C)
        q, k, v = (conv(hn).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        out = _chunked_attention(q, k, v)
        # contiguous channels-first again: the convolutions after this block are slow on channels-last strides
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w).contiguous())


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a 3x3 stride-2 convolution (`conv`)."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 convolution (`conv`)."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks after each block, when the
    level has attention), then the resampler under its original name (`downsample`/`upsample`)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample_name: str | None = None

    def set_resample(self, name: str, module: nn.Module) -> None:
        setattr(self, name, module)
        self.resample_name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


def _attn(channels: int, norm_groups: int, attn_type: str) -> nn.Module:
    """The original `make_attn`: "vanilla" self-attention, or "none" (an identity without weights)."""
    if attn_type == "vanilla":
        return AttnBlock(channels, norm_groups)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"autoencoder: attn_type {attn_type!r} is not supported: use 'vanilla' or 'none'")


class _Mid(nn.Module):
    """The bottleneck: `block_1`, `attn_1` (no weights when attn_type is "none"), `block_2`."""

    def __init__(self, channels: int, dropout: float, norm_groups: int, attn_type: str = "vanilla") -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups=norm_groups)
        self.attn_1 = _attn(channels, norm_groups, attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups=norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 * z_channels, H / f, W / f] (or z_channels)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        norm_groups: int = 32,
        attn_type: str = "vanilla",
        **ignored: Any,
    ) -> None:
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_ch_mult[i_level], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_attn(block_in, norm_groups, attn_type))
            if i_level != len(ch_mult) - 1:
                level.set_resample("downsample", Downsample(block_in, resamp_with_conv))
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, norm_groups, attn_type)
        self.norm_out = _norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution part: conv_in and the down levels (what tiled encodes cut into tiles)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part: mid block (global attention), norm and conv_out."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h * f, w * f]."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        norm_groups: int = 32,
        attn_type: str = "vanilla",
        **ignored: Any,
    ) -> None:
        super().__init__()
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, norm_groups, attn_type)
        levels: list[_Level] = []
        for i_level in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(_attn(block_in, norm_groups, attn_type))
            if i_level != 0:
                level.set_resample("upsample", Upsample(block_in, resamp_with_conv))
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(z))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The latent-resolution part: conv_in and the mid block (global attention)."""
        return self.mid(self.conv_in(z))  # type: ignore[no-any-return]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The up levels to full resolution, norm and conv_out (what tiled decodes cut into tiles)."""
        for level in reversed(self.up):
            h = level(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's moments [B, 2C, h, w].

    logvar is clamped to [-30, 20] as in the original code, so std never under- or overflows.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z = mean + std * eps; eps from `generator` (on its device), then moved to the mean's."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(q || N(0, I)) (or KL(q || other)) summed over C, h, w: shape [B] (Kingma & Welling 2014)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` under q, summed over C, h, w: shape [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """The KL autoencoder (original `ldm.models.autoencoder.AutoencoderKL`), images in -1..1.

    `ddconfig`: double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult,
    num_res_blocks, attn_resolutions, dropout (and optionally norm_groups, default 32).
    `embed_dim`: latent channels after `quant_conv` (4 for Stable Diffusion).
    """

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int, **ignored: Any) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true (the encoder predicts mean and logvar)")
        self.ddconfig = dict(ddconfig)
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.ddconfig.get("ch_mult", (1, 2, 4, 8))) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image [B, C, H, W] in -1..1 -> posterior over latents [B, embed_dim, H / f, W / f]."""
        return self.posterior(self.moments(x))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's mean and log-variance [B, 2 * embed_dim, H / f, W / f]."""
        return self.quant_conv(self.encoder(x))

    @staticmethod
    def posterior(moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior given the encoder's moments."""
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, embed_dim, h, w] (unscaled) -> image [B, out_ch, h * f, w * f], about -1..1."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `x`: returns (decoded image, posterior), as the original `forward`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
