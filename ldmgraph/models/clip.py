"""The CLIP text transformer (Radford et al. 2021) of Stable Diffusion 1 and 2, without transformers.

Importing transformers costs seconds (it pulls in torch.distributed, torch._dynamo and scipy), more
than reading an SD-size checkpoint from the page cache; the text tower is ~70 lines of maths. The
attribute names are those of transformers' `CLIPTextModel` state dict (`embeddings.token_embedding`,
`encoder.layers.{i}.self_attn.q_proj`, `final_layer_norm`, ...), the keys SD1 files and diffusers'
`text_encoder/` folders hold, and the arithmetic follows it op for op (pre-norm blocks, causal SDPA
attention, quick-GELU for OpenAI's CLIP and exact GELU for OpenCLIP), so the outputs are the same
numbers (tested against it). `forward` answers with the fields `ClipTextEncoder` reads:
`last_hidden_state` (after the final norm), `hidden_states` (embeddings, then each layer's output,
not normed) and `pooler_output` (the final state at the first EOS token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ClipTextConfig:
    """The shape of a CLIP text tower (the fields of transformers' `CLIPTextConfig` that it uses)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ClipTextConfig:
        """A config from keyword arguments; refuses unknown names and activations."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown CLIP text config fields {unknown}")
        config = cls(**kwargs)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP text activation {config.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        return config


def _quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": nn.functional.gelu}


@dataclass
class ClipTextOutput:
    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class _Embeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor, token_vectors: Tensor | None = None) -> Tensor:
        """Token + position embeddings; `token_vectors` [B, T, D], where given, replaces the token lookup
        (textual-inversion vectors placed among the prompt's tokens)."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
        tokens = self.token_embedding(input_ids) if token_vectors is None else token_vectors
        return tokens + self.position_embedding(positions)


class _Attention(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Causal softmax(Q K^T / sqrt(d)) V: each token sees itself and the tokens before it."""
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, is_causal=t > 1)
        return self.out_proj(out.transpose(1, 2).contiguous().reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class ClipTextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, pre-norm causal transformer layers, final norm."""

    def __init__(self, config: ClipTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: Tensor, output_hidden_states: bool = False, token_vectors: Tensor | None = None
    ) -> ClipTextOutput:
        """Hidden states of [B, T] token ids; `pooler_output` is each row's state at its first EOS.

        `token_vectors` [B, T, D]: the input vectors to use instead of looking the ids up (the ids still
        locate the EOS token)."""
        x = self.embeddings(input_ids, token_vectors)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        last = self.final_layer_norm(x)
        eos = (input_ids.to(torch.int) == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        return ClipTextOutput(last, pooled, tuple(states) if output_hidden_states else None)
