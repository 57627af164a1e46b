"""Example ldmgraph plugin: nodes declared with the public node contract, registered by a hook."""

from __future__ import annotations

from typing import Any

import numpy as np

from ldmgraph.graph import InputField, Node, NodeContext, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.estimate import Estimate, Shape
from ldmgraph.graph.sockets import FLOAT, IMAGE, INT
from ldmgraph.plugins import hookimpl

# ITU-R BT.709 luma coefficients (Rec. 709, item 3.2).
LUMA_709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


class ExampleCheckerboard(Node):
    """A checkerboard test image of two grey levels."""

    type_name = "ExampleCheckerboard"
    category = "example"

    class Inputs(NodeInputs):
        width: int = InputField(INT, 64, ge=1, le=4096, description="width in pixels")
        height: int = InputField(INT, 64, ge=1, le=4096, description="height in pixels")
        tile: int = InputField(INT, 8, ge=1, le=1024, description="square size in pixels")
        dark: float = InputField(FLOAT, 0.0, ge=0.0, le=1.0, description="grey level of the dark squares")
        light: float = InputField(FLOAT, 1.0, ge=0.0, le=1.0, description="grey level of the light squares")

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE, description="[1, H, W, 3] checkerboard")

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Any) -> Estimate:
        """What the budget counts: the [1, H, W, 3] float32 board, and the index grids made on the way."""
        shape = Shape(1, 3, inputs["height"], inputs["width"])
        return Estimate(keeps=shape.nbytes, works=4 * shape.nbytes, outputs={"image": shape},
                        what=f"a {inputs['width']}x{inputs['height']} board")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        y, x = np.mgrid[0 : inputs.height, 0 : inputs.width]
        light = ((y // inputs.tile + x // inputs.tile) % 2).astype(bool)
        plane = np.where(light, inputs.light, inputs.dark).astype(np.float32)
        return self.Outputs(image=np.repeat(plane[None, :, :, None], 3, axis=3))


class ExampleGrayscale(Node):
    """Convert RGB images to grey with the Rec. 709 luma weights (kept as 3 channels)."""

    type_name = "ExampleGrayscale"
    estimate_rule = "same:image"  # memory: one output the size of its input (ldmgraph's budget reads it)
    category = "example"

    class Inputs(NodeInputs):
        image: np.ndarray = InputField(IMAGE, description="RGB images")

    class Outputs(NodeOutputs):
        image: np.ndarray = OutputField(IMAGE, description="grey images, 3 equal channels")

    def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
        luma = inputs.image[..., :3] @ LUMA_709
        return self.Outputs(image=np.repeat(luma[..., None], 3, axis=3).astype(np.float32))


@hookimpl
def ldmgraph_nodes() -> list[type[Node]]:
    """Register this plugin's nodes."""
    return [ExampleCheckerboard, ExampleGrayscale]
