"""The conditioners of the Latent Diffusion paper's released models, registered through the
`ldmgraph_conditioners` hook like every other conditioning path.

Each contributes by a route (Rombach et al. 2022, Sec. 3.3): a class label becomes a one-token
cross-attention context (the ImageNet model's `ClassEmbedder`); a layout becomes the layout model's
tokens through its transformer (cross-attention); the inpainting model's masked image (through the
first stage) and mask, the semantic-synthesis model's one-hot map (through its `SpatialRescaler`)
and LDSR's low-resolution image become `concat` channels. The class embedder and rescaler travel
with the MODEL handle (`model.cond_stage_model`) of a release loaded by `CheckpointLoader`. Without
`positive` / `negative` inputs each side starts from one empty entry; given, the contribution is
added to every entry. This module is torch-free at import (validation does not load torch).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ldmgraph.conditioners import Conditioner, Contribution
from ldmgraph.graph import NodeContext, NodeInputs, NodeOutputs, codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, IMAGE, LATENT, MASK, MODEL, STRING, TEXT_ENCODER, VAE
from ldmgraph.models.layouts import MAX_OBJECTS, LayoutError, layout_tokens, parse_layout
from ldmgraph.nodes.common import NodeInputError, check_mask_size, image_to_torch, mask_to_torch
from ldmgraph.plugins import hookimpl

LAYOUT_VOCAB = 8192
"""Tokens of the released layout-to-image model's transformer (class numbers 0..8190, 8191 = none)."""
CLASSES_FILE = Path(__file__).resolve().parent.parent / "assets" / "data" / "imagenet_classes.tsv"
UNCONDITIONAL = "(unconditional)"


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order: each class's first WordNet lemma;
    the two names used twice ("crane", "maillot") carry their index, e.g. "crane (134)"."""
    lemmas = [line.split("\t", 1)[1].strip() for line in CLASSES_FILE.read_text().splitlines()
              if line and not line.startswith("#")]
    first = [lemma.split(",")[0].strip() for lemma in lemmas]
    return [f"{name} ({i})" if first.count(name) > 1 else name for i, name in enumerate(first)]


def _cond_module(model: Any, kind: str, node: str) -> Any:
    module = getattr(model, "cond_stage_model", None)
    if module is None or type(module).__name__ != kind:
        raise NodeInputError(
            f"{node}: the model has no {kind} (it comes with the paper's "
            + ("class-conditional ImageNet model, cin256-v2" if kind == "ClassEmbedder"
               else "semantic-synthesis model") + "); load that checkpoint with CheckpointLoader"
        )
    return module


class _PaperConditioner(Conditioner):
    sides = "both"
    sides_optional = True  # the paper's models take nothing else: each side starts from one empty entry


class ClassConditioning(_PaperConditioner):
    """Condition a class-conditional model (the paper's ImageNet LDM) on an ImageNet class.

    The class embedder turns the label into a one-token context for cross-attention. The negative
    side is the unconditional class (index 1000 of the released model's 1001 labels), so `cfg` > 1
    gives classifier-free guidance as in the paper (Sec. 4.3, Tab. 3, scale 1.5).
    """

    type_name = "ClassConditioning"

    estimate_rule = "small"
    route = "crossattn"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="a class-conditional model (cin256-v2)")
        class_name: str = InputField(ENUM, "golden retriever", choices=[*imagenet_class_names(), UNCONDITIONAL],
                                     description="the ImageNet class to draw")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch

        embedder = _cond_module(inputs.model, "ClassEmbedder", "ClassConditioning")
        n = int(embedder.embedding.weight.shape[0])
        unconditional = n - 1 if n > 1000 else None
        if inputs.class_name == UNCONDITIONAL:
            if unconditional is None:
                raise NodeInputError("ClassConditioning: this model has no unconditional class (1000 labels)")
            label = unconditional
        else:
            label = imagenet_class_names().index(inputs.class_name)
        if label >= n:
            raise NodeInputError(f"ClassConditioning: the model knows {n} classes, not class {label}")
        with torch.no_grad():
            contexts = embedder(torch.tensor([label, label if unconditional is None else unconditional]))
        contexts = contexts.float().cpu()
        return Contribution(contexts[:1], negative=contexts[1:])


class UnconditionalConditioning(Conditioner):
    """Conditioning for models without any (the paper's CelebA-HQ, FFHQ, LSUN models): one entry that
    carries nothing; sample with cfg 1."""

    type_name = "UnconditionalConditioning"

    estimate_rule = "small"
    route = "crossattn"
    sides = "new"

    class Inputs(NodeInputs):
        pass

    def contribute(self, inputs: Any, ctx: NodeContext) -> None:
        return None


class PaperInpaintConditioning(_PaperConditioner):
    """Condition the paper's inpainting model (`inpainting_big`) as its own script does.

    The mask is binarised at 0.5; the masked image (1 - mask) * image and the mask are mapped to
    -1..1 (so the hole is black and the mask is +-1); the masked image is encoded by the first stage
    and the mask resized to the latent grid (nearest), then [masked latent, mask] is concatenated
    to the latent (3 + 3 + 1 = 7 U-Net channels). Sample from the empty latent of the `latent`
    output at cfg 1; paste the result into the image with ImageCompositeMasked.
    """

    type_name = "PaperInpaintConditioning"

    estimate_rule = "small"
    route = "concat"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the inpainting model's first stage")
        image: Any = InputField(IMAGE, description="the image to repaint")
        mask: Any = InputField(MASK, description="1 where to repaint; the image's size")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="an empty latent of the image's size")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        check_mask_size(inputs.mask, inputs.image, "PaperInpaintConditioning")
        batch = inputs.image.shape[0]
        mask = (mask_to_torch(inputs.mask, batch) >= 0.5).float()  # [B, 1, H, W]
        masked = image_to_torch(inputs.image) * (1.0 - mask.permute(0, 2, 3, 1))
        vae = inputs.vae
        masked_latent = vae.encode(masked) / vae.scale_factor  # the first stage itself, no latent scaling
        small = F.interpolate(mask * 2.0 - 1.0, size=masked_latent.shape[-2:])
        latent = torch.zeros(batch, vae.latent_channels, *masked_latent.shape[-2:])
        return Contribution(torch.cat([masked_latent, small], dim=1), outputs={"latent": Latent(samples=latent)})


class SegmentationConditioning(_PaperConditioner):
    """Condition the paper's semantic-synthesis model on a segmentation map.

    The map is an image whose red channel holds the class index (value / 255, i.e. the 8-bit
    label image); it is one-hot encoded over the model's classes (182 for the released model),
    then the model's `SpatialRescaler` resizes it to the latent grid and maps it to the concat
    channels.
    """

    type_name = "SegmentationConditioning"
    route = "concat"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the semantic-synthesis model")
        segmentation: Any = InputField(IMAGE, description="label image: class index in the red channel (0..255)")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="an empty latent of the map's latent size")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Any:
        """The one-hot map (classes x H x W floats, and its int64 labels) is the working memory; the
        rescaled map and the empty latent are kept (the rescaler's factor read from the model)."""
        from ldmgraph.graph.estimate import Estimate, Shape

        seg, model = inputs.get("segmentation"), inputs.get("model")
        if not isinstance(seg, Shape):
            return None
        classes = int(getattr(model, "seg_classes", None) or 182)
        pixels = seg.batch * seg.height * seg.width
        f = int(getattr(model, "downscale", None) or 4)
        latent = Shape(seg.batch, int(getattr(model, "latent_channels", None) or 3), -(-seg.height // f), -(-seg.width // f))
        works = pixels * (classes * 4 * 2 + 8 + 4)
        problems = _label_problems(seg.source, classes)
        return Estimate(keeps=2 * latent.nbytes, works=works, outputs={"latent": latent}, problems=problems,
                        what=f"a {classes}-class one-hot map of {seg.width}x{seg.height}")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        rescaler = _cond_module(inputs.model, "SpatialRescaler", "SegmentationConditioning")
        labels = torch.from_numpy(inputs.segmentation[..., 0].copy() * 255.0).round().long()
        classes = int(rescaler.in_channels)
        if int(labels.max()) >= classes:
            raise NodeInputError(
                f"SegmentationConditioning: input 'segmentation': the map has class {int(labels.max())} but the "
                f"model knows {classes} classes (0..{classes - 1})"
            )
        one_hot = F.one_hot(labels, classes).permute(0, 3, 1, 2).float()
        weight = next(rescaler.parameters())
        with torch.no_grad():
            concat = rescaler(one_hot.to(weight)).float().cpu()
        latent = torch.zeros(concat.shape[0], inputs.model.latent_channels, *concat.shape[-2:])
        return Contribution(concat, outputs={"latent": Latent(samples=latent)})


def _label_problems(source: str | None, classes: int) -> tuple[tuple[str | None, str, str], ...]:
    """A label image straight from a file is checked before anything runs: its largest class number
    (the red channel's maximum, read by Pillow; the size was checked from the header already) must be
    one the model knows."""
    if source is None:
        return ()
    from PIL import Image

    try:
        with Image.open(source) as image:
            top = int(image.convert("RGB").getextrema()[0][1])
    except (OSError, ValueError, Image.DecompressionBombError):
        return ()  # the loader reports an unreadable file
    if top < classes:
        return ()
    return (("segmentation", codes.OUT_OF_BOUNDS, f"SegmentationConditioning: input 'segmentation': the map has "
             f"class {top} but the model knows {classes} classes (0..{classes - 1}); red value = class number"),)


def ldsr_concat(image: Any) -> Any:
    """LDSR's concat input: the low-resolution image itself, -1..1, [B, 3, H, W] (with the VQ-f4
    first stage the latent grid of the x4 output is the input's own size)."""
    return image_to_torch(image).permute(0, 3, 1, 2) * 2.0 - 1.0


class LDSRConditioning(_PaperConditioner):
    """Condition the paper's x4 super-resolution model (LDSR, `bsr_sr`) on a low-resolution image.

    The image, mapped to -1..1, is concatenated to the latent in pixel space: with the VQ-f4 first
    stage the latent of the x4 output has the input's own size. `latent` is the empty latent to
    sample from (DDIMSampler, eta 1 and 100 steps as the original notebook); `LDSRUpscale` does all
    of it, tiled, for images of any size.
    """

    type_name = "LDSRConditioning"

    estimate_rule = "small"
    route = "concat"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the LDSR model (bsr_sr)")
        image: Any = InputField(IMAGE, description="the low-resolution image")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="an empty latent of the x4 output (the input's size)")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch

        from ldmgraph.diffusion import Latent

        model = inputs.model
        if model.concat_channels != 3:
            raise NodeInputError("LDSRConditioning: the model does not take a low-resolution RGB image (load bsr_sr)")
        lowres = ldsr_concat(inputs.image)
        latent = torch.zeros(lowres.shape[0], model.latent_channels, *lowres.shape[-2:])
        return Contribution(lowres, outputs={"latent": Latent(samples=latent)})


class LayoutConditioning(_PaperConditioner):
    """Condition the paper's layout-to-image model on boxes of object classes.

    `layout` is JSON: a list of [class, x, y, width, height] with the box in 0..1 of the image. The
    class is a name of the model's 340 Open Images classes ("Person", "Car", "Tree"; any case;
    "Man", "Woman", ... as the original data merged them into "Person") or a class number. The boxes
    become the model's tokens (`ldmgraph.models.layouts`) and its transformer (loaded as the
    checkpoint's text encoder) turns them into the cross-attention context; the negative side is
    the empty layout (all objects "none").
    """

    type_name = "LayoutConditioning"

    estimate_rule = "small"
    route = "crossattn"

    class Inputs(NodeInputs):
        text_encoder: Any = InputField(TEXT_ENCODER, description="the layout model's transformer (from its loader)")
        layout: str = InputField(STRING, '[["Person", 0.25, 0.25, 0.5, 0.5]]',
                                 description="JSON list of [class name or number, x, y, width, height], box in 0..1")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        text = literals.get("layout")
        if not isinstance(text, str):
            return []
        try:  # the released model's ranges (8192 tokens: class numbers 0..8190; 30 objects), checked again at run
            objects = parse_layout(text, n_numbers=LAYOUT_VOCAB - 1)
        except LayoutError as exc:
            return [("layout", codes.NOT_IN_CHOICES, f"LayoutConditioning: input 'layout': {exc}")]
        if len(objects) > MAX_OBJECTS:
            return [("layout", codes.OUT_OF_BOUNDS, f"LayoutConditioning: input 'layout': {len(objects)} objects; "
                     f"the layout model takes at most {MAX_OBJECTS}")]
        return []

    def contribute(self, inputs: Any, ctx: NodeContext) -> Contribution:
        import torch

        transformer = getattr(inputs.text_encoder, "transformer", None)
        if getattr(inputs.text_encoder, "kind", None) != "ldm-bert" or transformer is None:
            raise NodeInputError("LayoutConditioning: connect the text encoder of the layout-to-image model")
        vocab, length = int(transformer.token_emb.weight.shape[0]), int(transformer.pos_emb.emb.weight.shape[0])
        max_objects = (length - 2) // 3
        try:
            objects = parse_layout(inputs.layout, n_numbers=vocab - 1)
            tokens = layout_tokens([o.as_tuple() for o in objects], vocab=vocab, max_objects=max_objects)
        except (LayoutError, ValueError) as exc:
            raise NodeInputError(f"LayoutConditioning: input 'layout': {exc}") from exc
        empty = layout_tokens([], vocab=vocab, max_objects=max_objects)
        device = next(transformer.parameters()).device
        with torch.no_grad():
            context = transformer(torch.tensor([tokens, empty], device=device)).float().cpu()
        return Contribution(context[:1], negative=context[1:])


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """The conditioners of the paper's released models."""
    return [ClassConditioning, UnconditionalConditioning, PaperInpaintConditioning, SegmentationConditioning,
            LDSRConditioning, LayoutConditioning]
