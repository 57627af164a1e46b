"""LoRA files: read them, map their keys onto a model, and turn them into weight patches.

Formats read (one safetensors file; pickles are refused like checkpoints):

- kohya / A1111: `lora_unet_<module path, dots as _>.lora_down.weight / .lora_up.weight / .alpha`,
  the text encoder under `lora_te_` (SD1, SD2; `lora_te1_` / `lora_te2_` are SDXL's two). U-Net
  paths may be diffusers' (`down_blocks_0_attentions_0_...`, what kohya writes for SD1/SD2) or the
  original layout's (`input_blocks_1_1_...`).
- diffusers and PEFT: `unet.<diffusers path>.lora_A.weight / .lora_B.weight` (or `.lora.down /
  .lora.up`, `.lora_linear_layer.down / .up`), `text_encoder.<path>...`; ComfyUI's own
  `diffusion_model.<original path>...`.
- LyCORIS: LoCon (the same keys on convolutions), LoHa (`hada_w1_a, hada_w1_b, hada_w2_a,
  hada_w2_b`), LoKr (`lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or `lokr_w2_a/_b`), full diffs
  (`diff`), and DoRA's magnitude (`dora_scale`) on any of them.

The deltas, at strength 1 (rank r = the inner dimension, scale = alpha / r, 1 without alpha):
LoRA up @ down * scale (LoCon: the same on the flattened convolution kernels);
LoHa (w1a @ w1b) * (w2a @ w2b) * scale; LoKr kron(w1, w2) * scale (scale 1 unless a factor is
itself low-rank); DoRA m * (W + dW) / ||W + dW|| - W, the norm taken per output row when m has
one entry per output, else per input column (Liu et al. 2024).

Every key either lands on a weight of the model or is reported: `LoraPlan.unmatched` (a warning
naming how many and a sample); a key that lands on a weight of another shape, or a file whose
U-Net keys match nothing in this U-Net, is a `LoraMismatchError` (a LoRA for another
architecture). The kohya writer (`write_kohya_lora`) is what `ldmgraph train lora` uses.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.diffusers_keys import _UNET_RESNET, _unet_module_pairs
from ldmgraph.models.files import read_state_dict
from ldmgraph.models.pages import file_ranges, release
from ldmgraph.models.patches import WeightPatch, patch_target

# the suffix after a module's path, longest first so that ".lora.down.weight" wins over ".weight"
SUFFIXES = (
    "lora_linear_layer.down.weight", "lora_linear_layer.up.weight", "lora.down.weight", "lora.up.weight",
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2",
    "dora_scale", "alpha", "diff_b", "diff",
)
_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight")

# prefix -> (part, naming): which model part a key prefix addresses
PREFIXES = (
    ("lora_unet_", "unet", "flat"), ("lora_te1_", "te1", "flat"), ("lora_te2_", "te2", "flat"),
    ("lora_te_", "te", "flat"), ("unet.", "unet", "dotted"), ("diffusion_model.", "unet", "dotted"),
    ("text_encoder_2.", "te2", "dotted"), ("text_encoder.", "te", "dotted"),
    ("lora_transformer_", "other", "flat"), ("transformer.", "other", "dotted"),
)
SAMPLE = 5
"""How many unmatched keys a warning names."""


class LoraError(ValueError):
    """A LoRA file that cannot be applied (bad tensors, an unknown adapter kind)."""


class LoraMismatchError(LoraError):
    """A LoRA made for another architecture than the model it is applied to."""


class LoraKeysWarning(UserWarning):
    """Keys of a LoRA file that match nothing in the model (reported, never silently dropped)."""


# ---------------------------------------------------------------------------------- key maps


def flat(name: str) -> str:
    """kohya's form of a module path: dots as underscores."""
    return name.replace(".", "_")


def unet_aliases(unet: nn.Module, config: Mapping[str, Any] | None) -> dict[str, str]:
    """Every name a LoRA may use for a U-Net module with weights (flat form) -> its path in our U-Net.

    Our paths are the original layout's; diffusers' paths come from the one mapping table
    (`diffusers_keys`), so any channel_mult and attention layout map alike.
    """
    modules = [name for name, m in unet.named_modules() if name and getattr(m, "weight", None) is not None]
    aliases = {flat(name): name for name in modules}
    if config is not None:
        pairs = _unet_module_pairs(config)
        for name in modules:
            for ours, theirs, kind in pairs:
                if not (name + ".").startswith(ours):
                    continue
                suffix = (name + ".")[len(ours):]
                if kind == "resnet":
                    suffix = next((new + suffix[len(old):] for old, new in _UNET_RESNET.items()
                                   if suffix.startswith(old)), suffix)
                elif kind == "attention":
                    break
                aliases.setdefault(flat((theirs + suffix).rstrip(".")), name)
                break
    return aliases


def text_aliases(encoder: nn.Module, prefix: str = "") -> dict[str, str]:
    """Names a LoRA may use for a text-encoder module (flat form) -> its path in our encoder handle.

    Our CLIP modules carry transformers' names under `transformer.`; kohya and diffusers name them
    from `text_model.` on (`text_model_encoder_layers_0_self_attn_q_proj`). `prefix` is the path of
    `encoder` in the handle (SDXL's `clip_l.` and `clip_g.`).
    """
    aliases: dict[str, str] = {}
    for name, module in encoder.named_modules():
        if not name or getattr(module, "weight", None) is None:
            continue
        inner = name.removeprefix("transformer.")
        for alias in (name, inner, "text_model." + inner.removeprefix("text_model.")):
            aliases.setdefault(flat(alias), prefix + name)
    return aliases


def text_parts(text_encoder: nn.Module) -> dict[str, tuple[dict[str, str], dict[str, tuple[int, ...]]]]:
    """The text-encoder parts of a LoRA plan: "te" (SD1, SD2), or SDXL's "te1" (CLIP ViT-L, `clip_l`)
    and "te2" (OpenCLIP bigG, `clip_g`; the refiner has only this one)."""
    shapes = weight_shapes(text_encoder)
    clip_g = getattr(text_encoder, "clip_g", None)
    if not isinstance(clip_g, nn.Module):
        return {"te": (text_aliases(text_encoder), shapes)}
    parts = {"te2": (text_aliases(clip_g, "clip_g."), shapes)}
    clip_l = getattr(text_encoder, "clip_l", None)
    if isinstance(clip_l, nn.Module):
        parts["te1"] = (text_aliases(clip_l, "clip_l."), shapes)
    return parts


TEXT_PARTS = ("te", "te1", "te2")


# ---------------------------------------------------------------------------------- planning


@dataclass
class Group:
    """The tensors of one LoRA module (by suffix) and the model weight they patch."""

    part: str
    key: str
    tensors: dict[str, Any] = field(default_factory=dict)
    target: str = ""


@dataclass
class LoraPlan:
    """Where each module of a LoRA file lands: `groups` by part ("unet", "te"), and what did not."""

    groups: dict[str, list[Group]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def warning(self, name: str) -> str | None:
        """The unmatched-keys warning (how many and a sample), or None when every key landed."""
        if not self.unmatched:
            return None
        sample = ", ".join(self.unmatched[:SAMPLE])
        more = f" (and {len(self.unmatched) - SAMPLE} more)" if len(self.unmatched) > SAMPLE else ""
        return (f"{len(self.unmatched)} key(s) of the LoRA {name} match nothing in the model and are not "
                f"applied: {sample}{more}")


def split_key(key: str, parts: Iterable[str] = ()) -> tuple[str, str, str, str] | None:
    """(part, naming, module path in the file's naming, suffix) or None for a key of no known form.

    diffusers names SDXL's CLIP ViT-L `text_encoder.` as it names SD1's encoder: with `parts` of an
    SDXL model ("te1" and no "te"), that prefix is "te1".
    """
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            for prefix, part, naming in PREFIXES:
                if module.startswith(prefix):
                    if part == "te" and naming == "dotted" and "te1" in parts and "te" not in parts:
                        part = "te1"
                    return part, naming, module[len(prefix):], suffix
            return None
    return None


def plan_lora(
    shapes: Mapping[str, tuple[int, ...]],
    parts: Mapping[str, tuple[dict[str, str], Mapping[str, tuple[int, ...]]]],
) -> LoraPlan:
    """Match a LoRA's keys (name -> shape) to model parts: `parts[part] = (aliases, weight shapes)`.

    A module whose delta has another shape than the weight it names is `mismatched`; a key in no
    part, or of no known form, is `unmatched`.
    """
    plan = LoraPlan()
    found: dict[tuple[str, str], Group] = {}
    for key in sorted(shapes):
        split = split_key(key, parts)
        if split is None or split[0] not in parts:
            plan.unmatched.append(key)
            continue
        part, _naming, path, suffix = split
        aliases, weights = parts[part]
        target = aliases.get(flat(path))
        if target is None:
            plan.unmatched.append(key)
            continue
        group = found.setdefault((part, target), Group(part, key[: -len(suffix) - 1], target=target))
        group.tensors[suffix] = shapes[key]
    for (part, target), group in found.items():
        weight = parts[part][1].get(target + ".weight")
        out_shape = _delta_shape(group.tensors)
        if weight is None or out_shape is None or math.prod(out_shape) != math.prod(weight):
            plan.mismatched.append(f"{group.key} ({_shape_text(out_shape)} onto {target} {_shape_text(weight)})")
            continue
        plan.groups.setdefault(part, []).append(group)
    return plan


def _shape_text(shape: Iterable[int] | None) -> str:
    return "?" if shape is None else "x".join(str(int(s)) for s in shape)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(value, "shape", value))


def _delta_shape(tensors: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape of the delta a module's tensors make (from shapes only), or None if incomplete."""
    get = {k: _shape(v) for k, v in tensors.items()}
    down = next((get[k] for k in _DOWN if k in get), None)
    up = next((get[k] for k in _UP if k in get), None)
    if up is not None and down is not None:
        return (up[0], math.prod(down[1:]))
    if "hada_w1_a" in get and "hada_w1_b" in get:
        return (get["hada_w1_a"][0], math.prod(get["hada_w1_b"][1:]))
    if "diff" in get:
        return get["diff"]
    w1 = get.get("lokr_w1") or (_mm_shape(get.get("lokr_w1_a"), get.get("lokr_w1_b")))
    w2 = get.get("lokr_w2") or (_mm_shape(get.get("lokr_w2_a"), get.get("lokr_w2_b")))
    if w1 and w2:
        return (w1[0] * w2[0], math.prod(w1[1:]) * math.prod(w2[1:]))
    return None


def _mm_shape(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if a is None or b is None else (a[0], *b[1:])


# ---------------------------------------------------------------------------------- adapters


class _Mapped:
    """Adapters whose tensors are views of the LoRA file's memory map give their resident pages back
    after each use (`release`), so applying a large LoRA keeps only the current layer's factors in RAM."""

    ranges: list[tuple[int, int]] | None = None

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(v for v in vars(self).values() if isinstance(v, Tensor))

    def release(self) -> None:
        for tensor in self.tensors():
            release(tensor, self.ranges or [])
        inner = getattr(self, "inner", None)
        if inner is not None:
            inner.ranges = self.ranges
            inner.release()

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.tensors()) + int(getattr(getattr(self, "inner", None), "nbytes", 0))


@dataclass(eq=False)
class LoraAdapter(_Mapped):
    """up @ down * scale (LoCon: the kernels flattened), reshaped to the weight's shape."""

    up: Tensor
    down: Tensor
    scale: float
    uses_weight = False

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        up = self.up.flatten(1)[rows].float() * self.scale
        return (up @ self.down.flatten(1).float()).reshape(-1, *weight.shape[1:])

    def delta_into(self, weight: Tensor, rows: slice, out: Tensor) -> Tensor:
        """`delta` written into `out` (no temporary of the weight's size)."""
        up = self.up.flatten(1)[rows].float() * self.scale
        torch.mm(up, self.down.flatten(1).float(), out=out.view(up.shape[0], -1))
        return out



@dataclass(eq=False)
class LohaAdapter(_Mapped):
    """The Hadamard product of two low-rank products (LyCORIS LoHa)."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    scale: float
    uses_weight = False

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        one = self.w1a[rows].float() @ self.w1b.flatten(1).float()
        two = self.w2a[rows].float() @ self.w2b.flatten(1).float()
        return (one * two * self.scale).reshape(-1, *weight.shape[1:])



@dataclass(eq=False)
class LokrAdapter(_Mapped):
    """The Kronecker product of two factors, each whole or low-rank (LyCORIS LoKr)."""

    w1: Tensor
    w2: Tensor
    scale: float
    uses_weight = False

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        w1, w2 = self.w1.float(), self.w2.float()
        full = torch.kron(w1.flatten(1), w2.flatten(1)) * self.scale
        return full[rows].reshape(-1, *weight.shape[1:])



@dataclass(eq=False)
class DiffAdapter(_Mapped):
    """A full difference of the weight (LyCORIS `diff`)."""

    diff: Tensor
    uses_weight = False
    scale: float = 1.0

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        return self.diff.reshape(weight.shape[0], -1)[rows].float().reshape(-1, *weight.shape[1:])



@dataclass(eq=False)
class DoraAdapter(_Mapped):
    """DoRA: m * V / ||V|| with V = W + inner delta; the delta returned is that minus W."""

    inner: Any
    magnitude: Tensor
    uses_weight = True

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        whole = slice(None)
        combined = weight + self.inner.delta(weight, whole)
        m = self.magnitude.float()
        if m.shape[0] == weight.shape[0] and m.numel() == weight.shape[0]:
            norm = combined.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
            m = m.reshape(norm.shape)
        else:
            cols = combined.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            norm = cols.reshape(1, -1, *[1] * (weight.dim() - 2))
            m = m.reshape(norm.shape)
        return (m * combined / norm - weight)[rows]



def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _scale(tensors: Mapping[str, Tensor], rank: int | None) -> float:
    alpha = tensors.get("alpha")
    if alpha is None or not rank:
        return 1.0
    return float(alpha.float().reshape(-1)[0]) / rank


def make_adapter(tensors: Mapping[str, Tensor], key: str = "") -> Any:
    """The adapter of one LoRA module's tensors (by suffix), DoRA-wrapped when it has `dora_scale`."""
    down = next((tensors[k] for k in _DOWN if k in tensors), None)
    up = next((tensors[k] for k in _UP if k in tensors), None)
    if up is not None and down is not None:
        if "lora_mid.weight" in tensors:
            raise LoraError(f"{key}: LoCon with a Tucker middle factor (lora_mid) is not supported")
        adapter: Any = LoraAdapter(up, down, _scale(tensors, down.shape[0]))
    elif "hada_w1_a" in tensors:
        if "hada_t1" in tensors:
            raise LoraError(f"{key}: LoHa with Tucker factors (hada_t1) is not supported")
        adapter = LohaAdapter(tensors["hada_w1_a"], tensors["hada_w1_b"], tensors["hada_w2_a"],
                              tensors["hada_w2_b"], _scale(tensors, tensors["hada_w1_b"].shape[0]))
    elif "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        adapter = _lokr(tensors, key)
    elif "diff" in tensors:
        adapter = DiffAdapter(tensors["diff"])
    else:
        raise LoraError(f"{key}: no complete adapter in its tensors ({', '.join(sorted(tensors))})")
    if "dora_scale" in tensors:
        adapter = DoraAdapter(adapter, tensors["dora_scale"])
    return adapter


def _lokr(tensors: Mapping[str, Tensor], key: str) -> LokrAdapter:
    if "lokr_t2" in tensors:
        raise LoraError(f"{key}: LoKr with a Tucker factor (lokr_t2) is not supported")
    rank = None
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1 = tensors["lokr_w1_a"].float() @ tensors["lokr_w1_b"].float()
        rank = tensors["lokr_w1_b"].shape[0]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        w2 = tensors["lokr_w2_a"].float() @ tensors["lokr_w2_b"].flatten(1).float()
        rank = tensors["lokr_w2_b"].shape[0]
    return LokrAdapter(w1, w2, _scale(tensors, rank))


# ---------------------------------------------------------------------------------- reading


@dataclass
class LoraFile:
    """A LoRA file's tensors (memory-mapped) and metadata."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """Where this process maps the file (the adapters give their pages back after use)."""

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.tensors.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA safetensors file (pickles refused, as for checkpoints)."""
    state = read_state_dict(path)
    ranges = file_ranges(path)
    for tensor in state.tensors.values():  # reading the header may have faulted pages in: give them back
        release(tensor, ranges)
    return LoraFile(Path(path), dict(state.tensors), dict(state.metadata), ranges)


def model_parts(unet: Any = None, text_encoder: Any = None) -> dict[str, tuple[dict[str, str], dict[str, tuple[int, ...]]]]:
    """The `parts` argument of `plan_lora` for a MODEL handle (or a bare U-Net) and a text encoder."""
    parts = {}
    if unet is not None:
        module = patch_target(unet)
        info = getattr(unet, "info", None)
        config = getattr(info, "unet", None)
        parts["unet"] = (unet_aliases(module, config), weight_shapes(module))
    if text_encoder is not None:
        parts.update(text_parts(text_encoder))
    return parts


def weight_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters() if name.endswith("weight")}


def check_plan(plan: LoraPlan, name: str, present: Iterable[str], file_parts: Iterable[str]) -> None:
    """Raise `LoraMismatchError` for a LoRA of another architecture: a delta of the wrong shape, a
    part of the file the model lacks (SDXL's second text encoder), or U-Net keys matching nothing."""
    if plan.mismatched:
        sample = "; ".join(plan.mismatched[:3])
        raise LoraMismatchError(
            f"the LoRA {name} does not fit this model ({len(plan.mismatched)} weight(s) of another shape, "
            f"e.g. {sample}): it was made for another architecture; pick a LoRA trained for this model")
    if not plan.groups and plan.unmatched:
        raise LoraMismatchError(
            f"none of the {len(plan.unmatched)} keys of {name} lands on this model (e.g. {plan.unmatched[0]}): "
            "it is not a LoRA of a known format, or it was made for another architecture; pick a LoRA "
            "trained for this model")
    present = set(present)
    for part in sorted(set(file_parts)):
        if part not in present or (part == "unet" and not plan.groups.get("unet")):
            what = {"te1": "SDXL's first text encoder (lora_te1_)", "te2": "SDXL's second text encoder (lora_te2_)",
                    "other": "a transformer (Flux, SD3) model", "unet": "another U-Net",
                    "te": "an SD1/SD2 text encoder (lora_te_)"}.get(part, part)
            raise LoraMismatchError(
                f"the LoRA {name} is for {what}, which this model does not have: it was made for another "
                "architecture; pick a LoRA trained for this model")


def file_parts(shapes: Iterable[str], parts: Iterable[str] = ()) -> set[str]:
    """The model parts a LoRA file's keys address ("unet", "te", "te1", "te2", "other")."""
    parts = tuple(parts)
    return {split[0] for key in shapes if (split := split_key(key, parts)) is not None}


def lora_patches(
    lora: LoraFile,
    *,
    unet: Any = None,
    text_encoder: Any = None,
    strength_model: float = 1.0,
    strength_clip: float = 1.0,
    name: str = "",
) -> tuple[list[WeightPatch], list[WeightPatch], LoraPlan]:
    """The weight patches of a LoRA for a MODEL handle and a text encoder (either may be None).

    Raises `LoraMismatchError` for a LoRA of another architecture; warns (`LoraKeysWarning`) about
    keys that match nothing. Parts that are not given (a model-only loader) are not warned about.
    """
    name = name or lora.path.name
    parts = model_parts(unet, text_encoder)
    shapes = relevant_keys(lora.shapes, with_text=text_encoder is not None)
    plan = plan_lora(shapes, parts)
    check_plan(plan, name, parts, file_parts(shapes, parts))
    message = plan.warning(name)
    if message:
        warnings.warn(LoraKeysWarning(message), stacklevel=2)
    made: dict[str, list[WeightPatch]] = {"unet": [], "text": []}
    for part, groups in plan.groups.items():
        strength = strength_model if part == "unet" else strength_clip
        for group in groups:
            tensors = {s: lora.tensors[group.key + "." + s] for s in group.tensors}
            adapter = make_adapter(tensors, group.key)
            adapter.ranges = lora.ranges
            made["unet" if part == "unet" else "text"].append(
                WeightPatch(group.target + ".weight", adapter, float(strength)))
    for patch in made["unet"] + made["text"]:
        patch.adapter.release()  # reading the alphas faulted in the pages around them
    return made["unet"], made["text"], plan


def relevant_keys(shapes: Mapping[str, Any], *, with_text: bool) -> dict[str, Any]:
    """The keys a loader applies: a model-only loader leaves the text encoders' keys aside (they are
    neither for the U-Net nor unmatched)."""
    skip = () if with_text else TEXT_PARTS
    return {k: v for k, v in shapes.items() if (split := split_key(k)) is None or split[0] not in skip}


# ---------------------------------------------------------------------------------- writing


def kohya_key(part: str, module_path: str) -> str:
    """The kohya key stem of a module: `lora_unet_input_blocks_1_1_..._to_q` or `lora_te_...`."""
    prefix = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}[part]
    return prefix + flat(module_path.removeprefix("transformer."))


def write_kohya_lora(
    path: str | Path,
    factors: Mapping[str, tuple[Tensor, Tensor, float]],
    *,
    part: str = "unet",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write LoRA factors in the kohya format: `factors[module path] = (down [r, in...], up [out, r...],
    alpha)`; module paths are ours (original layout, e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`).

    A dict of several parts can be written by calling `kohya_tensors` per part and saving once.
    """
    from safetensors.torch import save_file

    tensors = kohya_tensors(factors, part=part, dtype=dtype)
    path = Path(path)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", **dict(metadata or {})})
    return path


def kohya_tensors(
    factors: Mapping[str, tuple[Tensor, Tensor, float]], *, part: str = "unet", dtype: torch.dtype = torch.float16
) -> dict[str, Tensor]:
    """The kohya tensors of one model part's LoRA factors (see `write_kohya_lora`)."""
    out: dict[str, Tensor] = {}
    for module, (down, up, alpha) in factors.items():
        stem = kohya_key(part, module)
        out[stem + ".lora_down.weight"] = down.detach().to(dtype).contiguous()
        out[stem + ".lora_up.weight"] = up.detach().to(dtype).contiguous()
        out[stem + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out
