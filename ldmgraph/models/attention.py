"""Attention modules of the latent-diffusion U-Net.

The spatial transformer of Rombach et al. 2022 (Sec. 3.3, "Conditioning Mechanisms"): image
features are flattened to tokens, pass through self-attention, cross-attention to a context
tau(y) (softmax(Q K^T / sqrt(d)) V, Q from the image tokens, K and V from the context) and a
GEGLU feed-forward (Shazeer 2020), each pre-normalised and residual. Also the legacy
`AttentionBlock` (self-attention over a fused qkv 1x1 convolution) that the paper's concat models
(super-resolution, inpainting) use where there is no cross-attention.

Attribute names copy the original checkpoint keys (`transformer_blocks.0.attn1.to_q.weight`,
`proj_in`, `qkv`, ...), so original files load with no renaming. All attention goes through
`torch.nn.functional.scaled_dot_product_attention`, whose default scale is 1 / sqrt(d_head).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_CONTEXT_KV: ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = ContextVar(
    "context_kv", default=None
)


@contextmanager
def reuse_context_projections() -> Iterator[None]:
    """Within this scope each cross-attention layer projects a given context tensor to K and V once.

    K = to_k(context) and V = to_v(context) depend only on the conditioning, which a sampling run
    passes unchanged (the same tensor object) at every step: a run enters this scope (through
    `DiffusionModelHandle.sampling_scope`) and its later steps reuse the first step's K and V. The
    cache is keyed by layer and holds the context tensor itself, so another tensor (another entry,
    another conditioning) is projected anew; it lives only as long as the scope, so weight patches
    applied between runs are always seen. Not for use across weight changes inside one scope.
    """
    token = _CONTEXT_KV.set({})
    try:
        yield
    finally:
        _CONTEXT_KV.reset(token)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are taken in fp32 for half-precision inputs, as the original `GroupNorm32`.

    In fp32 it is a plain GroupNorm (no copy). bf16 on CPU also runs the plain kernel: it
    accumulates the mean and variance in fp32 and rounds only the output (measured: the same
    largest error against a float64 reference as upcasting), so no fp32 copies of the input are
    made. fp16 (CUDA) is upcast, because the variance of large activations overflows fp16.
    """

    # set by `ldmgraph.models.vae_tiling.tile_norms` while an image is processed in tiles
    tile_state: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile_state is not None:
            return self.tile_state(self, x)  # type: ignore[no-any-return]
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and (self.weight is None or self.weight.dtype == x.dtype):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
        return super().forward(x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: the output layers of residual branches start as identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] as a view (SDPA accepts strided inputs)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` to `context` (self-attention when `context` is None).

    Keys `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` (with bias), as in the original
    `ldm.modules.attention.CrossAttention`.
    """

    attention_override: Any = None
    """Set only while a patched handle runs (`ldmgraph.models.patches.AttentionPatch`):
    `override(q, k, v) -> out` on [B, heads, N, d] instead of scaled dot-product attention."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = _heads_first(self.to_q(x), self.heads)
        k, v = self._keys_values(x if context is None else context, cross=context is not None)
        if self.attention_override is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.attention_override(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def _keys_values(self, context: torch.Tensor, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `context`; a cross-attention context's are reused inside
        `reuse_context_projections` (see there)."""
        # not while torch.compile traces (--compile): dynamo cannot read a ContextVar and would split the graph
        cache = _CONTEXT_KV.get() if cross and not torch.compiler.is_compiling() else None
        if cache is not None:
            hit = cache.get(id(self))
            if hit is not None and hit[0] is context:
                return hit[1], hit[2]
        k = _heads_first(self.to_k(context), self.heads)
        v = _heads_first(self.to_v(context), self.heads)
        if cache is not None:
            cache[id(self)] = (context, k, v)
        return k, v


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer"): x * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer feed-forward with a 4x GEGLU hidden layer (keys `net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; each pre-LayerNorm and residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, copies: int = 1) -> torch.Tensor:
        """`copies` > 1: `x` is one of that many equal stacks of the batch `context` belongs to
        (`UNetModel.forward`). The self-attention sees only the image tokens, so it runs once on `x`;
        its result is stacked `copies` times before the cross-attention, where the contexts differ."""
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, context, copies, use_reentrant=False)
        return self._forward(x, context, copies)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, copies: int = 1) -> torch.Tensor:
        if copies > 1 and not self.disable_self_attn and self.attn1.attention_override is None:
            x = (self.attn1(self.norm1(x)) + x).repeat(copies, 1, 1)
        else:  # the first attention reads the context, or a patch replaces it: the whole batch
            x = x.repeat(copies, 1, 1) if copies > 1 else x
            x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map [B, C, H, W] (Rombach et al. 2022, Fig. 3).

    `use_linear=False` is the SD1 form (1x1 convolutions `proj_in`/`proj_out` on the map);
    `use_linear=True` the SD2 form (linear layers on the tokens). Normalisation: GroupNorm(32),
    eps 1e-6, as the original `Normalize`.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(norm_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn, use_checkpoint)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, copies: int = 1) -> torch.Tensor:
        """`copies` > 1: `x` is one of that many equal stacks of the batch `context` belongs to
        (`UNetModel.forward`); the output is the whole batch's, the stacks' shared work done once."""
        b, _, h, w = x.shape
        x_in = x if copies == 1 else x.repeat(copies, 1, 1, 1)
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context, copies if i == 0 else 1)
        b = x.shape[0]
        if self.use_linear:
            x = self.proj_out(x)
        # back to a contiguous channels-first map: the convolutions and GroupNorms after this
        # block are several times slower on the channels-last strides a bare view would leave
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class AttentionBlock(nn.Module):
    """Self-attention over a feature map with a fused qkv 1x1 convolution (original `AttentionBlock`).

    Used by the U-Nets with no cross-attention (the paper's super-resolution and inpainting
    models). `qkv` is a Conv1d(C, 3C, 1); in the legacy order its output rows are grouped per
    head as [q_h, k_h, v_h] (`QKVAttentionLegacy`), in the new order as [q, k, v] then heads
    (`QKVAttention`). Normalisation GroupNorm(32), eps 1e-5.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"AttentionBlock: {channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat))  # [B, 3C, N]
        heads, n = self.num_heads, x_flat.shape[-1]
        if self.use_new_attention_order:
            qkv = qkv.view(b, 3, heads, c // heads, n)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            qkv = qkv.view(b, heads, 3, c // heads, n)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # [B, H, D, N] -> [B, H, N, D] views for SDPA
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, n)
        return (x_flat + self.proj_out(out)).reshape(b, c, *spatial)


class ContextRefiner(nn.Module):
    """A small transformer over the context's tokens, applied before any cross-attention reads it.

    A frozen text encoder gives each word a vector that carries little of the words around it:
    in "a red circle on the left and a blue square on the right" the two colour words hardly say
    which clause, and so which place, they belong to. One cross-attention layer at a pixel cannot
    follow "my place -> its clause -> that clause's colour" in one hop. This module lets the
    tokens exchange information first (the trainable part of the paper's tau_theta on top of a
    frozen encoder): context + proj_out(transformer(proj_in(context) + positions)).

    ``proj_out`` starts at zero, so a refiner added to a trained U-Net leaves it unchanged until it
    learns. Keys: ``proj_in``, ``position`` [max_tokens, width], ``blocks.N.{norm1,attn,norm2,ff}``,
    ``norm``, ``proj_out``.
    """

    def __init__(self, context_dim: int, width: int = 128, depth: int = 2, heads: int = 4,
                 max_tokens: int = 77) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ContextRefiner: width {width} is not divisible by heads={heads}")
        self.max_tokens = max_tokens
        self.proj_in = nn.Linear(context_dim, width)
        self.position = nn.Parameter(torch.randn(max_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(_RefinerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = zero_module(nn.Linear(width, context_dim))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        tokens = context.shape[1]
        if tokens > self.max_tokens:
            raise ValueError(f"ContextRefiner: the context has {tokens} tokens; this model takes at most "
                             f"{self.max_tokens}")
        h = self.proj_in(context) + self.position[:tokens].to(context.dtype)
        for block in self.blocks:
            h = block(h)
        return context + self.proj_out(self.norm(h))


class _RefinerBlock(nn.Module):
    """Pre-LayerNorm self-attention and 4x GEGLU feed-forward, each residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, None, heads, width // heads)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x)) + x
        return self.ff(self.norm2(x)) + x
