"""Nodes for the Latent Diffusion paper's released models: class labels, unconditional sampling, the
original inpainting and semantic-synthesis conditioning, and LDSR x4 upscaling of any size.

Each conditioning node produces ordinary CONDITIONING entries (Rombach et al. 2022, Sec. 3.3):
a class label becomes a one-token cross-attention `context` (the ImageNet model's `ClassEmbedder`);
the inpainting model's masked image (through the first stage) and mask, and the semantic-synthesis
model's one-hot map (through its `SpatialRescaler`), become `concat` channels. The conditioning
modules travel with the MODEL handle (`model.cond_stage_model`) of a release loaded by
`CheckpointLoader`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import (
    CONDITIONING,
    ENUM,
    FLOAT,
    IMAGE,
    INT,
    LATENT,
    MASK,
    MODEL,
    STRING,
    TEXT_ENCODER,
    VAE,
)
from ldmgraph.nodes.common import (
    DEVICES,
    NodeInputError,
    check_mask_size,
    image_to_numpy,
    image_to_torch,
    mask_to_torch,
    pick_device,
    step_reporter,
)
from ldmgraph.plugins import hookimpl

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


def _placeholder() -> Any:
    import torch

    from ldmgraph.diffusion import CondEntry

    return CondEntry(context=torch.zeros(1, 1, 1))


def _cond_module(model: Any, kind: str, node: str) -> Any:
    module = getattr(model, "cond_stage_model", None)
    if module is None or type(module).__name__ != kind:
        raise NodeInputError(
            f"{node}: the model has no {kind} (it comes with the paper's "
            + ("class-conditional ImageNet model, cin256-v2" if kind == "ClassEmbedder"
               else "semantic-synthesis model") + "); load that checkpoint with CheckpointLoader"
        )
    return module


class ClassConditioning(Node):
    """Condition a class-conditional model (the paper's ImageNet LDM) on an ImageNet class.

    The class embedder turns the label into a one-token context for cross-attention. The negative
    side is the unconditional class (index 1000 of the released model's 1001 labels), so `cfg` > 1
    gives classifier-free guidance as in the paper (Sec. 4.3, Tab. 3, scale 1.5).
    """

    type_name = "ClassConditioning"
    category = "conditioning"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="a class-conditional model (cin256-v2)")
        class_name: str = InputField(ENUM, "golden retriever", choices=[*imagenet_class_names(), UNCONDITIONAL],
                                     description="the ImageNet class to draw")

    class Outputs(NodeOutputs):
        positive: Any = OutputField(CONDITIONING, description="the class")
        negative: Any = OutputField(CONDITIONING, description="the unconditional class (for CFG)")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        from ldmgraph.diffusion import CondEntry

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

        def entry(index: int) -> Any:
            with torch.no_grad():
                return [CondEntry(context=embedder(torch.tensor([index])).float().cpu())]

        negative = entry(unconditional) if unconditional is not None else entry(label)
        return self.Outputs(positive=entry(label), negative=negative)


class UnconditionalConditioning(Node):
    """Conditioning for models without any (the paper's CelebA-HQ, FFHQ, LSUN models): sample with cfg 1."""

    type_name = "UnconditionalConditioning"
    category = "conditioning"

    class Inputs(NodeInputs):
        pass

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="an entry that carries nothing")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(conditioning=[_placeholder()])


class PaperInpaintConditioning(Node):
    """Condition the paper's inpainting model (`inpainting_big`) as its own script does.

    The mask is binarised at 0.5; the masked image (1 - mask) * image and the mask are mapped to
    -1..1 (so the hole is black and the mask is +-1); the masked image is encoded by the first stage
    and the mask resized to the latent grid (nearest), then [masked latent, mask] is concatenated
    to the latent (3 + 3 + 1 = 7 U-Net channels). Sample from an empty latent (this output) at
    cfg 1; paste the result into the image with ImageCompositeMasked.
    """

    type_name = "PaperInpaintConditioning"
    category = "conditioning"

    class Inputs(NodeInputs):
        vae: Any = InputField(VAE, description="the inpainting model's first stage")
        image: Any = InputField(IMAGE, description="the image to repaint")
        mask: Any = InputField(MASK, description="1 where to repaint; the image's size")

    class Outputs(NodeOutputs):
        positive: Any = OutputField(CONDITIONING, description="the inpainting concat")
        negative: Any = OutputField(CONDITIONING, description="the same (the model has no unconditional input)")
        latent: Any = OutputField(LATENT, description="an empty latent of the image's size")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        check_mask_size(inputs.mask, inputs.image, "PaperInpaintConditioning")
        batch = inputs.image.shape[0]
        mask = (mask_to_torch(inputs.mask, batch) >= 0.5).float()  # [B, 1, H, W]
        pixels = image_to_torch(inputs.image)
        masked = pixels * (1.0 - mask.permute(0, 2, 3, 1))
        vae = inputs.vae
        masked_latent = vae.encode(masked) / vae.scale_factor  # the first stage itself, no latent scaling
        small = F.interpolate(mask * 2.0 - 1.0, size=masked_latent.shape[-2:])
        concat = torch.cat([masked_latent, small], dim=1)
        entry = replace(_placeholder(), concat=concat)
        latent = torch.zeros(batch, vae.latent_channels, *masked_latent.shape[-2:])
        return self.Outputs(positive=[entry], negative=[entry], latent=Latent(samples=latent))


class SegmentationConditioning(Node):
    """Condition the paper's semantic-synthesis model on a segmentation map.

    The map is an image whose red channel holds the class index (value / 255, i.e. the 8-bit
    label image); it is one-hot encoded over the model's classes (182 for the released model),
    then the model's `SpatialRescaler` resizes it to the latent grid and maps it to the concat
    channels.
    """

    type_name = "SegmentationConditioning"
    category = "conditioning"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the semantic-synthesis model")
        segmentation: Any = InputField(IMAGE, description="label image: class index in the red channel (0..255)")

    class Outputs(NodeOutputs):
        positive: Any = OutputField(CONDITIONING, description="the map as concat")
        negative: Any = OutputField(CONDITIONING, description="the same (no unconditional input)")
        latent: Any = OutputField(LATENT, description="an empty latent of the map's latent size")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch
        import torch.nn.functional as F

        from ldmgraph.diffusion import Latent

        rescaler = _cond_module(inputs.model, "SpatialRescaler", "SegmentationConditioning")
        labels = torch.from_numpy(inputs.segmentation[..., 0].copy() * 255.0).round().long()
        classes = int(rescaler.in_channels)
        if int(labels.max()) >= classes:
            raise NodeInputError(
                f"SegmentationConditioning: the map has class {int(labels.max())} but the model knows {classes} "
                "classes (0..{classes - 1})"
            )
        one_hot = F.one_hot(labels, classes).permute(0, 3, 1, 2).float()
        weight = next(rescaler.parameters())
        with torch.no_grad():
            concat = rescaler(one_hot.to(weight)).float().cpu()
        entry = replace(_placeholder(), concat=concat)
        latent = torch.zeros(concat.shape[0], inputs.model.latent_channels, *concat.shape[-2:])
        return self.Outputs(positive=[entry], negative=[entry], latent=Latent(samples=latent))


class LDSRUpscale(Node):
    """x4 super-resolution with the paper's LDSR model (`bsr_sr`), for images of any size.

    The low-resolution image (-1..1) is concatenated to the latent in pixel space (the latent grid of
    the x4 output equals the input's size with the VQ-f4 first stage). DDIM runs with `eta` and
    `steps` (the original notebook: eta 1, 100 steps); when the latent is larger than `tile`, the
    model runs on overlapping tiles blended at every step (see `ldmgraph.models.tiling`).
    """

    type_name = "LDSRUpscale"
    category = "sampling"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the LDSR model (bsr_sr)")
        vae: Any = InputField(VAE, description="its first stage")
        image: Any = InputField(IMAGE, description="the low-resolution image")
        steps: int = InputField(INT, 100, ge=1, le=1000, description="DDIM steps")
        eta: float = InputField(FLOAT, 1.0, ge=0.0, le=1.0, description="DDIM eta (0 deterministic, 1 ancestral)")
        seed: int = InputField(INT, 0, ge=0, le=2**64 - 1, description="noise seed")
        tile: int = InputField(INT, 128, ge=8, le=1024, description="largest latent tile side (input pixels)")
        overlap: int = InputField(INT, 32, ge=0, le=512, description="tile overlap (input pixels)")
        device: str = InputField(ENUM, "auto", choices=list(DEVICES), description="where to compute")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="the x4 image")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        from ldmgraph.diffusion import Latent, sample
        from ldmgraph.models.tiling import TiledModel

        if inputs.overlap >= inputs.tile:
            raise NodeInputError("LDSRUpscale: overlap must be smaller than tile")
        model = inputs.model
        if model.concat_channels != 3:
            raise NodeInputError("LDSRUpscale: the model does not take a low-resolution RGB image (load bsr_sr)")
        lowres = image_to_torch(inputs.image).permute(0, 3, 1, 2) * 2.0 - 1.0
        entry = [replace(_placeholder(), concat=lowres)]
        latent = Latent(samples=torch.zeros(lowres.shape[0], model.latent_channels, *lowres.shape[-2:]))

        report = step_reporter(ctx, inputs.steps, model)
        out = sample(
            TiledModel(model, inputs.tile, inputs.overlap), latent, entry, entry, seed=inputs.seed,
            steps=inputs.steps, cfg=1.0, sampler="ddim", schedule="ddim_uniform",
            device=pick_device(inputs.device, ctx), callback=report, registry=ctx.registry,
            sampler_options={"eta": inputs.eta}, start_noise="vp",
        )
        return self.Outputs(image=image_to_numpy(inputs.vae.decode(out.samples)))


class LayoutConditioning(Node):
    """Condition the paper's layout-to-image model on boxes of object classes.

    `layout` is JSON: a list of [class number, x, y, width, height] with coordinates in 0..1 of the
    image (class numbers of the model's OpenImages categories). The boxes become the model's tokens
    (see `ldmgraph.models.paper.layout_tokens`) and its transformer (loaded as the checkpoint's text
    encoder) turns them into the cross-attention context.
    """

    type_name = "LayoutConditioning"
    category = "conditioning"

    class Inputs(NodeInputs):
        text_encoder: Any = InputField(TEXT_ENCODER, description="the layout model's transformer (from its loader)")
        layout: str = InputField(STRING, "[[0, 0.25, 0.25, 0.5, 0.5]]",
                                 description="JSON list of [class number, x, y, width, height], coordinates 0..1")

    class Outputs(NodeOutputs):
        positive: Any = OutputField(CONDITIONING, description="the layout")
        negative: Any = OutputField(CONDITIONING, description="an empty layout (all boxes 'none')")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import json

        import torch

        from ldmgraph.diffusion import CondEntry
        from ldmgraph.models.paper import layout_tokens

        transformer = getattr(inputs.text_encoder, "transformer", None)
        if getattr(inputs.text_encoder, "kind", None) != "ldm-bert" or transformer is None:
            raise NodeInputError("LayoutConditioning: connect the text encoder of the layout-to-image model")
        vocab, length = int(transformer.token_emb.weight.shape[0]), int(transformer.pos_emb.emb.weight.shape[0])
        try:
            objects = [tuple(o) for o in json.loads(inputs.layout)]
            tokens = layout_tokens(objects, vocab=vocab, max_objects=(length - 2) // 3)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise NodeInputError(f"LayoutConditioning: input 'layout': {exc}") from exc
        empty = layout_tokens([], vocab=vocab, max_objects=(length - 2) // 3)
        device = next(transformer.parameters()).device
        with torch.no_grad():
            context = transformer(torch.tensor([tokens, empty], device=device)).float().cpu()
        return self.Outputs(positive=[CondEntry(context=context[:1])], negative=[CondEntry(context=context[1:])])


DISCRETIZATIONS = {"uniform": "ddim_uniform", "trailing": "simple"}


class DDIMSampler(Node):
    """DDIM as the paper's code samples (Song et al. 2021, eq. 12): `eta` 0 deterministic, 1 ancestral.

    Starts from unit-variance noise at the first timestep, as the original `DDIMSampler` and
    diffusers' LDM pipelines do. `discretize` "uniform" takes timesteps 1 + k * (1000 // steps)
    (the original code's default, diffusers' "leading" spacing with steps_offset 1); "trailing"
    ends the schedule at the last training step (999, 999 - 1000 / steps, ...).
    """

    type_name = "DDIMSampler"
    category = "sampling"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model")
        positive: Any = InputField(CONDITIONING, description="the conditioning")
        negative: Any = InputField(CONDITIONING, description="the unconditional side (used when cfg != 1)")
        latent: Any = InputField(LATENT, description="an empty latent of the output size")
        seed: int = InputField(INT, 0, ge=0, le=2**64 - 1, description="noise seed (image k of a batch: seed + k)")
        steps: int = InputField(INT, 50, ge=1, le=1000, description="DDIM steps")
        cfg: float = InputField(FLOAT, 1.0, ge=0.0, le=100.0, description="classifier-free guidance scale")
        eta: float = InputField(FLOAT, 0.0, ge=0.0, le=1.0, description="0 deterministic, 1 ancestral (DDPM-like)")
        discretize: str = InputField(ENUM, "uniform", choices=list(DISCRETIZATIONS), description="timestep spacing")
        device: str = InputField(ENUM, "auto", choices=list(DEVICES), description="where to compute")

    class Outputs(NodeOutputs):
        latent: Any = OutputField(LATENT, description="the sampled latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.diffusion import sample

        report = step_reporter(ctx, inputs.steps, inputs.model)
        ctx.check_cancelled()
        out = sample(
            inputs.model, inputs.latent, inputs.positive, inputs.negative, seed=inputs.seed, steps=inputs.steps,
            cfg=inputs.cfg, sampler="ddim", schedule=DISCRETIZATIONS[inputs.discretize],
            device=pick_device(inputs.device, ctx), callback=report, registry=ctx.registry,
            sampler_options={"eta": inputs.eta}, start_noise="vp",
        )
        return self.Outputs(latent=out)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the nodes of the paper's models."""
    return [ClassConditioning, UnconditionalConditioning, PaperInpaintConditioning, SegmentationConditioning,
            LDSRUpscale, DDIMSampler, LayoutConditioning]
