"""The time-conditional U-Net eps_theta(z_t, t, tau(y)) of latent diffusion.

Rombach et al. 2022, Sec. 3.3 and Appendix E; the architecture is the ADM U-Net of Dhariwal &
Nichol 2021 (residual blocks with a timestep embedding, skip connections between the down and up
paths) with spatial transformers (`attention.SpatialTransformer`) at the chosen resolutions.

The constructor takes the parameter names of the original latent-diffusion configs
(`model.params.unet_config.params`), and module attribute names mirror the original checkpoint
keys under `model.diffusion_model.` (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`,
`middle_block.0.in_layers.0.weight`, `out.2.bias`, ...), so SD1.x/2.x files load as they are.
SDXL base and refiner are this class too (`ldmgraph.models.sdxl.base_unet` / `refiner_unet`): a
transformer depth per level (0 = no attention there), 64 channels per head, linear projections,
and `num_classes="sequential"` with `adm_in_channels` 2816 / 2560 for the `label_emb` MLP that
takes the pooled text embedding and the size / crop / aesthetic-score features as `y`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmgraph.models.attention import (
    AttentionBlock,
    ContextRefiner,
    GroupNorm32,
    SpatialTransformer,
    zero_module,
)
from ldmgraph.models.kernels import Conv2d


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape [B, dim].

    Frequencies exp(-ln(max_period) * i / half), i < half (Vaswani et al. 2017, Sec. 3.5), cosines
    first as in the original LDM code (diffusers: `flip_sin_to_cos=True, freq_shift=0`).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that passes the timestep embedding to residual blocks and the context
    to attention blocks (original `TimestepEmbedSequential`; its children are keys `.0`, `.1`, ...).

    `copies` > 1: `x` is one of that many equal stacks of the batch that `emb` and `context`
    belong to (`UNetModel.forward`); the layers before the first spatial transformer run on that
    stack only, and the output is the one stack's if no spatial transformer came, else the whole
    batch's. (A keyword of `forward`, not another method, so forward hooks on the block still run.)
    """

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
        copies: int = 1,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context) if copies == 1 else layer(x, context, copies)
                copies = 1  # from here on the whole batch
            elif isinstance(layer, AttentionBlock):  # self-attention only: it never reads the context
                x = layer(x)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _copies(*tensors: torch.Tensor | None) -> int:
    """How many equal stacks the batch is: the most c (dividing the batch) for which every given
    tensor repeats its first B/c rows c times (classifier-free guidance stacks [x, x] at one
    timestep). 1 when no such c >= 2."""
    batch = tensors[0].shape[0]  # type: ignore[union-attr]
    for c in range(batch, 1, -1):
        if batch % c:
            continue
        m = batch // c  # rows period m: row i equals row i + m throughout
        if all(t is None or torch.equal(t[m:], t[:-m]) for t in tensors):
            return c
    return 1


class Downsample(nn.Module):
    """Halve the resolution: a strided 3x3 convolution (key `op`), or average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution (key `conv`)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size``: the skip connection's height and width, which an odd size makes other than 2x
        (then nearest-neighbour resizing to it, as diffusers' ``upsample_size``)."""
        if size is not None and tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block with a timestep embedding (Dhariwal & Nichol 2021, original `ResBlock`).

    h = conv(SiLU(GN(x))); h += W emb (or GN(h) * (1 + scale) + shift with scale-shift norm);
    h = conv(dropout(SiLU(GN(h)))); out = skip(x) + h. Keys: `in_layers.{0,2}`, `emb_layers.1`,
    `out_layers.{0,3}`, `skip_connection`.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        # resblock_updown: the block also resamples (nearest x2 or 2x2 average pooling, no weights),
        # h after in_layers' activation and x before the skip, as the original ResBlock's h_upd / x_upd
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            h = self.in_layers[2](self.resample(self.in_layers[:2](x)))
            x = self.resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if emb_out.shape[0] != h.shape[0]:
            # `x` is the first of equal stacks of the batch (`UNetModel.forward`); `emb` is the whole
            # batch's, projected as a whole so that its rows come out as they do without stacks
            # (a one-row matrix product takes another kernel, with other roundings)
            emb_out = emb_out[: h.shape[0]]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    """An int applies to every level; a list gives one value per level."""
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise ValueError(f"UNetModel: {name} has {len(values)} entries but channel_mult has {levels} levels")
    return values


class UNetModel(nn.Module):
    """The latent-diffusion U-Net (original `ldm.modules.diffusionmodules.openaimodel.UNetModel`).

    Args (original config names):
        in_channels: latent channels plus concatenated conditioning (4, 7 for the paper's
            super-resolution/inpainting models, 9 for SD inpainting).
        out_channels: predicted channels (the latent's).
        model_channels: base width; level i has model_channels * channel_mult[i] channels.
        attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention runs.
        num_res_blocks: residual blocks per level (int or one per level).
        channel_mult: width multipliers, one per level (any length >= 1).
        num_heads / num_head_channels: heads per attention layer, or channels per head (set one,
            leave the other at -1).
        transformer_depth: transformer blocks per spatial transformer (int or one per level).
        context_dim: width of the cross-attention context; None means no cross-attention: the
            attention layers are self-attention `AttentionBlock`s (pure concat models).
        use_linear_in_transformer: SD2's linear proj_in/proj_out instead of 1x1 convolutions.
        num_classes: class conditioning: an int (embedding table `label_emb`), "continuous"
            (a linear layer of a scalar) or "sequential" (an MLP of an `adm_in_channels` vector).
        norm_groups: GroupNorm groups (32 as the original; smaller models may need fewer).
        context_refiner: not in the original: ``{"width", "depth", "heads", "max_tokens"}`` of a
            small transformer that mixes the context's tokens before every cross-attention reads
            them (`ContextRefiner`, keys `context_refiner.*`); None (the default) leaves the
            context as the text encoder gives it, as every released model does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int | Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        num_classes: int | str | None = None,
        adm_in_channels: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        conv_resample: bool = True,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        norm_groups: int = 32,
        image_size: int | None = None,
        use_fp16: bool = False,
        dims: int = 2,
        context_refiner: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"UNetModel: only 2-D U-Nets are supported (dims={dims})")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels (both are -1)")
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        if use_spatial_transformer and context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer=True needs a context_dim")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("UNetModel: a context_dim needs use_spatial_transformer=True")
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError('UNetModel: num_classes="sequential" needs adm_in_channels')
        if context_refiner is not None and context_dim is None:
            raise ValueError("UNetModel: a context_refiner needs a context_dim (it refines the cross-attention context)")

        levels = len(channel_mult)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.context_refiner = ContextRefiner(context_dim, **context_refiner) if context_refiner is not None else None
        self.num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        time_embed_dim = model_channels * 4

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if isinstance(num_classes, int):
            self.label_emb: nn.Module = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = nn.Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            assert adm_in_channels is not None
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
        elif num_classes is not None:
            raise ValueError(f"UNetModel: unknown num_classes={num_classes!r}")

        def attention(ch: int, level: int) -> nn.Module:
            if num_head_channels == -1:
                heads = num_heads
            else:
                if ch % num_head_channels:
                    raise ValueError(f"UNetModel: {ch} channels are not divisible by num_head_channels={num_head_channels}")
                heads = ch // num_head_channels
            if ch % heads:
                raise ValueError(f"UNetModel: {ch} channels are not divisible by num_heads={heads}")
            if not use_spatial_transformer:
                return AttentionBlock(ch, heads, -1, use_checkpoint, use_new_attention_order, norm_groups)
            disable_sa = bool(disable_self_attentions[level]) if disable_self_attentions else False
            return SpatialTransformer(
                ch, heads, ch // heads, depths[level], dropout, context_dim, disable_sa,
                use_linear_in_transformer, use_checkpoint, norm_groups,
            )

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, ch_out, False, use_scale_shift_norm, use_checkpoint, norm_groups,
                up=up, down=down,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != levels - 1:
                down: nn.Module = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention(ch, levels - 1), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, level))
                if level and i == self.num_res_blocks[level]:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch),
            nn.SiLU(),
            zero_module(Conv2d(ch, out_channels, 3, padding=1)),
        )

    patch_hooks: Any = None
    """Set only while a patched handle runs (`ldmgraph.models.patches.BlockHooks`): hooks on the
    blocks' inputs and outputs and on each output block's skip connection."""

    def keep_fp32(self) -> UNetModel:
        """Keep the timestep and class embeddings in float32 when the rest is bf16/fp16.

        Sinusoidal features of timesteps up to 1000 need more mantissa than bf16's 8 bits (nearby
        timesteps would embed alike); the MLP is tiny, so float32 costs nothing measurable.
        """
        self.time_embed.float()
        if self.num_classes is not None:
            self.label_emb.float()
        return self

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict eps (or v) for latents `x` [B, C, h, w] at `timesteps` [B] (or a scalar).

        `context` [B, T, context_dim] feeds cross-attention; `y` is the class label / vector
        when the model has `num_classes`. `control` holds ControlNet residuals, one per input
        block then one for the middle block (`ldmgraph.models.controlnet`): the middle one is
        added to the middle block's output and the others to the skips they match.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "UNetModel: y must be given exactly when the model is class-conditional "
                f"(num_classes={self.num_classes!r}, y {'given' if y is not None else 'missing'})"
            )
        if self.context_dim is not None and context is None:
            raise ValueError("UNetModel: this U-Net has cross-attention; pass a context [B, T, context_dim]")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        # the time embedding may be kept in float32 while the rest runs in bf16/fp16 (see keep_fp32)
        embed_dtype = next(self.time_embed.parameters()).dtype
        dtype = next(self.out.parameters()).dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(embed_dtype))
        if y is not None:
            if self.num_classes == "continuous" and y.dim() == 1:
                y = y[:, None]
            label_dtype = next(self.label_emb.parameters()).dtype
            emb = emb + self.label_emb(y.to(label_dtype) if y.is_floating_point() else y).to(emb.dtype)
        emb = emb.to(dtype)
        if context is not None:
            context = context.to(dtype)
            if self.context_refiner is not None:
                context = self.context_refiner(context)

        h = x.type(dtype)
        hs: list[torch.Tensor] = []
        hooks = self.patch_hooks
        # Classifier-free guidance stacks the same latents at the same timestep for cond and uncond;
        # until the first cross-attention the stacks' activations are equal, so that part (input
        # convolution, first residual blocks, first self-attention) runs on one stack.
        copies = 1
        if hooks is None and not self.training and not torch.compiler.is_compiling():
            copies = _copies(h, timesteps, y)
        if copies > 1:
            batch = h.shape[0]
            h = h[: batch // copies]
            for module in self.input_blocks:
                h = module(h, emb, context, copies=copies)
                if h.shape[0] == batch:  # past the first cross-attention: the skips so far are repeated
                    hs = [skip.repeat(copies, 1, 1, 1) for skip in hs]
                    hs.append(h)
                    break
                hs.append(h)
            else:  # no cross-attention in the down path
                h = h.repeat(copies, 1, 1, 1)
                hs = [skip.repeat(copies, 1, 1, 1) for skip in hs]
        for i, module in enumerate(self.input_blocks):
            if i < len(hs):
                continue
            h = module(h, emb, context) if hooks is None else hooks.run("input_blocks", i, module, h, emb, context)
            hs.append(h)
        if hooks is None:
            h = self.middle_block(h, emb, context)
        else:
            h = hooks.run("middle_block", 0, self.middle_block, h, emb, context)
        if control is not None:
            if len(control) != len(hs) + 1:
                raise ValueError(f"UNetModel: control has {len(control)} residuals; this U-Net takes {len(hs) + 1}")
            h = h + control[-1].to(h.dtype)
            hs = [skip + residual.to(skip.dtype) for skip, residual in zip(hs, control[:-1], strict=True)]
        for i, module in enumerate(self.output_blocks):
            skip = hs.pop()
            size = hs[-1].shape[-2:] if hs else None
            if hooks is None:
                h = module(torch.cat([h, skip], dim=1), emb, context, size)
            else:
                h, skip = hooks.skip(i, h, skip)
                h = hooks.run("output_blocks", i, module, torch.cat([h, skip], dim=1), emb, context, size)
        return self.out(h).type(x.dtype)
