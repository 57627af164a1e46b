"""A BERT encoder (Devlin et al. 2019) and its WordPiece tokenizer, without transformers.

The bundled models' text encoder is the frozen MiniLM-L6 (all-MiniLM-L6-v2: a 6-layer, 384-wide
BERT). Importing transformers to run it costs seconds of start-up for ~60 lines of maths, so the
encoder is written out here. Attribute names follow the released `model.safetensors` keys
(`embeddings.word_embeddings`, `encoder.layer.{i}.attention.self.query`, ...), so the file loads
with no renaming; the arithmetic follows transformers' `BertModel` (SDPA attention, post-norm
residual blocks, exact GELU) op for op, so the outputs are the same numbers (tested against it).
The tokenizer is the model folder's `tokenizer.json` run by the `tokenizers` library, the Rust
library under transformers' `BertTokenizerFast`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, read from a model folder's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BertConfig:
        """The fields this encoder uses from a transformers `config.json`; refuses what it cannot run."""
        if data.get("hidden_act", "gelu") != "gelu" or data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact-GELU activations and absolute positions is supported")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        """LayerNorm(word + token type 0 + position), summed in that order (as BertEmbeddings)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.LayerNorm(x + self.position_embeddings(positions))


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V over all heads (Vaswani et al. 2017, Eq. 1)."""
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.query, self.key, self.value))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).contiguous().reshape(b, t, -1)


class _DenseNorm(nn.Module):
    """LayerNorm(dense(x) + residual): the closing half of each BERT sub-block."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertEncoder(nn.Module):
    """A post-norm BERT encoder: `forward(input_ids, attention_mask)` -> the hidden states after the
    embeddings and after each layer, a tuple of num_hidden_layers + 1 tensors [B, T, hidden_size]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            b, t = attention_mask.shape  # keys a query may see: [B, 1, T, T], True = attend
            mask = attention_mask.bool()[:, None, None, :].expand(b, 1, t, t)
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            states.append(x)
        return tuple(states)


def read_bert_config(folder: Path) -> BertConfig:
    """The `BertConfig` of a model folder's config.json."""
    import json

    return BertConfig.from_json(json.loads((folder / "config.json").read_text(encoding="utf-8")))


class WordPieceTokenizer:
    """A model folder's `tokenizer.json` (BERT WordPiece: normalise, split, [CLS] ... [SEP]) run by
    the `tokenizers` library; every call pads or truncates to a fixed length."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._length = 0
        self._raw: Any = None

    def __call__(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """input_ids and attention_mask [B, max_length] (int64), as `BertTokenizerFast(...,
        padding="max_length", truncation=True)` returns them."""
        if self._length != max_length:
            self._tokenizer.enable_truncation(max_length=max_length)
            self._tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
            self._length = max_length
        batch = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def ids(self, text: str) -> list[int]:
        """The WordPiece ids of `text` without [CLS] / [SEP], padding or truncation (for weighted prompts)."""
        if self._raw is None:
            from tokenizers import Tokenizer

            self._raw = Tokenizer.from_str(self._tokenizer.to_str())
            self._raw.no_truncation()
            self._raw.no_padding()
        return list(self._raw.encode(text, add_special_tokens=False).ids)

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """The ids of [CLS], [SEP] and [PAD]."""
        ids = tuple(self._tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        if None in ids:
            raise ValueError("the tokenizer lacks [CLS], [SEP] or [PAD]: not a BERT WordPiece tokenizer")
        return ids  # type: ignore[return-value]
