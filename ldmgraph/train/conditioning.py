"""Conditioning options of the text-to-image trainer: which text encoder, which route, where.

The shipped text-to-image model reads a frozen MiniLM context by cross-attention at every U-Net
level that has attention. These options change one thing at a time for the conditioning ablation
(everything else, data, steps, batch, seed and schedule, stays as ``LDMConfig`` has it):

- ``text_encoder``: ``minilm`` (frozen, contexts precomputed in the pool) or ``transformer``:
  the paper's recipe (Rombach et al. 2022, Sec. 3.3 and 4.3.1), a BERT-tokenised transformer
  tau_theta trained from scratch together with the U-Net, L_LDM = E || eps - eps_theta(z_t, t,
  tau_theta(y)) ||^2 minimised over both (their eq. 3). It uses the WordPiece vocabulary that the
  MiniLM package ships (BERT's uncased vocab.txt) and the paper's layout
  (:class:`ldmgraph.models.text_encoders.LDMBertTransformer`), so the bundled file keeps it under
  ``cond_stage_model.transformer.`` and the ordinary loader rebuilds it ("ldm-bert").
- ``route``: ``crossattn`` (context [B, T, D] as keys/values of the U-Net's attention),
  ``vector`` (a pooled caption vector through an MLP added to the timestep embedding, the
  class-conditional route of Dhariwal & Nichol 2021; the U-Net's ``y``) or ``both``.
- ``cross_attention``: the U-Net levels with (self + cross) attention blocks: ``all`` (latent
  16x16 and 8x8 plus the 4x4 middle block, as shipped), ``lowest`` (the 4x4 middle block only)
  or ``none`` (the vector route: self-attention blocks stay where ``all`` has them, so the two
  differ by the cross-attention layers only).
- ``context_length``: tokens of the trained transformer's context (MiniLM's is fixed at 32).

The pooled vector is the mean over the context's tokens as each encoder's ``encode`` returns it:
MiniLM's attention-mask-weighted mean, the transformer's plain mean over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TEXT_ENCODERS = ("minilm", "transformer")
ROUTES = ("crossattn", "vector", "both")
CROSS_ATTENTION = ("all", "lowest", "none")
MINILM_DIM = 384
MINILM_LENGTH = 32


def default_text_transformer(context_length: int = MINILM_LENGTH) -> dict[str, Any]:
    """A small paper-layout text transformer: width 128, 2 layers, 2 heads of 64 channels, no LM head
    (~4.3M parameters, 3.9M of them the 30522-row token table of which the captions use ~30 rows)."""
    return {"dim": 128, "depth": 2, "heads": 2, "dim_head": 64, "ff_mult": 4, "vocab_size": 30522,
            "max_seq_len": context_length, "lm_head": False}


@dataclass(frozen=True)
class Conditioning:
    """The conditioning options of one run (see the module docstring)."""

    text_encoder: str = "minilm"
    route: str = "crossattn"
    cross_attention: str = "all"
    context_length: int = MINILM_LENGTH

    def check(self) -> None:
        """Raise ValueError naming the option and the fix for an impossible combination."""
        for name, value, allowed in (("text_encoder", self.text_encoder, TEXT_ENCODERS),
                                     ("route", self.route, ROUTES),
                                     ("cross_attention", self.cross_attention, CROSS_ATTENTION)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if (self.route == "vector") != (self.cross_attention == "none"):
            raise ValueError("--conditioning-route vector goes with --cross-attention none (and only it): "
                             "with no cross-attention the text can only reach the U-Net as a vector")
        if self.text_encoder == "minilm" and self.context_length != MINILM_LENGTH:
            raise ValueError(f"--context-length {self.context_length}: the frozen MiniLM's context is fixed at "
                             f"{MINILM_LENGTH} tokens; use --text-encoder transformer to change it")
        if not 4 <= self.context_length <= 512:
            raise ValueError(f"--context-length {self.context_length}: use 4..512 tokens")

    @property
    def is_default(self) -> bool:
        return self == Conditioning()

    @property
    def uses_vector(self) -> bool:
        return self.route in ("vector", "both")

    @property
    def uses_context(self) -> bool:
        return self.route in ("crossattn", "both")


def conditioning_of(cfg: Any) -> Conditioning:
    """The ``Conditioning`` of an ``LDMConfig`` (or its asdict form in a run's state.json)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, d)
    return Conditioning(get("text_encoder", "minilm"), get("route", "crossattn"),
                        get("cross_attention", "all"), int(get("context_length", MINILM_LENGTH)))


def text_dim(cond: Conditioning, text_transformer: dict[str, Any]) -> int:
    return int(text_transformer["dim"]) if cond.text_encoder == "transformer" else MINILM_DIM


def adapt_unet(unet: dict[str, Any], cond: Conditioning, text_transformer: dict[str, Any]) -> dict[str, Any]:
    """The text-to-image U-Net configuration for these options (``unet`` as ``default_unet('ldm')``)."""
    out = dict(unet)
    dim = text_dim(cond, text_transformer)
    if cond.uses_context:
        out["context_dim"] = dim
    else:  # self-attention blocks where the cross-attention ones were
        out.update(context_dim=None, use_linear_in_transformer=False)
    if cond.cross_attention == "lowest":
        out["attention_resolutions"] = []  # the middle block (the lowest resolution) keeps its transformer
    if cond.uses_vector:
        out.update(num_classes="sequential", adm_in_channels=dim)
    return out


class JointModel(nn.Module):
    """The U-Net and the text transformer trained together: eps_theta(z_t, t, tau_theta(ids))."""

    def __init__(self, unet: nn.Module, text: nn.Module, cond: Conditioning) -> None:
        super().__init__()
        self.unet = unet
        self.text = text
        self.cond = cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        context = self.text(ids)
        return self.unet(x, t, context=context if self.cond.uses_context else None,
                         y=context.mean(dim=1) if self.cond.uses_vector else None)


def build_model(cfg: Any) -> nn.Module:
    """The trained module of an ``LDMConfig``: a ``UNetModel``, or a ``JointModel`` with a text transformer."""
    from ldmgraph.models.text_encoders import LDMBertTransformer
    from ldmgraph.models.unet import UNetModel

    cond = conditioning_of(cfg)
    torch.manual_seed(cfg.seed)
    unet = UNetModel(**cfg.unet)
    if cond.text_encoder != "transformer":
        return unet
    return JointModel(unet, LDMBertTransformer(**cfg.text_transformer), cond)


def split_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(U-Net, text transformer) tensors of a trained module's state dict (a ``JointModel``'s or a U-Net's)."""
    if not any(k.startswith("unet.") for k in state):
        return state, {}
    unet = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    text = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    return unet, text


def caption_tokens(captions: list[str], context_length: int) -> torch.Tensor:
    """WordPiece ids [N, context_length] of captions, exactly as ``LDMBertTextEncoder.encode`` makes them."""
    from ldmgraph.models.text_encoders import bert_tokenizer

    return bert_tokenizer()(list(captions), padding="max_length", max_length=context_length, truncation=True,
                            return_tensors="pt")["input_ids"]


def minilm_pooled(captions: list[str], contexts: torch.Tensor) -> torch.Tensor:
    """MiniLM's pooled vectors [N, 384] from the pool's contexts: the attention-mask-weighted mean
    of each caption's context, the same formula as ``BertTextEncoder.encode`` (no re-encoding)."""
    from ldmgraph.models.text_encoders import bert_tokenizer

    mask = bert_tokenizer()(list(captions), padding="max_length", max_length=contexts.shape[1], truncation=True,
                            return_tensors="pt")["attention_mask"].to(contexts.dtype)[..., None]
    return (contexts * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def prepare_pool(cfg: Any, pool: dict[str, Any]) -> dict[str, Any]:
    """Add what these options read per caption: token ids (transformer) or pooled MiniLM vectors."""
    cond = conditioning_of(cfg)
    if cond.is_default:
        return pool
    out = dict(pool)
    captions = list(pool["captions"])
    if cond.text_encoder == "transformer" and "caption_ids" not in pool:
        out["caption_ids"] = caption_tokens(captions, cond.context_length)
    if cond.text_encoder == "minilm" and cond.uses_vector and "pooled" not in pool:
        out["pooled"] = minilm_pooled(captions, pool["contexts"])
    return out


def batch_inputs(cfg: Any, pool: dict[str, Any], captions: torch.Tensor) -> dict[str, Any]:
    """The conditioning inputs of one batch, captions given as indices into the pool's caption table."""
    cond = conditioning_of(cfg)
    if cond.text_encoder == "transformer":
        return {"ids": pool["caption_ids"][captions]}
    return {"context": pool["contexts"][captions] if cond.uses_context else None,
            "y": pool["pooled"][captions] if cond.uses_vector else None}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trained parameters of a module: U-Net, text transformer (0 for the frozen MiniLM)."""
    if isinstance(model, JointModel):
        return {"unet": sum(p.numel() for p in model.unet.parameters()),
                "text": sum(p.numel() for p in model.text.parameters())}
    return {"unet": sum(p.numel() for p in model.parameters()), "text": 0}
