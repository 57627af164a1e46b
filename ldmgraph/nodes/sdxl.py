"""SDXL conditioning nodes: ComfyUI's `CLIPTextEncodeSDXL` and `CLIPTextEncodeSDXLRefiner` (names,
inputs and defaults as ComfyUI's), and `SDXLSizeConditioning`, the micro-conditioning as a
conditioner of the `vector` route.

SDXL's U-Net adds to its time embedding a vector of the pooled text embedding and sinusoidal
features of the original image size, the crop's top-left corner and the target size (the refiner:
size, crop and an aesthetic score), Podell et al. 2023 Sec. 2.2. The text nodes encode the prompt
(context and pooled vector) and give the numbers as a vector contribution
(`ldmgraph.models.sdxl.MicroConditioning`); `TextEncode` gives none, so the sampler uses the
defaults ComfyUI's plain `CLIPTextEncode` gets: size = the latent's size x 8, crop 0, target = size,
aesthetic score 6 (positive) or 2.5 (negative). A later micro-conditioning replaces an earlier one
(sizes are facts, not sums); any other vector contribution adds to it.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.conditioners import CondEntry, Conditioner, add_contribution
from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import CONDITIONING, FLOAT, INT, STRING, TEXT_ENCODER
from ldmgraph.nodes.common import NodeInputError
from ldmgraph.plugins import hookimpl

MAX_RESOLUTION = 16384
"""ComfyUI's bound on sizes."""


def _size(default: int, what: str) -> Any:
    return InputField(INT, default, ge=0, le=MAX_RESOLUTION, description=what)


def _sdxl_encoder(encoder: Any, node: str) -> Any:
    if encoder is None or not hasattr(encoder, "encode_pair"):
        kind = getattr(encoder, "kind", None)
        raise NodeInputError(f"{node}: text_encoder is {'missing' if encoder is None else repr(kind)}; "
                             "connect the text encoder of an SDXL checkpoint (CheckpointLoader on an SDXL file)")
    return encoder


def _entry(encoding: Any, micro: Any) -> list[CondEntry]:
    entry = CondEntry(context=encoding.context, pooled=encoding.pooled)
    return [add_contribution(entry, "vector", micro)]


class CLIPTextEncodeSDXL(Node):
    """Encode SDXL's two prompts (`text_g` for OpenCLIP bigG, `text_l` for CLIP ViT-L) with explicit
    size and crop conditioning, as ComfyUI's node of this name (its inputs and defaults)."""

    type_name = "CLIPTextEncodeSDXL"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        text_encoder: Any = InputField(TEXT_ENCODER, description="the SDXL base checkpoint's text encoder")
        width: int = _size(1024, "original width the image is said to have (pixels)")
        height: int = _size(1024, "original height (pixels)")
        crop_w: int = _size(0, "left edge of the crop (pixels)")
        crop_h: int = _size(0, "top edge of the crop (pixels)")
        target_width: int = _size(1024, "target width (pixels)")
        target_height: int = _size(1024, "target height (pixels)")
        text_g: str = InputField(STRING, "", description="prompt for OpenCLIP ViT-bigG")
        text_l: str = InputField(STRING, "", description="prompt for CLIP ViT-L")

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="context, pooled vector and size conditioning")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.sdxl import MicroConditioning

        encoder = _sdxl_encoder(inputs.text_encoder, self.type_name)
        encoding = encoder.encode_pair([inputs.text_g], [inputs.text_l])
        micro = MicroConditioning(inputs.height, inputs.width, inputs.crop_h, inputs.crop_w,
                                  inputs.target_height, inputs.target_width)
        return self.Outputs(conditioning=_entry(encoding, micro))


class CLIPTextEncodeSDXLRefiner(Node):
    """Encode a prompt for the SDXL refiner with its aesthetic score and size, as ComfyUI's node of
    this name (ascore 6 by default; ComfyUI's SDXL example gives the negative prompt 2.5)."""

    type_name = "CLIPTextEncodeSDXLRefiner"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        ascore: float = InputField(FLOAT, 6.0, ge=0.0, le=1000.0, description="aesthetic score")
        width: int = _size(1024, "original width (pixels)")
        height: int = _size(1024, "original height (pixels)")
        text: str = InputField(STRING, "", description="the prompt")
        text_encoder: Any = InputField(TEXT_ENCODER, description="the SDXL refiner checkpoint's text encoder")

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="context, pooled vector and score conditioning")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.sdxl import MicroConditioning

        encoder = _sdxl_encoder(inputs.text_encoder, self.type_name)
        encoding = encoder.encode([inputs.text])
        micro = MicroConditioning(inputs.height, inputs.width, aesthetic_score=inputs.ascore)
        return self.Outputs(conditioning=_entry(encoding, micro))


class SDXLSizeConditioning(Conditioner):
    """Set SDXL's size / crop / aesthetic-score conditioning on conditioning made by any text node.

    Sizes of 0 mean the latent's size x 8 (ComfyUI's default); an aesthetic score below 0 means the
    refiner's default (6 for positive, 2.5 for negative conditioning). Replaces the numbers an SDXL
    text node gave; the base U-Net reads size, crop and target, the refiner size, crop and score.
    """

    type_name = "SDXLSizeConditioning"

    estimate_rule = "small"
    route = "vector"
    sides = "one"

    class Inputs(NodeInputs):
        width: int = _size(0, "original width in pixels (0: the latent's width x 8)")
        height: int = _size(0, "original height in pixels (0: the latent's height x 8)")
        crop_w: int = _size(0, "left edge of the crop (pixels)")
        crop_h: int = _size(0, "top edge of the crop (pixels)")
        target_width: int = _size(0, "target width in pixels (0: the original width)")
        target_height: int = _size(0, "target height in pixels (0: the original height)")
        aesthetic_score: float = InputField(FLOAT, -1.0, ge=-1.0, le=1000.0,
                                            description="refiner only; below 0: 6 positive, 2.5 negative")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        from ldmgraph.models.sdxl import MicroConditioning

        return MicroConditioning(inputs.height or None, inputs.width or None, inputs.crop_h, inputs.crop_w,
                                 inputs.target_height or None, inputs.target_width or None,
                                 inputs.aesthetic_score if inputs.aesthetic_score >= 0 else None)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """ComfyUI's SDXL text-encode nodes."""
    return [CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner]


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """SDXL's micro-conditioning, on the vector route."""
    return [SDXLSizeConditioning]
