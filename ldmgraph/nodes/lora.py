"""LoRA nodes with ComfyUI's names and inputs: `LoraLoader` (model and text encoder) and
`LoraLoaderModelOnly`.

LoRA files live in a `loras/` folder under each model folder (ComfyUI's layout); `..` and absolute
names are refused. A LoRA node returns new handles that name the loaded base plus the LoRA's weight
patches (`ldmgraph.models.patches`): the base stays shared and unchanged for every other branch
and for the cache, the weights are patched in place only while a sampler or text encode runs with
the new handle, and restored bit for bit afterwards. Changing a strength re-runs from the LoRA node
on; the base is never read from disk again. Validation reads the LoRA's header and refuses a LoRA
made for another architecture than the model linked to it; keys that match nothing are a warning
naming how many and a sample (at validation and when the node runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs, codes
from ldmgraph.graph.context import Environment
from ldmgraph.graph.errors import LdmGraphError, UnsafePathError
from ldmgraph.graph.estimate import Estimate
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import FLOAT, MODEL, STRING, TEXT_ENCODER
from ldmgraph.nodes.common import NodeInputError, find_model, model_cache
from ldmgraph.plugins import hookimpl

LORA_FOLDER = "loras"
STRENGTH_LIMIT = 100.0


def lora_dirs(model_dirs: tuple[Path, ...] | list[Path]) -> tuple[Path, ...]:
    """The `loras/` folder of each model folder, in the model folders' order."""
    return tuple(Path(d) / LORA_FOLDER for d in model_dirs)


def find_lora(name: str, model_dirs: tuple[Path, ...] | list[Path]) -> Path:
    """A LoRA file by name (the `.safetensors` extension may be left out) in the `loras/` folders."""
    return find_model(name, lora_dirs(model_dirs))


def _strength(description: str) -> Any:
    return InputField(FLOAT, 1.0, ge=-STRENGTH_LIMIT, le=STRENGTH_LIMIT, description=description)


def _check_name(literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
    from ldmgraph.models.errors import ModelError
    from ldmgraph.models.header import read_header

    name = literals.get("lora_name")
    if not isinstance(name, str):
        return []
    try:
        path = find_lora(name, env.model_dirs)
        read_header(path)
    except UnsafePathError as error:
        return [("lora_name", codes.UNSAFE_PATH, f"{error}: name a file inside a loras/ folder")]
    except FileNotFoundError as error:
        return [("lora_name", codes.FILE_NOT_FOUND, f"{error} (LoRA files go in a 'loras' folder of a model folder)")]
    except (ModelError, OSError) as error:
        return [("lora_name", codes.BAD_MODEL, f"{type(error).__name__}: {error}")]
    return []


def _fingerprint(literals: dict[str, Any], env: Environment) -> str | None:
    try:
        path = find_lora(str(literals.get("lora_name")), env.model_dirs)
    except (OSError, LdmGraphError):
        return None
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _estimate(inputs: dict[str, Any], env: Environment, with_text: bool) -> Estimate | None:
    """Pass the model facts through; refuse a LoRA for another architecture than the model's."""
    from ldmgraph.models.header import read_header

    outputs = {"model": inputs.get("model")}
    if with_text:
        outputs["text_encoder"] = inputs.get("text_encoder")
    try:
        path = find_lora(str(inputs.get("lora_name")), env.model_dirs)
        header, _ = read_header(path)
    except (OSError, LdmGraphError):
        return Estimate(outputs=outputs)
    problems, warnings = architecture_problems(header, inputs.get("model"), with_text, path.name)
    return Estimate(keeps=path.stat().st_size, outputs=outputs, warnings=tuple(warnings),
                    problems=tuple(problems), what="the LoRA's tensors")


def architecture_problems(
    header: dict[str, Any], summary: Any, with_text: bool, name: str
) -> tuple[list[tuple[str | None, str, str]], list[tuple[str | None, str]]]:
    """Validation of a LoRA header against the linked model's summary: errors for another
    architecture (U-Net deltas of another shape, U-Net keys matching nothing, text-encoder keys for
    encoders the checkpoint does not have), a warning for unmatched U-Net keys where the summary
    knows the U-Net's whole layout. Nothing when the model is unknown (the run checks again)."""
    from ldmgraph.models import lora

    config = getattr(summary, "unet", None)
    unet = _meta_unet(config)
    if unet is None:
        return [], []
    texts = _text_parts_of(summary) if with_text else set()
    shapes = lora.relevant_keys({k: tuple(v.shape) for k, v in header.items()}, with_text=with_text)
    parts = {"unet": (lora.unet_aliases(unet, config), lora.weight_shapes(unet))}
    unet_keys = {k: v for k, v in shapes.items() if (s := lora.split_key(k, texts or ())) is None or s[0] == "unet"}
    plan = lora.plan_lora(unet_keys, parts)
    file_parts = lora.file_parts(shapes, texts or ())
    if texts is None:  # the checkpoint's text encoders are not known here: only the U-Net is checked
        file_parts -= set(lora.TEXT_PARTS)
    try:
        lora.check_plan(plan, name, {"unet", *(texts or ())}, file_parts)
    except lora.LoraMismatchError as error:
        return [("lora_name", codes.BAD_MODEL, str(error))], []
    message = plan.warning(name) if "transformer_depth" in config else None
    return [], ([("lora_name", message)] if message else [])


def _meta_unet(config: Any) -> Any:
    """The U-Net of a summary's config on the meta device (no memory), or None."""
    from ldmgraph.models.unet import UNetModel
    from ldmgraph.models.weights import build_on_meta

    if not isinstance(config, dict):
        return None
    if config.get("num_heads", -1) == -1 and config.get("num_head_channels", -1) == -1:
        config = {**config, "num_heads": 1}  # heads do not change any weight's shape
    try:
        return build_on_meta(UNetModel, **config)
    except Exception:  # noqa: BLE001 - an unusual config: the run-time check still applies
        return None


def _text_parts_of(summary: Any) -> set[str] | None:
    """The LoRA parts of a checkpoint's text encoders ("te"; SDXL's "te1", "te2"), from its files."""
    from ldmgraph.models.header import read_header

    path = Path(str(getattr(summary, "path", "")))
    if path.is_dir():
        found = {"te1" if (path / "text_encoder_2").is_dir() else "te"} if (path / "text_encoder").is_dir() else set()
        return found | ({"te2"} if (path / "text_encoder_2").is_dir() else set())
    try:
        keys = read_header(path)[0]
    except Exception:  # noqa: BLE001 - unreadable here: the loader reports it
        return None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return {"te1", "te2"}
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return {"te2"}
    if any(k.startswith("cond_stage_model.") for k in keys):
        return {"te"}
    return None


def apply_lora(
    ctx: NodeContext, name: str, model: Any, text_encoder: Any, strength_model: float, strength_clip: float
) -> tuple[Any, Any]:
    """The patched handles of a LoRA (the given handles themselves where a strength is 0)."""
    from ldmgraph.models import lora
    from ldmgraph.models.checkpoint import file_identity
    from ldmgraph.models.patches import patched

    path = find_lora(name, ctx.model_dirs)
    cache = model_cache(ctx)
    lora_file = cache.get_or_load(("lora", file_identity(path)), lambda: lora.read_lora(path))
    try:
        unet_patches, text_patches, _ = lora.lora_patches(
            lora_file, unet=model, text_encoder=text_encoder, strength_model=strength_model,
            strength_clip=strength_clip, name=path.name,
        )
    except lora.LoraError as error:
        raise NodeInputError(f"lora_name: {error}") from error
    if unet_patches and strength_model != 0:
        model = patched(model, unet_patches)
    if text_encoder is not None and text_patches and strength_clip != 0:
        text_encoder = patched(text_encoder, text_patches)
    return model, text_encoder


class _LoraNode(Node):
    """What both LoRA nodes check before running: the file's name, its identity for the cache, and the
    memory it adds (the text encoder's share only when the node patches it)."""

    with_text = True

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        return _check_name(literals, env)

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        return _fingerprint(literals, env)

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        return _estimate(inputs, env, with_text=cls.with_text)


class LoraLoader(_LoraNode):
    """Apply a LoRA to a diffusion model and its text encoder (ComfyUI's LoraLoader).

    Reads kohya/A1111, diffusers/PEFT and LyCORIS (LoCon, LoHa, LoKr, DoRA) files from the loras/
    folders. The outputs share the loaded model: no copy, the base restored bit for bit after use.
    """

    type_name = "LoraLoader"
    category = "loaders"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model to patch")
        text_encoder: Any = InputField(TEXT_ENCODER, description="its text encoder (ComfyUI's clip)")
        lora_name: str = InputField(STRING, description="LoRA file in a loras/ folder of the model folders")
        strength_model: float = _strength("how strongly the LoRA changes the U-Net (0 = not at all)")
        strength_clip: float = _strength("how strongly the LoRA changes the text encoder (0 = not at all)")

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with the LoRA")
        text_encoder: Any = OutputField(TEXT_ENCODER, description="the text encoder with the LoRA")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        model, text_encoder = apply_lora(ctx, inputs.lora_name, inputs.model, inputs.text_encoder,
                                         inputs.strength_model, inputs.strength_clip)
        return self.Outputs(model=model, text_encoder=text_encoder)


class LoraLoaderModelOnly(_LoraNode):
    """Apply a LoRA to the diffusion model only (ComfyUI's LoraLoaderModelOnly); its text-encoder
    keys are left aside."""

    type_name = "LoraLoaderModelOnly"
    with_text = False
    category = "loaders"

    class Inputs(NodeInputs):
        model: Any = InputField(MODEL, description="the diffusion model to patch")
        lora_name: str = InputField(STRING, description="LoRA file in a loras/ folder of the model folders")
        strength_model: float = _strength("how strongly the LoRA changes the U-Net (0 = not at all)")

    class Outputs(NodeOutputs):
        model: Any = OutputField(MODEL, description="the model with the LoRA")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        model, _ = apply_lora(ctx, inputs.lora_name, inputs.model, None, inputs.strength_model, 0.0)
        return self.Outputs(model=model)


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register the LoRA nodes."""
    return [LoraLoader, LoraLoaderModelOnly]
