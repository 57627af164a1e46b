"""Socket types: what flows on an edge. One class per type.

An edge is legal when the output's socket class is the input's socket class or a subclass of it
(a declared subtype). Scalar sockets (INT, FLOAT, STRING, BOOLEAN, ENUM) may also be given as
literals in a workflow file; the others (IMAGE, LATENT, MODEL, ...) only arrive through links.
Plugins may declare new socket types by subclassing :class:`Socket`.

Values (see docs/INTERFACES.md): IMAGE is a numpy float32 ``[B, H, W, C]`` array in 0..1, MASK a
numpy float32 ``[B, H, W]``; LATENT, CONDITIONING, MODEL, VAE and TEXT_ENCODER are objects from the
diffusion and model layers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class InvalidTextError(TypeError):
    """A text literal that is not valid Unicode (a lone surrogate): no file or terminal takes it."""


class Socket:
    """Base of every socket type. ``name`` is what workflow tools and ``ldmgraph nodes`` show."""

    name: ClassVar[str] = "ANY"
    literal: ClassVar[bool] = False  # may a workflow give this input as a JSON literal?
    json_type: ClassVar[str | None] = None  # JSON Schema "type" of a literal

    @classmethod
    def accepts(cls, source: type[Socket]) -> bool:
        """True when an output of socket ``source`` may feed an input of this socket."""
        return issubclass(source, cls)

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """Check a literal and return its canonical form; raise ``TypeError`` with a readable reason."""
        raise TypeError(f"{cls.name} values come from a link to another node's output, not a literal")


class IMAGE(Socket):
    """Images: numpy float32 [B, H, W, C] in 0..1."""

    name = "IMAGE"


class MASK(Socket):
    """Masks: numpy float32 [B, H, W] in 0..1, 1 = repaint."""

    name = "MASK"


class LATENT(Socket):
    """Latents: ``ldmgraph.diffusion.Latent`` (samples [B, C, h, w], optional noise mask)."""

    name = "LATENT"


class CONDITIONING(Socket):
    """Conditioning: a list of ``ldmgraph.diffusion.CondEntry``."""

    name = "CONDITIONING"


class MODEL(Socket):
    """A loaded diffusion U-Net handle (shared, never copied)."""

    name = "MODEL"


class VAE(Socket):
    """A loaded autoencoder handle (shared, never copied)."""

    name = "VAE"


class CONTROL_NET(Socket):
    """A loaded ControlNet handle (shared, never copied): ``ldmgraph.models.controlnet.ControlNetHandle``."""

    name = "CONTROL_NET"


class TEXT_ENCODER(Socket):
    """A loaded text encoder handle (shared, never copied)."""

    name = "TEXT_ENCODER"


class SIGMAS(Socket):
    """Noise levels to sample over: a 1-D float32 tensor, decreasing (a schedule, split or joined)."""

    name = "SIGMAS"


class SAMPLER(Socket):
    """A sampler with its options: ``ldmgraph.diffusion.sampling.SamplerChoice``."""

    name = "SAMPLER"


class GUIDER(Socket):
    """A model with its conditionings and guidance: ``ldmgraph.diffusion.sampling.Guider``."""

    name = "GUIDER"


class NOISE(Socket):
    """A noise source (seed, on/off, convention): ``ldmgraph.diffusion.noise.Noise``."""

    name = "NOISE"


class INT(Socket):
    """Python int (never bool), within the 64-bit range (signed minimum, unsigned maximum, as
    seeds need); a node may narrow it with ``ge`` / ``le``."""

    name = "INT"
    literal = True
    json_type = "integer"
    min_value: ClassVar[int] = -(2**63)
    max_value: ClassVar[int] = 2**64 - 1

    @classmethod
    def coerce(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                return int(value)
            raise TypeError(f"expected an integer, got {_describe(value)}")
        return value


class FLOAT(Socket):
    """Python float (ints are accepted and converted); must be finite."""

    name = "FLOAT"
    literal = True
    json_type = "number"

    @classmethod
    def coerce(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {_describe(value)}")
        try:
            result = float(value)
        except OverflowError as exc:
            raise TypeError(f"{_describe(value)} is too large for a float") from exc
        if not math.isfinite(result):
            raise TypeError(f"expected a finite number, got {value}")
        return result


class STRING(Socket):
    """Python str."""

    name = "STRING"
    literal = True
    json_type = "string"

    @classmethod
    def coerce(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_describe(value)}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidTextError(f"the text {_describe(value)} is not valid Unicode (a lone surrogate "
                                       f"at position {exc.start})") from None
        return value


class BOOLEAN(Socket):
    """Python bool (JSON true / false)."""

    name = "BOOLEAN"
    literal = True
    json_type = "boolean"

    @classmethod
    def coerce(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_describe(value)}")
        return value


class ENUM(STRING):
    """A string restricted to choices (fixed, or from the registry: samplers, schedules, ...).

    A subtype of STRING, so an enumeration output may feed a STRING input; a STRING output may also
    feed an ENUM input (as ComfyUI primitives do): its value is checked against the choices when the
    node runs.
    """

    name = "ENUM"

    @classmethod
    def accepts(cls, source: type[Socket]) -> bool:
        return issubclass(source, STRING)


BUILTIN_SOCKETS: tuple[type[Socket], ...] = (
    IMAGE, MASK, LATENT, CONDITIONING, MODEL, VAE, CONTROL_NET, TEXT_ENCODER, SIGMAS, SAMPLER, GUIDER, NOISE,
    INT, FLOAT, STRING, BOOLEAN, ENUM,
)


def _describe(value: Any) -> str:
    """Short description of a value for error messages (never a huge repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"int of about {int(value.bit_length() * 0.30103):,} digits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr of arbitrary API data may fail
        text = "<unprintable>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
