"""The node contract: a node type is declared once, as a class.

A node is a subclass of :class:`Node` with a type name, a semantic version, a category, a
description (the docstring by default) and two nested pydantic models, ``Inputs`` and ``Outputs``,
whose fields are declared with :func:`InputField` / :func:`OutputField`. Validation, the
``ldmgraph nodes`` listing and the JSON Schema all come from that one declaration::

    class ImageInvert(Node):
        \"\"\"Invert the colours of an image (1 - x).\"\"\"
        type_name = "ImageInvert"
        category = "image"

        class Inputs(NodeInputs):
            image: np.ndarray = InputField(IMAGE, description="image to invert")

        class Outputs(NodeOutputs):
            image: np.ndarray = OutputField(IMAGE)

        def run(self, inputs: Inputs, ctx: NodeContext) -> Outputs:
            return self.Outputs(image=1.0 - inputs.image)

``run`` must be a pure function of its inputs unless ``deterministic = False``; it never mutates an
input value. One instance of a node class serves every run of an executor, so keep no per-run state
on ``self`` (shared, expensive things go through ``ctx.resource``).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from . import codes
from .sockets import ENUM, InvalidTextError, Socket

if TYPE_CHECKING:
    from .context import Environment, NodeContext
    from .estimate import Estimate
    from .registry import Registry

_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+].*)?$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*$")


class NodeInputs(BaseModel):
    """Base of every node's ``Inputs`` model (arbitrary value types allowed, unknown keys refused)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())


class NodeOutputs(BaseModel):
    """Base of every node's ``Outputs`` model."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class _SocketMarker:
    """Carried in a pydantic field's metadata: the socket and the constraints pydantic can't express."""

    socket: type[Socket]
    ge: float | None = None
    le: float | None = None
    multiple_of: float | None = None
    choices: tuple[str, ...] | None = None
    choices_from: str | None = None
    is_output: bool = False


def InputField(  # noqa: N802 - reads like pydantic's Field
    socket: type[Socket],
    default: Any = ...,
    *,
    ge: float | None = None,
    le: float | None = None,
    multiple_of: float | None = None,
    choices: list[str] | tuple[str, ...] | None = None,
    choices_from: str | None = None,
    description: str = "",
) -> Any:
    """Declare a node input: its socket type, default (``...`` = required), bounds, choices, help.

    ``choices_from`` names a registry table (``"samplers"``, ``"schedules"``, ``"conditioners"``, or
    ``"nodes"``) whose keys are the allowed values at listing/validation time. A link-only socket
    (IMAGE, MODEL, ...) with ``default=None`` is an optional input.
    """
    if (choices is not None or choices_from is not None) and not issubclass(socket, ENUM):
        raise TypeError("choices / choices_from need the ENUM socket")
    extra: dict[str, Any] = {"socket": socket.name}
    if choices is not None:
        extra["enum"] = list(choices)
    if choices_from is not None:
        extra["choices_from"] = choices_from
    info = Field(default, description=description or None, json_schema_extra=extra)
    info.metadata.append(
        _SocketMarker(
            socket,
            ge=ge,
            le=le,
            multiple_of=multiple_of,
            choices=tuple(choices) if choices is not None else None,
            choices_from=choices_from,
        )
    )
    return info


def OutputField(socket: type[Socket], *, description: str = "") -> Any:  # noqa: N802
    """Declare a node output: its socket type and help text."""
    info = Field(..., description=description or None, json_schema_extra={"socket": socket.name})
    info.metadata.append(_SocketMarker(socket, is_output=True))
    return info


@dataclass(frozen=True)
class InputSpec:
    """Everything known about one input, read from the ``Inputs`` model once per node class."""

    name: str
    socket: type[Socket]
    required: bool
    default: Any
    description: str
    ge: float | None = None
    le: float | None = None
    multiple_of: float | None = None
    choices: tuple[str, ...] | None = None
    choices_from: str | None = None

    def allowed_choices(self, registry: Registry | None) -> list[str] | None:
        """The allowed values of an enumeration input (from the registry when ``choices_from``)."""
        if self.choices is not None:
            return list(self.choices)
        if self.choices_from is not None:
            return registry.choices(self.choices_from) if registry is not None else None
        return None

    def check_literal(self, value: Any, registry: Registry | None) -> tuple[Any, str | None, str]:
        """Validate a literal for this input: ``(canonical value, problem code or None, message)``."""
        if not self.socket.literal:
            if value is None and not self.required:
                return None, None, ""
            return value, codes.LINK_REQUIRED, (
                f"{self.socket.name} input {self.name!r} takes a link to another node's output, "
                f'like {{"node": "<id>", "output": "<name>"}}, not a literal'
            )
        if value is None and not self.required and self.default is None:
            return None, None, ""
        try:
            value = self.socket.coerce(value)
        except InvalidTextError as exc:
            return value, codes.INVALID_TEXT, f"{exc}; fix or remove that character"
        except TypeError as exc:
            return value, codes.WRONG_TYPE, f"{exc}; give a {self.socket.name} literal"
        choices = self.allowed_choices(registry)
        if choices is not None and value not in choices:
            return value, codes.NOT_IN_CHOICES, _choices_message(value, choices)
        return value, *self._check_bounds(value)

    def _check_bounds(self, value: Any) -> tuple[str | None, str]:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None, ""
        low, high = getattr(self.socket, "min_value", None), getattr(self.socket, "max_value", None)
        if low is not None and high is not None and not low <= value <= high:
            return codes.OUT_OF_BOUNDS, f"{_short_number(value)} is outside the {self.socket.name} range {low}..{high}"
        if self.ge is not None and value < self.ge:
            return codes.OUT_OF_BOUNDS, f"{_short_number(value)} is below the minimum {self.ge}; use a value >= {self.ge}"
        if self.le is not None and value > self.le:
            return codes.OUT_OF_BOUNDS, f"{_short_number(value)} is above the maximum {self.le}; use a value <= {self.le}"
        if self.multiple_of:
            ratio = value / self.multiple_of
            if not math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9):
                return codes.OUT_OF_BOUNDS, f"{_short_number(value)} is not a multiple of {self.multiple_of}"
        return None, ""

    def describe(self, registry: Registry | None) -> dict[str, Any]:
        """JSON-ready description for ``ldmgraph nodes --json``."""
        out: dict[str, Any] = {"type": self.socket.name, "required": self.required}
        if not self.required:
            out["default"] = self.default
        for key in ("ge", "le", "multiple_of", "choices_from"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        choices = self.allowed_choices(registry)
        if choices is not None:
            out["choices"] = choices
        out["description"] = self.description
        return out


@dataclass(frozen=True)
class OutputSpec:
    """One output of a node type."""

    name: str
    socket: type[Socket]
    description: str


@dataclass(frozen=True)
class NodeSpec:
    """A node type's declaration in data form: what validation and listings read."""

    type_name: str
    version: str
    category: str
    description: str
    deterministic: bool
    output_node: bool
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    outputs: dict[str, OutputSpec] = field(default_factory=dict)

    def describe(self, registry: Registry | None) -> dict[str, Any]:
        """JSON-ready description (the equivalent of ComfyUI's /object_info entry)."""
        return {
            "type": self.type_name,
            "version": self.version,
            "category": self.category,
            "description": self.description,
            "deterministic": self.deterministic,
            "output_node": self.output_node,
            "inputs": {name: spec.describe(registry) for name, spec in self.inputs.items()},
            "outputs": {
                name: {"type": spec.socket.name, "description": spec.description}
                for name, spec in self.outputs.items()
            },
        }


class Node:
    """Base class of every node type; see the module docstring for an example."""

    type_name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0.0"
    category: ClassVar[str] = "misc"
    description: ClassVar[str] = ""
    deterministic: ClassVar[bool] = True
    output_node: ClassVar[bool] = False
    estimate_rule: ClassVar[str | None] = None
    """How a node that does not override :meth:`estimate` declares its memory (every node declares
    one or the other; a test walks the catalogue): ``"small"`` (nothing worth counting: scalars,
    sigmas, guiders, conditioning entries, file names), ``"same:<input>"`` (each output is the size
    of that linked input, e.g. a threshold of an image: the shape flows on), ``"writes:<input>"``
    (an output node writing that image input to disk: counted against the disk budget), or
    ``"expanded"`` (a workflow component, replaced by its nodes before estimates are made)."""
    Inputs: ClassVar[type[NodeInputs]] = NodeInputs
    Outputs: ClassVar[type[NodeOutputs]] = NodeOutputs
    spec: ClassVar[NodeSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("type_name"):
            cls.spec = _build_spec(cls)

    def run(self, inputs: Any, ctx: NodeContext) -> NodeOutputs | None:
        """Compute the outputs from the inputs. Output nodes with no outputs may return None."""
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    @classmethod
    def check_inputs(cls, literals: dict[str, Any], env: Environment) -> list[tuple[str | None, str, str]]:
        """Extra validation before anything runs, e.g. that a named file exists.

        Returns ``(input name or None, problem code, message)`` triples. ``literals`` holds the
        literal inputs and the linked scalar inputs whose values validation knows (from constant
        nodes); a linked input whose value only the run knows is absent at validation, and this is
        called again with it just before the node runs, so look inputs up with ``.get``.
        """
        return []

    @classmethod
    def is_deterministic(cls, literals: dict[str, Any]) -> bool:
        """Whether this node instance is a pure function of its inputs (default: ``deterministic``).

        Override when it depends on an input, e.g. a seed node in "random" mode.
        """
        return cls.deterministic

    @classmethod
    def constant_outputs(cls, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The outputs, when they are known from the inputs before running (None = not known).

        Constant nodes (String, Int, ...) return their value, so that validation checks what
        they feed (a file name, a bound) as it checks a literal.
        """
        return None

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], env: Environment) -> str | None:
        """Extra cache-key material beyond the inputs, e.g. a file's size and mtime (None = none)."""
        return None

    @classmethod
    def estimate(cls, inputs: dict[str, Any], env: Environment) -> Estimate | None:
        """What running this node will allocate, known before it runs (None: nothing worth counting).

        ``inputs`` holds the literals and, for each linked input, what the upstream node's estimate
        said about that output (a :class:`~ldmgraph.graph.estimate.Shape`, a model summary, ...;
        None when unknown). Validation sums the figures and refuses a workflow over its budget.
        The default follows :attr:`estimate_rule`.
        """
        from .estimate import Estimate, Shape, png_bytes

        rule = cls.estimate_rule or ""
        kind, _, name = rule.partition(":")
        shape = inputs.get(name) if name else None
        if not isinstance(shape, Shape):
            return None
        if kind == "same":
            outs = {out: shape for out in cls.spec.outputs}
            return Estimate(keeps=shape.nbytes * len(outs), works=shape.nbytes, outputs=outs,
                            what=f"{len(outs)} output(s) the size of {name}")
        if kind == "writes":
            return Estimate(works=shape.nbytes, writes=png_bytes(shape, env), files=shape.batch,
                            what=f"{shape.batch} PNG(s) of {shape.width}x{shape.height}")
        return None


def _build_spec(cls: type[Node]) -> NodeSpec:
    """Read the class declaration into a :class:`NodeSpec`, refusing malformed declarations early."""
    where = f"node class {cls.__module__}.{cls.__qualname__}"
    if not _NAME.match(cls.type_name):
        raise TypeError(f"{where}: type_name {cls.type_name!r} must be an identifier-like name")
    if not _SEMVER.match(cls.version):
        raise TypeError(f"{where}: version {cls.version!r} is not semantic (MAJOR.MINOR.PATCH)")
    if not (isinstance(cls.Inputs, type) and issubclass(cls.Inputs, NodeInputs)):
        raise TypeError(f"{where}: Inputs must subclass NodeInputs")
    if not (isinstance(cls.Outputs, type) and issubclass(cls.Outputs, NodeOutputs)):
        raise TypeError(f"{where}: Outputs must subclass NodeOutputs")
    inputs: dict[str, InputSpec] = {}
    for name, info in cls.Inputs.model_fields.items():
        marker = _marker(info.metadata, f"{where}: input {name!r}")
        required = info.default is PydanticUndefined and info.default_factory is None
        inputs[name] = InputSpec(
            name=name,
            socket=marker.socket,
            required=required,
            default=None if required else info.get_default(call_default_factory=True),
            description=info.description or "",
            ge=marker.ge,
            le=marker.le,
            multiple_of=marker.multiple_of,
            choices=marker.choices,
            choices_from=marker.choices_from,
        )
    outputs: dict[str, OutputSpec] = {}
    for name, info in cls.Outputs.model_fields.items():
        marker = _marker(info.metadata, f"{where}: output {name!r}")
        outputs[name] = OutputSpec(name, marker.socket, info.description or "")
    doc = cls.__dict__.get("description") or inspect.getdoc(cls) or ""
    return NodeSpec(
        type_name=cls.type_name,
        version=cls.version,
        category=cls.category,
        description=doc,
        deterministic=cls.deterministic,
        output_node=cls.output_node,
        inputs=inputs,
        outputs=outputs,
    )


def _marker(metadata: list[Any], where: str) -> _SocketMarker:
    for item in metadata:
        if isinstance(item, _SocketMarker):
            return item
    raise TypeError(f"{where} must be declared with InputField(...) / OutputField(...)")


def _short_number(value: float) -> str:
    """A number for a message; never ``str`` of a huge int (Python refuses past 4,300 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{'-' if value < 0 else ''}an integer of about {int(value.bit_length() * 0.30103):,} digits"
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def _choices_message(value: Any, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(value), choices, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(map(repr, choices[:20])) + (" ..." if len(choices) > 20 else "")
    return f"{value!r} is not one of the choices ({shown}){hint}"
