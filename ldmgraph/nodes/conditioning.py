"""Conditioning nodes: text encoding and the ways to combine, restrict and zero conditioning.

CONDITIONING is a list of `ldmgraph.diffusion.CondEntry` (cross-attention context `[B, T, D]`,
optional pooled vector, optional concat tensor, strength, area, mask). The text reaches the U-Net
through cross-attention, softmax(Q K^T / sqrt(d)) V with K, V from the context (Rombach et al. 2022,
eq. 3). The concat-conditioning nodes (super-resolution, inpainting) live in `concat_conditioning.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldmgraph.conditioners import Conditioner, Contribution
from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.estimate import Estimate
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import BOOLEAN, CONDITIONING, FLOAT, INT, STRING, TEXT_ENCODER, VAE
from ldmgraph.nodes.common import SD_DOWNSCALE, NodeInputError
from ldmgraph.plugins import hookimpl

# The words of the bundled models' training captions (ldmgraph.train.data.vocab and scenes' phrases,
# e.g. "a small red circle on the left and a blue square at the top"); a test keeps them in step.
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")
FUNCTION_WORDS = ("a", "an", "and", "on", "at", "in", "the")


class TextEncode(Conditioner):
    """Encode a prompt with a text encoder into conditioning (cross-attention context).

    The prompt may weight its words as ComfyUI does, `(word:1.2)`, `(word)` = 1.1, `[word]` = 1/1.1,
    with `\\(` for a literal bracket, and name textual-inversion embeddings as `embedding:name`
    (files in the model folders' `embeddings/`); see docs/prompts.md. `clip_skip` k takes the k-th
    layer from the end (1 = the last layer, 2 = the penultimate one as SD2 and many SD1 fine-tunes expect).
    """

    type_name = "TextEncode"
    route = "crossattn"
    sides = "new"

    class Inputs(NodeInputs):
        text_encoder: Any = InputField(TEXT_ENCODER, description="text encoder from a loader")
        text: str = InputField(STRING, "", description="the prompt")
        clip_skip: int = InputField(INT, 1, ge=1, le=24, description="layer from the end to use (1 = last)")
        breaks: bool = InputField(BOOLEAN, True, description="the word BREAK starts a new 75-token window (A1111's "
                                  "convention, CLIP encoders); off in imported ComfyUI graphs, where BREAK is a word")
        brackets: bool = InputField(BOOLEAN, True, description="[word] weighs word by 1/1.1 (A1111's reading); off in "
                                    "imported ComfyUI graphs, where square brackets are text")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        """Each `embedding:name` of a known prompt names a file of the embeddings/ folders (before anything runs)."""
        from ldmgraph.graph import codes
        from ldmgraph.graph.errors import UnsafePathError
        from ldmgraph.models.embeddings import find_embedding
        from ldmgraph.models.prompt_weights import embedding_names

        text = literals.get("text")
        problems: list[tuple[str | None, str, str]] = []
        for name in embedding_names(text) if isinstance(text, str) else []:
            try:
                find_embedding(name, env.model_dirs)
            except UnsafePathError as error:
                problems.append(("text", codes.UNSAFE_PATH, f"embedding:{name}: {error}"))
            except FileNotFoundError as error:
                problems.append(("text", codes.FILE_NOT_FOUND, str(error)))
        return problems

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        """The named embedding files' identities join the cache key, so a replaced file re-encodes."""
        from ldmgraph.models.embeddings import find_embedding
        from ldmgraph.models.prompt_weights import embedding_names

        text = literals.get("text")
        parts = []
        for name in embedding_names(text) if isinstance(text, str) else []:
            try:
                path = find_embedding(name, env.model_dirs)
            except (OSError, ValueError):
                continue
            stat = path.stat()
            parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
        return ";".join(parts) or None

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        if inputs.text_encoder is None:
            raise NodeInputError(
                "TextEncode: the checkpoint has no text encoder (e.g. the super-resolution model); "
                "connect a text encoder from another loader or leave the prompt out of this graph"
            )
        # The pooled vector rides along as data: U-Nets whose `y` is a pooled text vector
        # (num_classes "sequential", e.g. models trained with the vector conditioning route) take it
        # by the vector route; SD 1.x/2.x and the shipped bundled models ignore it.
        encoding = inputs.text_encoder.encode_prompt(
            inputs.text, clip_skip=inputs.clip_skip, embeddings=prompt_embeddings(inputs.text, ctx), breaks=inputs.breaks,
            brackets=inputs.brackets,
        )
        return Contribution(encoding.context, pooled=encoding.pooled)

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        encoder, text = inputs.get("text_encoder"), inputs.get("text")
        if getattr(encoder, "layout", None) != "bundled" or not isinstance(text, str):
            return None
        unknown = unknown_words(text)
        if not unknown:
            return None
        return Estimate(warnings=(("text", (
            f"the bundled models know only their training captions' words (colours: {', '.join(COLOURS)}; "
            f"shapes: {', '.join(SHAPES)}; positions: {', '.join(POSITIONS)}; sizes: {', '.join(SIZES)}); "
            f"{', '.join(map(repr, unknown))} will be ignored")),))


class ClassLabel(Conditioner):
    """Condition a class-conditional U-Net on a class index (the vector route: the U-Net's `y`,
    an embedding added to the time embedding, Dhariwal & Nichol 2021)."""

    type_name = "ClassLabel"

    estimate_rule = "small"
    route = "vector"
    sides = "new"

    class Inputs(NodeInputs):
        label: int = InputField(INT, 0, ge=0, le=2**31 - 1, description="class index")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        import torch

        return torch.tensor([inputs.label], dtype=torch.long)


def prompt_embeddings(text: str, ctx: NodeContext) -> dict[str, Any]:
    """The textual-inversion embeddings a prompt names (`embedding:name`), loaded from the model folders."""
    from ldmgraph.models.prompt_weights import embedding_names

    names = embedding_names(text)
    if not names:
        return {}
    from ldmgraph.models.embedding_files import load_named

    try:
        return load_named(names, ctx.model_dirs)
    except FileNotFoundError as error:
        raise NodeInputError(f"TextEncode: text: {error}") from error


def unknown_words(text: str) -> list[str]:
    """The words of a prompt that the bundled models' captions never use (in order, once each)."""
    import re

    known = {*COLOURS, *SHAPES, *POSITIONS, *SIZES, *FUNCTION_WORDS}
    words = re.findall(r"[a-z]+", text.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


class ConditioningCombine(Node):
    """Join two conditioning lists: the sampler averages their predictions (a composition)."""

    type_name = "ConditioningCombine"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning_1: Any = InputField(CONDITIONING, description="first conditioning")
        conditioning_2: Any = InputField(CONDITIONING, description="second conditioning")

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="both lists, joined")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        return self.Outputs(conditioning=list(inputs.conditioning_1) + list(inputs.conditioning_2))


def _fit_tokens(context: Any, tokens: int) -> Any:
    """Pad (with zeros) or cut a context `[B, T, D]` to `tokens` tokens."""
    import torch

    if context.shape[1] >= tokens:
        return context[:, :tokens]
    pad = context.new_zeros(context.shape[0], tokens - context.shape[1], context.shape[2])
    return torch.cat([context, pad], dim=1)


class ConditioningAverage(Node):
    """Blend two prompts: context = w * to + (1 - w) * from (the first entry of `from`)."""

    type_name = "ConditioningAverage"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning_to: Any = InputField(CONDITIONING, description="conditioning kept at weight w")
        conditioning_from: Any = InputField(CONDITIONING, description="conditioning mixed in at 1 - w")
        to_strength: float = InputField(
            FLOAT, 1.0, ge=0.0, le=1.0, description="w: weight of `conditioning_to`"
        )

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="the blended conditioning")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        source = _first(inputs.conditioning_from, "ConditioningAverage", "conditioning_from")
        w = inputs.to_strength
        out = []
        for entry in inputs.conditioning_to:
            context = entry.context * w + _fit_tokens(source.context, entry.context.shape[1]) * (1.0 - w)
            pooled = entry.pooled
            if pooled is not None and source.pooled is not None:
                pooled = pooled * w + source.pooled * (1.0 - w)
            out.append(replace(entry, context=context, pooled=pooled))
        return self.Outputs(conditioning=out)


class ConditioningConcat(Node):
    """Append the tokens of `from` to each entry of `to` (a longer context, both prompts attended)."""

    type_name = "ConditioningConcat"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning_to: Any = InputField(CONDITIONING, description="conditioning to extend")
        conditioning_from: Any = InputField(
            CONDITIONING, description="conditioning whose tokens are appended"
        )

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="the concatenated conditioning")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        import torch

        source = _first(inputs.conditioning_from, "ConditioningConcat", "conditioning_from")
        out = []
        for entry in inputs.conditioning_to:
            extra = source.context.to(entry.context.dtype)
            if extra.shape[0] != entry.context.shape[0]:
                extra = extra.expand(entry.context.shape[0], -1, -1)
            out.append(replace(entry, context=torch.cat([entry.context, extra], dim=1)))
        return self.Outputs(conditioning=out)


class ConditioningSetArea(Node):
    """Restrict conditioning to a rectangle of the image (regional prompts, area composition).

    Sizes are in pixels, multiples of 8; they become latent pixels through the VAE's downscale
    factor (8 when no VAE is connected, as Stable Diffusion's). At sampling, entries are averaged by
    strength where they overlap, and the area's weight ramps up over 8 latent pixels from each edge
    that lies inside the image, as ComfyUI's does (`ldmgraph.diffusion.guidance`).
    """

    type_name = "ConditioningSetArea"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: Any = InputField(CONDITIONING, description="conditioning to restrict")
        width: int = InputField(INT, 64, ge=8, le=16384, multiple_of=8, description="area width in pixels")
        height: int = InputField(INT, 64, ge=8, le=16384, multiple_of=8, description="area height in pixels")
        x: int = InputField(INT, 0, ge=0, le=16384, multiple_of=8, description="left edge in pixels")
        y: int = InputField(INT, 0, ge=0, le=16384, multiple_of=8, description="top edge in pixels")
        strength: float = InputField(FLOAT, 1.0, ge=0.0, le=10.0, description="weight against other entries")
        vae: Any = InputField(VAE, None, description="optional: the VAE whose factor maps pixels to latents")

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="the restricted conditioning")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        f = downscale_of(inputs.vae)
        area = (inputs.height // f, inputs.width // f, inputs.y // f, inputs.x // f)
        return self.Outputs(
            conditioning=[replace(e, area=area, strength=inputs.strength) for e in inputs.conditioning]
        )


class ConditioningZeroOut(Node):
    """Zero the context and pooled vectors (an "empty" negative for models trained that way)."""

    type_name = "ConditioningZeroOut"

    estimate_rule = "small"
    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: Any = InputField(CONDITIONING, description="conditioning to zero")

    class Outputs(NodeOutputs):
        conditioning: Any = OutputField(CONDITIONING, description="zeros of the same shapes")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        out = [
            replace(e, context=e.context * 0, pooled=None if e.pooled is None else e.pooled * 0)
            for e in inputs.conditioning
        ]
        return self.Outputs(conditioning=out)


def downscale_of(vae: Any) -> int:
    """The VAE's pixel-to-latent factor (4 for the bundled models, 8 for SD), 8 without a VAE."""
    return SD_DOWNSCALE if vae is None else int(vae.downscale)


def _first(conditioning: Any, node: str, name: str) -> Any:
    if not conditioning:
        raise NodeInputError(f"{node}: {name} is an empty conditioning list; connect a TextEncode output")
    return conditioning[0]


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the nodes that combine and restrict conditioning."""
    return [
        ConditioningCombine,
        ConditioningAverage,
        ConditioningConcat,
        ConditioningSetArea,
        ConditioningZeroOut,
    ]


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """The cross-attention (text) and vector (class label) conditioners."""
    return [TextEncode, ClassLabel]
