"""SDXL base and refiner (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis"): configs, the two text encoders, micro-conditioning, building.
(Its checkpoint facts as data are in `sdxl_keys`; reading a file's SDXL configs is `detection`'s.)

The U-Net is `unet.UNetModel` with SDXL's config: three levels 320/640/1280 with transformer depth
0/2/10 (refiner: 384/768/1536/1536, depth 4 on the middle two levels and in the middle block), 64
channels per head, linear projections, and the `adm` MLP `label_emb` that takes a vector of 2816 (refiner 2560) numbers added to the time
embedding. That vector is the pooled text embedding (1280) followed by 256-wide sinusoidal features
(`unet.timestep_embedding`) of six numbers: original height and width, crop top and left, target
height and width (Sec. 2.2 of the paper; the refiner: height, width, crop top, crop left and an
aesthetic score). Here it reaches the U-Net by the conditioning's `vector` route, in two additive
parts: the pooled embedding in the first slot (`VectorLayout.vector`) and the Fourier features in
the rest (`MicroConditioning`, a lazy contribution resolved at sampling time, because its default
sizes are the latent's size x 8, as ComfyUI's). A plugin replaces the micro-conditioning by giving
its own `vector` contribution.

Text: CLIP ViT-L/14 (`clip-l`) and OpenCLIP ViT-bigG/14 (`openclip-g`, 1280 wide, 32 layers, exact
GELU). The context is both encoders' penultimate hidden states, without the final layer norm,
concatenated along features (768 + 1280 = 2048); the pooled vector is bigG's final-normed state at
EOS times `text_projection`. bigG's tokens are padded with "!" (id 0), ViT-L's with EOS. The
refiner has bigG alone (context 1280). The autoencoder is SD's with scale 0.13025; it overflows in
fp16, so it is built in float32 when fp16 is asked or the file is fp16 (as diffusers' `force_upcast`).

Files: the original single-file layout (`model.diffusion_model.`, `first_stage_model.`,
`conditioner.embedders.0.transformer.text_model.` (ViT-L, transformers' names),
`conditioner.embedders.1.model.` (bigG, OpenCLIP's names); refiner `conditioner.embedders.0.model.`)
and diffusers folders (`text_encoder/`, `text_encoder_2/`, `tokenizer_2/`: see `diffusers_folder`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.files import StateDict
from ldmgraph.models.sdxl_keys import (  # noqa: F401 - re-exported: SDXL's facts, as data, live there
    AESTHETIC_NEGATIVE,
    AESTHETIC_POSITIVE,
    BASE_NUMBERS,
    FOURIER_DIM,
    G_PREFIX,
    HF_G_PREFIX,
    L_PREFIX,
    REFINER_G_PREFIX,
    REFINER_NUMBERS,
    SDXL_SCALE_FACTOR,
    layout_from_adm,
)
from ldmgraph.models.text_encoders import (
    ClipTextEncoder,
    TextEncoder,
    TextEncoding,
    clip_text_encoder_from_weights,
)
from ldmgraph.models.tokenizer import EOS_ID
from ldmgraph.models.unet import timestep_embedding

_BASE_UNET: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [2, 4],
    "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_head_channels": 64, "transformer_depth": [0, 2, 10],
    "context_dim": 2048, "use_linear_in_transformer": True, "num_classes": "sequential", "adm_in_channels": 2816,
}
_REFINER_UNET: dict[str, Any] = {
    **_BASE_UNET, "model_channels": 384, "channel_mult": [1, 2, 4, 4], "transformer_depth": 4,
    "context_dim": 1280, "adm_in_channels": 2560,
}


def base_unet(**overrides: Any) -> dict[str, Any]:
    """`UNetModel` kwargs of the SDXL base U-Net (2.57 B parameters)."""
    return {**copy.deepcopy(_BASE_UNET), **overrides}


def refiner_unet(**overrides: Any) -> dict[str, Any]:
    """`UNetModel` kwargs of the SDXL refiner U-Net (2.26 B parameters)."""
    return {**copy.deepcopy(_REFINER_UNET), **overrides}


def openclip_g_config() -> dict[str, Any]:
    """OpenCLIP ViT-bigG/14 text tower: width 1280, 32 layers, 20 heads, MLP 5120, exact GELU."""
    return {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
            "hidden_act": "gelu", "projection_dim": 1280}


# --- the vector route: pooled embedding + micro-conditioning ---------------------------------------


def fourier_features(numbers: Tensor, dim: int = FOURIER_DIM) -> Tensor:
    """[B, n] numbers -> [B, n * dim]: each number's sinusoidal embedding [cos | sin], concatenated."""
    b, n = numbers.shape
    return timestep_embedding(numbers.reshape(-1), dim).reshape(b, n * dim)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size, crop and aesthetic-score conditioning: a lazy `vector` contribution.

    Numbers left None take ComfyUI's defaults when the sampler resolves it: height and width = the
    latent's size x 8, target = that size, crop 0, aesthetic score 6 (positive) or 2.5 (negative).
    `resolve` gives [B, adm] with zeros in the pooled slot and the Fourier features after it, so it
    adds to the pooled part (`VectorLayout.vector`) like any vector contribution.
    """

    height: int | None = None
    width: int | None = None
    crop_h: int = 0
    crop_w: int = 0
    target_height: int | None = None
    target_width: int | None = None
    aesthetic_score: float | None = None

    def numbers(self, layout: VectorLayout, latent_hw: tuple[int, int], negative: bool) -> list[float]:
        """The numbers this model's `adm` reads, in its order (defaults filled in)."""
        height = self.height if self.height is not None else latent_hw[0] * 8
        width = self.width if self.width is not None else latent_hw[1] * 8
        values = {
            "height": height, "width": width, "crop_h": self.crop_h, "crop_w": self.crop_w,
            "target_height": self.target_height if self.target_height is not None else height,
            "target_width": self.target_width if self.target_width is not None else width,
            "aesthetic_score": self.aesthetic_score if self.aesthetic_score is not None
            else (AESTHETIC_NEGATIVE if negative else AESTHETIC_POSITIVE),
        }
        return [float(values[name]) for name in layout.numbers]

    def resolve(self, layout: VectorLayout, latent_hw: tuple[int, int], negative: bool) -> Tensor:
        numbers = torch.tensor([self.numbers(layout, latent_hw, negative)], dtype=torch.float32)
        features = fourier_features(numbers, layout.fourier_dim)
        return torch.cat([torch.zeros(1, layout.pooled_dim), features], dim=1)

    def __add__(self, other: Any) -> Any:
        """A later micro-conditioning replaces this one (sizes are facts); other contributions add."""
        return other if isinstance(other, MicroConditioning) else VectorSum((self, other))

    def __radd__(self, other: Any) -> VectorSum:
        return VectorSum((other, self))


@dataclass(frozen=True)
class VectorSum:
    """Vector contributions added together, some of them lazy (resolved together)."""

    parts: tuple[Any, ...]

    def resolve(self, layout: VectorLayout, latent_hw: tuple[int, int], negative: bool) -> Tensor:
        resolved = [p.resolve(layout, latent_hw, negative) if hasattr(p, "resolve") else p for p in self.parts]
        batch = max(r.shape[0] for r in resolved)
        return sum((r.float().cpu().expand(batch, -1) for r in resolved), torch.zeros(batch, resolved[0].shape[1]))

    def __add__(self, other: Any) -> VectorSum:
        if isinstance(other, MicroConditioning):
            return VectorSum((*(p for p in self.parts if not isinstance(p, MicroConditioning)), other))
        return VectorSum((*self.parts, other))

    def __radd__(self, other: Any) -> VectorSum:
        return VectorSum((other, *self.parts))


@dataclass(frozen=True)
class VectorLayout:
    """How an SDXL U-Net's `adm` vector is laid out: pooled text embedding, then `numbers` features.

    Set on the U-Net module as `vector_layout`; the sampler's guidance asks it for each entry's
    vector (duck-typed, so the diffusion layer imports nothing of the models).
    """

    numbers: tuple[str, ...]
    pooled_dim: int
    fourier_dim: int = FOURIER_DIM

    @property
    def width(self) -> int:
        return self.pooled_dim + len(self.numbers) * self.fourier_dim

    def vector(self, pooled: Tensor | None, contribution: Any, latent_hw: tuple[int, int], negative: bool) -> Tensor:
        """[B, adm]: the entry's pooled vector in the first slot (zeros without one) plus its vector
        contribution (default `MicroConditioning()`: ComfyUI's plain CLIPTextEncode on SDXL)."""
        if contribution is None:
            contribution = MicroConditioning()
        extra = contribution.resolve(self, latent_hw, negative) if hasattr(contribution, "resolve") else contribution
        extra = extra.float()
        if extra.shape[-1] != self.width:
            raise ValueError(f"the SDXL vector contribution is {extra.shape[-1]} wide; this U-Net's adm takes {self.width}")
        if pooled is None:
            return extra
        pooled = pooled.float().reshape(pooled.shape[0], -1)
        if pooled.shape[1] != self.pooled_dim:
            raise ValueError(f"the pooled text vector is {pooled.shape[1]} wide; this U-Net takes {self.pooled_dim} "
                             "(encode the prompt with this checkpoint's text encoder)")
        padded = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], self.width - self.pooled_dim)], dim=1)
        batch = max(padded.shape[0], extra.shape[0])
        return padded.expand(batch, -1) + extra.to(padded.device).expand(batch, -1)


def layout_for(family: str, adm: int, pooled_dim: int | None = None) -> VectorLayout:
    """The vector layout of an SDXL base / refiner U-Net whose adm takes `adm` numbers."""
    spec = layout_from_adm(family, adm, pooled_dim)
    return VectorLayout(tuple(spec["numbers"]), spec["pooled_dim"], spec["fourier_dim"])


# --- text ----------------------------------------------------------------------------------------


class SDXLTextEncoder(TextEncoder):
    """SDXL's text conditioning: CLIP ViT-L (base only) and OpenCLIP ViT-bigG, as one TEXT_ENCODER.

    `encode(texts)` tokenises each text for both encoders (75-token windows, concatenated, as for
    SD1/SD2; `breaks=True` lets the word BREAK start a new window), takes each encoder's penultimate
    hidden states without the final norm and concatenates them along features; `pooled` is bigG's
    projected EOS state of the first window. `encode_pair` gives each encoder its own text
    (ComfyUI's `text_g` / `text_l`); the shorter token list gets empty windows appended.
    `clip_skip`: SDXL was trained on the penultimate layer, which 1 and 2 both give (A1111 likewise
    keeps it on SDXL); k > 2 takes the k-th layer from the end.
    """

    def __init__(self, clip_g: ClipTextEncoder, clip_l: ClipTextEncoder | None = None, *, kind: str = "sdxl") -> None:
        super().__init__()
        self.windowed = True
        self.clip_g = clip_g
        self.clip_l = clip_l
        self.kind = kind
        self.context_dim = clip_g.context_dim + (clip_l.context_dim if clip_l is not None else 0)
        self.num_layers = clip_g.num_layers if clip_l is None else min(clip_g.num_layers, clip_l.num_layers)
        self.default_clip_skip = 2

    @property
    def encoders(self) -> list[ClipTextEncoder]:
        return [e for e in (self.clip_l, self.clip_g) if e is not None]

    def _k(self, clip_skip: int | None) -> int:
        return max(2, self._check_clip_skip(clip_skip))

    def encode(self, texts: list[str], clip_skip: int | None = None, breaks: bool = False) -> TextEncoding:
        return self.encode_pair(list(texts), list(texts), clip_skip, breaks)

    @torch.no_grad()
    def encode_pair(
        self, texts_g: list[str], texts_l: list[str], clip_skip: int | None = None, breaks: bool = False
    ) -> TextEncoding:
        """Encode bigG's and ViT-L's texts (row by row); the refiner reads `texts_g` only."""
        k = self._k(clip_skip)
        ids_g = self.clip_g.token_windows(texts_g, breaks=breaks)
        if self.clip_l is None:
            out = self.clip_g.encode_ids(ids_g, clip_skip=k)
            return TextEncoding(out.context, out.pooled)
        ids_l = self.clip_l.token_windows(texts_l, breaks=breaks)
        n = max(ids_g.shape[1], ids_l.shape[1])
        ids_g, ids_l = _pad_windows(self.clip_g, ids_g, n), _pad_windows(self.clip_l, ids_l, n)
        out_l = self.clip_l.encode_ids(ids_l, clip_skip=k)
        out_g = self.clip_g.encode_ids(ids_g, clip_skip=k)
        context = torch.cat([out_l.context, out_g.context.to(out_l.context.dtype)], dim=-1)
        return TextEncoding(context, out_g.pooled)

    def encode_pieces(
        self, pieces: list[Any], clip_skip: int | None, embeddings: dict[str, Any], breaks: bool = False
    ) -> TextEncoding:
        """A prompt with weights or embeddings (`ldmgraph.models.prompt_weights`): each encoder applies them to
        its own output (an SDXL embedding file's `clip_l` vectors to ViT-L, `clip_g` to bigG), then as `encode`."""
        k = self._k(clip_skip)
        out_g = self.clip_g.encode_pieces(pieces, k, embeddings, breaks=breaks)
        if self.clip_l is None:
            return out_g
        out_l = self.clip_l.encode_pieces(pieces, k, embeddings, breaks=breaks)
        context = torch.cat([out_l.context, out_g.context.to(out_l.context.dtype)], dim=-1)
        return TextEncoding(context, out_g.pooled)


def _pad_windows(encoder: ClipTextEncoder, ids: Tensor, n: int) -> Tensor:
    """Append empty-prompt windows so that `ids` [B, m, 77] has n windows."""
    if ids.shape[1] == n:
        return ids
    empty = encoder.token_windows([""])[:, :1].expand(ids.shape[0], n - ids.shape[1], -1)
    return torch.cat([ids, empty], dim=1)


# --- building ---------------------------------------------------------------------------------------


def layout_dict(layout: VectorLayout) -> dict[str, Any]:
    return {"numbers": list(layout.numbers), "pooled_dim": layout.pooled_dim, "fourier_dim": layout.fourier_dim}


def attach_layout(unet: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Give a built U-Net its `vector_layout` (what the guidance reads), if the family has one."""
    spec = metadata.get("vector_layout")
    if spec:
        unet.vector_layout = VectorLayout(tuple(spec["numbers"]), int(spec["pooled_dim"]),  # type: ignore[assignment]
                                          int(spec["fourier_dim"]))


def vae_dtype(info: Any, weights: Mapping[str, Tensor], dtype: torch.dtype | None) -> torch.dtype | None:
    """The autoencoder's dtype: SDXL's overflows in fp16, so fp16 (asked, or the file's) becomes float32."""
    if str(info.metadata.get("family", "")).startswith("sdxl"):
        file_half = dtype is None and any(t.dtype == torch.float16 for t in weights.values())
        if dtype == torch.float16 or file_half:
            return torch.float32
    return dtype


def _one_encoder(state: StateDict, spec: Mapping[str, Any], dtype: torch.dtype | None, pad_id: int) -> ClipTextEncoder:
    weights = state.sub(spec["prefix"])
    config = dict(spec["config"])
    if spec["naming"] == "openclip":
        encoder = clip_text_encoder_from_weights(
            weights, kind="openclip-h", config_kwargs=config, path=state.path, dtype=dtype, pad_id=pad_id)
    else:
        projection = weights.pop("text_projection.weight", None)
        encoder = clip_text_encoder_from_weights(
            weights, kind="clip-l", config_kwargs=config, path=state.path, dtype=dtype, pad_id=pad_id)
        if projection is not None:  # transformers' Linear [P, D] -> OpenCLIP's [D, P]
            encoder.text_projection = nn.Parameter(projection.t().to(dtype or projection.dtype), requires_grad=False)
    encoder.layer_norm_skipped = False  # SDXL reads the penultimate layer as it is
    return encoder


def build_text_encoder(state: StateDict, text: Mapping[str, Any], dtype: torch.dtype | None) -> SDXLTextEncoder:
    """The SDXL text encoder that `text` (`detection.sdxl_text_config`) describes, with the file's weights (no copy)."""
    specs = text["encoders"]
    clip_g = _one_encoder(state, specs["g"], dtype, pad_id=0)  # bigG pads with "!" (id 0)
    clip_g.kind = "openclip-g"
    clip_l = _one_encoder(state, specs["l"], dtype, pad_id=EOS_ID) if "l" in specs else None
    if clip_l is not None:
        clip_l.kind = "clip-l"
    return SDXLTextEncoder(clip_g, clip_l, kind=str(text["kind"]))
