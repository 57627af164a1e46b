"""ControlNet: the loader, the two apply conditioners (the `control` route) and hint preprocessors.

A ControlNet (Zhang et al. 2023) adds residuals, computed at every step from the current latent,
the timestep and a hint image, to the U-Net's skip connections (`ldmgraph.models.controlnet`).
`ControlNetApply` adds one to a conditioning, `ControlNetApplyAdvanced` to both sides with a part
of the schedule; applied again, ControlNets stack (their residuals add up). The hint is resized to
the latent's pixel size when the sampler runs. Names and inputs are ComfyUI's, so imported graphs
map one to one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmgraph.conditioners import Conditioner, Contribution
from ldmgraph.graph import Node, NodeContext, NodeInputs, NodeOutputs
from ldmgraph.graph.context import Environment
from ldmgraph.graph.files import safe_join
from ldmgraph.graph.node import InputField, OutputField
from ldmgraph.graph.sockets import BOOLEAN, CONTROL_NET, FLOAT, IMAGE, STRING
from ldmgraph.nodes.common import NodeInputError, available_models, load_device, model_cache
from ldmgraph.plugins import hookimpl

BUNDLED_CONTROLNET = "ldmgraph-shapes-controlnet.safetensors"


def find_controlnet(name: str, model_dirs: Any) -> Path:
    """A ControlNet file (`.safetensors` may be left out) or diffusers folder (with config.json)
    inside the model folders; `..` and absolute names are refused."""
    for folder in model_dirs:
        for candidate in (name, f"{name}.safetensors"):
            path = safe_join(folder, candidate)
            if path.is_file() or (path / "config.json").is_file():
                return path
    found = ", ".join(available_models(model_dirs)) or "none"
    raise FileNotFoundError(f"ControlNet {name!r} is not in the model folders (found: {found})")


class ControlNetLoader(Node):
    """Load a ControlNet: a file in the original layout (`control_model.*`) or a diffusers
    `ControlNetModel` folder; its architecture is detected from the weights."""

    type_name = "ControlNetLoader"
    category = "loaders"

    class Inputs(NodeInputs):
        control_net_name: str = InputField(
            STRING, BUNDLED_CONTROLNET, description="ControlNet file or diffusers folder in the model folders"
        )

    class Outputs(NodeOutputs):
        control_net: Any = OutputField(CONTROL_NET, description="the ControlNet")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str, str, str]]:
        from ldmgraph.graph import codes
        from ldmgraph.graph.errors import UnsafePathError

        name = literals.get("control_net_name")
        if not isinstance(name, str):
            return []
        try:
            find_controlnet(name, env.model_dirs)
        except UnsafePathError as error:
            return [("control_net_name", codes.UNSAFE_PATH, f"{error}: name a file inside the model folders")]
        except FileNotFoundError as error:
            return [("control_net_name", codes.FILE_NOT_FOUND, str(error))]
        return []

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        try:
            path = find_controlnet(str(literals.get("control_net_name")), env.model_dirs)
        except (OSError, ValueError):
            return None
        stat = (path / "config.json" if path.is_dir() else path).stat()
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Any:
        """The weights kept: the file's size (a diffusers folder: its weight files)."""
        from ldmgraph.graph.estimate import Estimate

        try:
            path = find_controlnet(str(inputs.get("control_net_name")), env.model_dirs)
            files = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")] if path.is_dir() else [path]
            size = sum(p.stat().st_size for p in files)
        except (OSError, ValueError):
            return None
        return Estimate(keeps=size, what="the ControlNet's weights")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.controlnet import load_controlnet

        path = find_controlnet(inputs.control_net_name, ctx.model_dirs)
        stat = (path / "config.json" if path.is_dir() else path).stat()
        device = load_device(ctx)
        key = ("controlnet", str(path), stat.st_size, stat.st_mtime_ns, device)
        handle = model_cache(ctx).get_or_load(key, lambda: load_controlnet(path, device))
        return self.Outputs(control_net=handle)


def hint_tensor(image: Any, control_net: Any, node: str) -> Any:
    """IMAGE [B, H, W, C] -> hint [B, C, H, W], refusing a channel count the ControlNet cannot take."""
    from ldmgraph.nodes.common import image_to_torch

    want = int(control_net.control_model.hint_in)
    if image.ndim != 4 or image.shape[-1] != want:
        raise NodeInputError(
            f"{node}: the hint image has shape {tuple(image.shape)} ({image.shape[-1]} channels) but ControlNet "
            f"{control_net.name!r} takes {want}-channel images [B, H, W, {want}]; convert it (e.g. Canny gives 3)"
        )
    if min(image.shape[1:3]) < control_net.control_model.downscale:
        raise NodeInputError(f"{node}: the hint image {image.shape[2]}x{image.shape[1]} is smaller than one latent pixel")
    return image_to_torch(image).permute(0, 3, 1, 2).contiguous()


def applied_control(inputs: Any, node: str, start: float = 0.0, end: float = 1.0) -> Any:
    """The ControlNet with its checked hint for the sampler, or None when its strength is 0. One
    object serves both sides, so cond and uncond share one batched network call."""
    from ldmgraph.models.controlnet import ControlNetApplied

    hint = hint_tensor(inputs.image, inputs.control_net, node)
    return None if inputs.strength == 0 else ControlNetApplied(inputs.control_net, hint, inputs.strength, start, end)


class ControlNetApply(Conditioner):
    """Add a ControlNet with its hint image to a conditioning (the control route)."""

    type_name = "ControlNetApply"

    estimate_rule = "small"
    route = "control"
    sides = "one"

    class Inputs(NodeInputs):
        control_net: Any = InputField(CONTROL_NET, description="the ControlNet")
        image: Any = InputField(IMAGE, description="the hint (control) image, resized to the latent's pixel size")
        strength: float = InputField(FLOAT, 1.0, ge=0.0, le=10.0, description="weight of its residuals")

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        return applied_control(inputs, self.type_name)


class ControlNetApplyAdvanced(Conditioner):
    """Add a ControlNet to the positive and negative conditioning, for a part of the schedule."""

    type_name = "ControlNetApplyAdvanced"

    estimate_rule = "small"
    route = "control"
    sides = "both"

    class Inputs(NodeInputs):
        control_net: Any = InputField(CONTROL_NET, description="the ControlNet")
        image: Any = InputField(IMAGE, description="the hint (control) image, resized to the latent's pixel size")
        strength: float = InputField(FLOAT, 1.0, ge=0.0, le=10.0, description="weight of its residuals")
        start_percent: float = InputField(FLOAT, 0.0, ge=0.0, le=1.0, description="part of the schedule where it starts")
        end_percent: float = InputField(FLOAT, 1.0, ge=0.0, le=1.0, description="part of the schedule where it ends")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        from ldmgraph.graph import codes

        start, end = literals.get("start_percent", 0.0), literals.get("end_percent", 1.0)
        if isinstance(start, int | float) and isinstance(end, int | float) and start > end:
            return [("end_percent", codes.OUT_OF_BOUNDS, f"end_percent {end} is before start_percent {start}")]
        return []

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        return Contribution(applied_control(inputs, self.type_name, inputs.start_percent, inputs.end_percent))


class Canny(Node):
    """Canny edges of an image (white on black), the usual ControlNet hint; thresholds on the
    gradient magnitude of the 0..1 grey image, as ComfyUI's Canny node (kornia)."""

    type_name = "Canny"

    estimate_rule = "same:image"
    category = "image/preprocessors"

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="the image")
        low_threshold: float = InputField(FLOAT, 0.4, ge=0.01, le=0.99, description="weak-edge threshold")
        high_threshold: float = InputField(FLOAT, 0.8, ge=0.01, le=0.99, description="strong-edge threshold")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="edge map, three equal channels")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.hints import canny_edges

        if inputs.low_threshold > inputs.high_threshold:
            raise NodeInputError(
                f"Canny: low_threshold {inputs.low_threshold} is above high_threshold {inputs.high_threshold}"
            )
        return self.Outputs(image=canny_edges(inputs.image, inputs.low_threshold, inputs.high_threshold))


class LineArtThreshold(Node):
    """Binarise a scribble or line drawing into a ControlNet hint: luminance above `threshold`
    becomes white (with `invert`, dark lines on white paper become white lines on black)."""

    type_name = "LineArtThreshold"

    estimate_rule = "same:image"
    category = "image/preprocessors"

    class Inputs(NodeInputs):
        image: Any = InputField(IMAGE, description="the drawing")
        threshold: float = InputField(FLOAT, 0.5, ge=0.0, le=1.0, description="luminance threshold")
        invert: bool = InputField(BOOLEAN, False, description="take dark strokes on light paper as the lines")

    class Outputs(NodeOutputs):
        image: Any = OutputField(IMAGE, description="white lines on black, three channels")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        from ldmgraph.models.hints import threshold_lines

        return self.Outputs(image=threshold_lines(inputs.image, inputs.threshold, inputs.invert))


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """The ControlNet loader and the hint preprocessors."""
    return [ControlNetLoader, Canny, LineArtThreshold]


@hookimpl
def ldmgraph_conditioners() -> list[type[Conditioner]]:
    """The control-route conditioners."""
    return [ControlNetApply, ControlNetApplyAdvanced]
