"""Sampling nodes for the Latent Diffusion paper's released models: DDIM as the paper's code samples,
and LDSR x4 upscaling of any size. Their conditioning (class labels, layouts, inpainting,
segmentation maps, LDSR's low-resolution image) is made by the conditioners in
`ldmgraph.nodes.paper_conditioning`.
"""

from __future__ import annotations

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
    MODEL,
    VAE,
)
from ldmgraph.nodes.common import (
    DEVICES,
    NodeInputError,
    image_to_numpy,
    pick_device,
    step_reporter,
)
from ldmgraph.nodes.paper_conditioning import ldsr_concat
from ldmgraph.nodes.sampling import _SamplerNode
from ldmgraph.plugins import hookimpl


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

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Any) -> Any:
        """The x4 image kept; working memory: the U-Net on one tile (cfg 1) and the VQ decoder's
        full-resolution activations (128 channels at the output size, a few alive at once)."""
        from ldmgraph.graph.estimate import Estimate, Shape
        from ldmgraph.models.memory import unet_bytes

        image, model = inputs.get("image"), inputs.get("model")
        if not isinstance(image, Shape):
            return None
        out = Shape(image.batch, image.channels, image.height * 4, image.width * 4)
        decode = image.batch * out.height * out.width * 128 * 4 * 3
        tile = min(int(inputs.get("tile") or 128), max(image.height, image.width))
        unet = getattr(model, "unet", None)
        works = decode + (unet_bytes(unet, image.batch, tile, tile, model.dtype_bytes) if unet else 0)
        return Estimate(keeps=out.nbytes, works=works, outputs={"image": out},
                        what=f"decoding {out.width}x{out.height} from the VQ latent")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        from ldmgraph.diffusion import CondEntry, Latent, sample
        from ldmgraph.models.tiling import TiledModel

        if inputs.overlap >= inputs.tile:
            raise NodeInputError("LDSRUpscale: overlap must be smaller than tile")
        model = inputs.model
        if model.concat_channels != 3:
            raise NodeInputError("LDSRUpscale: the model does not take a low-resolution RGB image (load bsr_sr)")
        lowres = ldsr_concat(inputs.image)  # as LDSRConditioning contributes it
        entry = [CondEntry(concat=lowres)]
        latent = Latent(samples=torch.zeros(lowres.shape[0], model.latent_channels, *lowres.shape[-2:]))

        report = step_reporter(ctx, inputs.steps, model)
        out = sample(
            TiledModel(model, inputs.tile, inputs.overlap), latent, entry, entry, seed=inputs.seed,
            steps=inputs.steps, cfg=1.0, sampler="ddim", schedule="ddim_uniform",
            device=pick_device(inputs.device, ctx), callback=report, registry=ctx.registry,
            sampler_options={"eta": inputs.eta}, start_noise="vp",
        )
        return self.Outputs(image=image_to_numpy(inputs.vae.decode(out.samples)))


DISCRETIZATIONS = {"uniform": "ddim_uniform", "trailing": "simple"}


class DDIMSampler(_SamplerNode):
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
    """Register the paper's sampling nodes (its conditioners register through `ldmgraph_conditioners`)."""
    return [LDSRUpscale, DDIMSampler]
