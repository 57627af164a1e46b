"""The conditioner contract: every way of conditioning the U-Net, as a plugin.

The paper's domain-specific encoder tau_theta (Rombach et al. 2022, Sec. 3.3) reaches the
denoiser by one of four routes, and a CONDITIONING value is a list of :class:`CondEntry`, each
carrying its contributions by route:

- ``crossattn``: a context sequence ``[B, T, D]`` for the attention layers (text encoders, class
  embedders, layouts); a second contribution appends its tokens;
- ``concat``: channels ``[B, C, h, w]`` stacked onto z_t (super-resolution, inpainting, semantic
  maps); a second contribution appends its channels;
- ``vector``: ``[B, D]`` (or class indices ``[B]``) added to the time embedding, the U-Net's ``y``
  (class labels, ``adm``); contributions add up;
- ``control``: objects computing residuals for the U-Net's skips and middle block at each step from
  the current latent and sigma (ControlNet, adapters); contributions stack.

A conditioner is declared like a node: a class with ``type_name``, typed ``Inputs`` (and extra
``Outputs`` if it has any), a ``route`` and ``contribute(inputs, ctx)`` returning the route's value
(or a :class:`Contribution` with extra outputs or a separate negative value). Its ``sides`` say
which CONDITIONING sockets the node gets: ``"new"`` (none: the node makes one entry, as a text
encoder does), ``"one"`` (``conditioning`` in and out) or ``"both"`` (``positive`` and
``negative`` in and out). Registering it through the ``ldmgraph_conditioners`` hook makes its node
(:func:`conditioner_node`) appear in ``ldmgraph nodes``, in validation and in the JSON Schema.
The denoiser applies entries by route, never by conditioner name. This module is torch-free.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import create_model

from ldmgraph.graph.node import InputField, Node, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.sockets import CONDITIONING

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from ldmgraph.graph.context import NodeContext

ROUTES = ("crossattn", "concat", "vector", "control")
SIDES = ("new", "one", "both")


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One conditioning entry of a CONDITIONING list: its contributions by route, and where and
    when it applies.

    Routes: `context` (crossattn, `[B, T, D]`, B may be 1 and is then broadcast), `concat`
    (`[B, C, h, w]` stacked onto the latent), `vector` (the U-Net's `y`), `control` (a tuple of
    per-step residual sources, see `ldmgraph.diffusion.values.Control`). `pooled` is the text
    encoder's pooled vector, kept as data (it reaches the model only through the vector route).
    `strength` weighs this entry against the others; `area` = (h, w, y, x) in latent pixels
    restricts it to a rectangle; `mask` (`[h, w]` or `[B, 1, h, w]`, 0..1) restricts it softly;
    `start_percent` / `end_percent` restrict it to that part of the schedule (0 = first step).
    """

    context: Tensor | None = None
    pooled: Tensor | None = None
    concat: Tensor | None = None
    strength: float = 1.0
    area: tuple[int, int, int, int] | None = None
    mask: Tensor | None = None
    vector: Tensor | None = None
    control: tuple[Any, ...] = ()
    start_percent: float = 0.0
    end_percent: float = 1.0


ROUTE_FIELD = {"crossattn": "context", "concat": "concat", "vector": "vector", "control": "control"}


def add_contribution(entry: CondEntry, route: str, value: Any) -> CondEntry:
    """A new entry with `value` added on `route` (see the module docstring for how each combines)."""
    if route not in ROUTES:
        raise ValueError(f"unknown conditioning route {route!r}; expected one of {', '.join(ROUTES)}")
    if value is None:
        return entry
    if route == "control":
        return replace(entry, control=(*entry.control, value))
    current = getattr(entry, ROUTE_FIELD[route])
    if current is None:
        return replace(entry, **{ROUTE_FIELD[route]: value})
    import torch

    if route == "vector":
        return replace(entry, vector=current + value)
    dim = 1  # tokens for crossattn, channels for concat
    if current.shape[0] != value.shape[0] and 1 in (current.shape[0], value.shape[0]):
        batch = max(current.shape[0], value.shape[0])
        current, value = current.expand(batch, *current.shape[1:]), value.expand(batch, *value.shape[1:])
    return replace(entry, **{ROUTE_FIELD[route]: torch.cat([current, value.to(current.dtype)], dim=dim)})


_SAME = object()


@dataclass(frozen=True)
class Contribution:
    """What `contribute` may return instead of a bare value: the value, a different value for the
    negative side (`sides = "both"`), the node's extra outputs by name, and a text encoder's pooled
    vector (kept on the entries; U-Nets whose `y` is a pooled text vector take it as their vector
    route)."""

    value: Any
    negative: Any = _SAME
    outputs: dict[str, Any] = field(default_factory=dict)
    pooled: Any = None


class Conditioner:
    """Base of every conditioner (see the module docstring)."""

    type_name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0.0"
    category: ClassVar[str] = "conditioning"
    description: ClassVar[str] = ""
    route: ClassVar[str] = ""
    sides: ClassVar[str] = "one"
    sides_optional: ClassVar[bool] = False  # "both": an unconnected side gets one empty entry
    deterministic: ClassVar[bool] = True
    Inputs: ClassVar[type[NodeInputs]] = NodeInputs
    Outputs: ClassVar[type[NodeOutputs]] = NodeOutputs

    def contribute(self, inputs: Any, ctx: NodeContext) -> Any:
        """The route's value for these inputs (or a :class:`Contribution`)."""
        raise NotImplementedError(f"{type(self).__name__}.contribute is not implemented")


def _side_fields(cls: type[Conditioner]) -> dict[str, Any]:
    if cls.sides == "one":
        return {"conditioning": (Any, InputField(CONDITIONING, description="conditioning to add to"))}
    if cls.sides == "both":
        default = None if cls.sides_optional else ...
        optional = " (optional)" if cls.sides_optional else ""
        return {
            "positive": (Any, InputField(CONDITIONING, default, description=f"positive conditioning{optional}")),
            "negative": (Any, InputField(CONDITIONING, default, description=f"negative conditioning{optional}")),
        }
    return {}


def _side_outputs(cls: type[Conditioner]) -> dict[str, Any]:
    what = f"with the {cls.route} contribution"
    if cls.sides == "both":
        return {
            "positive": (Any, OutputField(CONDITIONING, description=f"positive conditioning {what}")),
            "negative": (Any, OutputField(CONDITIONING, description=f"negative conditioning {what}")),
        }
    return {"conditioning": (Any, OutputField(CONDITIONING, description=f"conditioning {what}"))}


def _copy_fields(model: type[Any]) -> dict[str, Any]:
    return {name: (info.annotation, info) for name, info in model.model_fields.items()}


def conditioner_node(cls: type[Conditioner]) -> type[Node]:
    """The node of a conditioner: its inputs plus the CONDITIONING sockets its `sides` ask for,
    the conditioned CONDITIONING plus its extra outputs; `run` merges the contribution by route."""
    where = f"conditioner {cls.__module__}.{cls.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, Conditioner)) or not cls.type_name:
        raise TypeError(f"{cls!r} is not a Conditioner subclass with a type_name")
    if cls.route not in ROUTES:
        raise TypeError(f"{where}: route {cls.route!r} is not one of {', '.join(ROUTES)}")
    if cls.sides not in SIDES:
        raise TypeError(f"{where}: sides {cls.sides!r} is not one of {', '.join(SIDES)}")
    inputs = create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Inputs", __base__=NodeInputs, **_side_fields(cls), **_copy_fields(cls.Inputs)
    )
    outputs = create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Outputs", __base__=NodeOutputs, **_side_outputs(cls), **_copy_fields(cls.Outputs)
    )
    conditioner = cls()

    def run(self: Node, values: Any, ctx: NodeContext) -> NodeOutputs:
        result = conditioner.contribute(values, ctx)
        made = result if isinstance(result, Contribution) else Contribution(result)
        negative = made.value if made.negative is _SAME else made.negative
        if cls.sides == "new":
            sides = {"conditioning": [add_contribution(CondEntry(pooled=made.pooled), cls.route, made.value)]}
        elif cls.sides == "one":
            sides = {"conditioning": [add_contribution(e, cls.route, made.value) for e in values.conditioning]}
        else:
            sides = {
                name: [add_contribution(e, cls.route, value) for e in (getattr(values, name) or [CondEntry()])]
                for name, value in (("positive", made.value), ("negative", negative))
            }
        return outputs(**sides, **made.outputs)  # type: ignore[no-any-return]

    attrs: dict[str, Any] = {
        "type_name": cls.type_name,
        "version": cls.version,
        "category": cls.category,
        "description": cls.__dict__.get("description") or inspect.getdoc(cls) or "",
        "deterministic": cls.deterministic,
        "Inputs": inputs,
        "Outputs": outputs,
        "run": run,
        "conditioner": cls,
        "route": cls.route,
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
    }
    for hook in ("check_inputs", "fingerprint", "is_deterministic", "estimate", "constant_outputs"):
        if hook in cls.__dict__:
            attrs[hook] = cls.__dict__[hook]
    if getattr(cls, "estimate_rule", None):  # how its memory is declared (see Node.estimate_rule)
        attrs["estimate_rule"] = cls.estimate_rule
    return type(cls.__name__, (Node,), attrs)
