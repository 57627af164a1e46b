"""Loader nodes: a checkpoint, a VAE or a text encoder, found by name in the model folders.

Model folders are the run's `--models-dir` list (default `./models`, then the bundled
`ldmgraph/assets/models`). A name is a file (`.safetensors`; the extension may be left out) or a
diffusers folder, relative to a model folder; `..` and absolute paths are refused. Loaded models
live in the executor session's model cache, so a second workflow naming the same file reuses it.
"""

from __future__ import annotations

from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import ENUM, MODEL, STRING, TEXT_ENCODER, VAE
from ldmgraph.nodes.common import (
    NodeInputError,
    check_model_name,
    find_model,
    load_device,
    model_cache,
    model_fingerprint,
    model_summary,
)
from ldmgraph.plugins import hookimpl

BUNDLED_TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"
DTYPES = ["file", "fp32", "bf16", "fp16"]
DTYPE_HELP = ("weights' precision: 'file' keeps the file's; fp32, bf16 or fp16 cast once at load "
              "(`ldmgraph run --precision` sets this)")


def _dtype(name: str) -> str | None:
    from ldmgraph.models.precision import torch_dtype_name

    return torch_dtype_name(name)
MINILM = "minilm-l6-v2"
MINILM_BYTES = 22_713_216 * 4  # all-MiniLM-L6-v2's parameters in float32
CLIP_RUNTIME_BYTES = 64 * 2**20  # a CLIP text encoder's BPE tables and first run, beyond its weights


class CheckpointLoader(Node):
    """Load a checkpoint (single file in the original LDM/SD layout, or a diffusers folder).

    Outputs the diffusion model, its text encoder (None for models without text, such as the
    super-resolution model) and its autoencoder. The architecture is detected from the weights.
    """

    type_name = "CheckpointLoader"
    category = "loaders"

    class Inputs(NodeInputs):
        ckpt_name: str = InputField(
            STRING, BUNDLED_TXT2IMG, description="checkpoint file or diffusers folder in the model folders"
        )
        prediction_type: str = InputField(
            ENUM,
            "auto",
            choices=["auto", "eps", "v"],
            description="override what the U-Net predicts (SD 2.x 768 models are 'v'); auto reads the file",
        )
        config: str = InputField(
            STRING,
            "",
            description="original YAML config in the model folders (the LDM paper's releases; default: "
            "config.yaml beside the checkpoint, else detected from the weights)",
        )
        dtype: str = InputField(ENUM, "file", choices=DTYPES, description=DTYPE_HELP)

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the diffusion U-Net")
        text_encoder: Any = OutputField(
            TEXT_ENCODER, description="the text encoder (None if the model has none)"
        )
        vae: Any = OutputField(VAE, description="the autoencoder")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str, str, str]]:
        found = check_model_name(literals.get("ckpt_name"), env, need_unet=True)
        problems = [("ckpt_name", code, msg) for code, msg in found]
        if literals.get("config"):
            problems += [("config", code, msg) for code, msg in check_config_name(literals["config"], env)]
        return problems

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        summary = model_summary(inputs["ckpt_name"], env, need_unet=True)
        if summary is None:
            return None
        # MiniLM's weights are not in the file; a CLIP-family file's are, but its tokenizer tables and
        # the text model's first run cost CLIP_RUNTIME_BYTES besides (measured: 52 MiB)
        text = MINILM_BYTES if summary.text_encoder == MINILM else CLIP_RUNTIME_BYTES if summary.layout != "bundled" else 0
        outputs = {"model": summary, "text_encoder": summary if summary.text_encoder else None,
                   "vae": summary if summary.vae else None}
        return Estimate(keeps=summary.weight_bytes + text, outputs=outputs, what="the checkpoint's weights")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        parts = [model_fingerprint(literals.get(k), env) for k in ("ckpt_name", "config") if literals.get(k)]
        return None if None in parts else "|".join(str(p) for p in parts)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.checkpoint import load_checkpoint

        path = find_model(inputs.ckpt_name, ctx.model_dirs)
        config = find_model(inputs.config, ctx.model_dirs) if inputs.config else None
        prediction = None if inputs.prediction_type == "auto" else inputs.prediction_type
        checkpoint = load_checkpoint(
            path, cache=model_cache(ctx), prediction_type=prediction, progress=ctx.progress, config=config,
            dtype=_dtype(inputs.dtype), device=load_device(ctx),
        )
        return self.Outputs(model=checkpoint.unet, text_encoder=checkpoint.text_encoder, vae=checkpoint.vae)


class VAELoader(Node):
    """Load an autoencoder on its own: a VAE file, or the first-stage model of a full checkpoint."""

    type_name = "VAELoader"
    category = "loaders"

    class Inputs(NodeInputs):
        vae_name: str = InputField(STRING, description="VAE file (or checkpoint) in the model folders")
        dtype: str = InputField(ENUM, "file", choices=DTYPES, description=DTYPE_HELP)

    class Outputs(NodeOutputs):
        vae: Any = OutputField(VAE, description="the autoencoder")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str, str, str]]:
        return [("vae_name", code, msg) for code, msg in check_model_name(literals.get("vae_name"), env)]

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        summary = model_summary(inputs["vae_name"], env)
        if summary is None or summary.vae is None:
            return None
        return Estimate(keeps=summary.weight_bytes, outputs={"vae": summary}, what="the autoencoder's weights")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        return model_fingerprint(literals.get("vae_name"), env)

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.checkpoint import load_vae

        path = find_model(inputs.vae_name, ctx.model_dirs)
        return self.Outputs(vae=load_vae(path, cache=model_cache(ctx), dtype=_dtype(inputs.dtype),
                                             device=load_device(ctx)))


class TextEncoderLoader(Node):
    """Load a text encoder on its own: the bundled MiniLM-L6 by name (its per-word context, as the inpainting model reads it), or the one a checkpoint declares (the bundled text-to-image file's: MiniLM with its clause tokens)."""

    type_name = "TextEncoderLoader"
    category = "loaders"

    class Inputs(NodeInputs):
        name: str = InputField(
            STRING,
            MINILM,
            description=f"'{MINILM}' (the bundled models' encoder) or a checkpoint in the model folders",
        )
        dtype: str = InputField(ENUM, "file", choices=DTYPES, description=DTYPE_HELP)

    class Outputs(NodeOutputs):
        text_encoder: Any = OutputField(TEXT_ENCODER, description="the text encoder")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str, str, str]]:
        if literals.get("name") == MINILM:
            return []
        return [("name", code, msg) for code, msg in check_model_name(literals.get("name"), env)]

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        return None if literals.get("name") == MINILM else model_fingerprint(literals.get("name"), env)

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        if inputs.get("name") == MINILM:
            return Estimate(keeps=MINILM_BYTES, what="MiniLM's weights")
        summary = model_summary(inputs.get("name"), env)
        return None if summary is None else Estimate(keeps=summary.weight_bytes, what="the checkpoint's weights")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.checkpoint import load_text_encoder

        path = MINILM if inputs.name == MINILM else find_model(inputs.name, ctx.model_dirs)
        encoder = load_text_encoder(path, cache=model_cache(ctx), dtype=_dtype(inputs.dtype),
                                    device=load_device(ctx))
        if encoder is None:
            raise NodeInputError(f"{inputs.name!r} has no text encoder; pick a checkpoint that has one")
        return self.Outputs(text_encoder=encoder)


def check_config_name(name: Any, env: Environment) -> list[tuple[str, str]]:
    """Validation of a config-file name: inside a model folder and present (a YAML file, not a model)."""
    from ldmgraph.graph import codes
    from ldmgraph.graph.errors import UnsafePathError

    try:
        find_model(str(name), env.model_dirs)
    except UnsafePathError as error:
        return [(codes.UNSAFE_PATH, f"{error}: name a file inside the model folders")]
    except FileNotFoundError as error:
        return [(codes.FILE_NOT_FOUND, str(error))]
    return []


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the loader nodes."""
    return [CheckpointLoader, VAELoader, TextEncoderLoader]
