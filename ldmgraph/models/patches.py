"""Model patches: change a loaded model for one handle without copying it, and undo the change exactly.

A loaded model is shared by every branch of a graph and by the model cache, so a patch node never
mutates it for anyone else. It returns a new handle (`patched`) that names the same module plus an
ordered tuple of patches. The module is changed in place only while a consumer runs with that
handle (`patch_scope`), and put back bit for bit before anyone else runs on it. There is no second
copy of the model and nothing is skipped: a patch that cannot be applied is an error.

Patch kinds (the plugin contract; each is a frozen dataclass, applied in the tuple's order):

- `WeightPatch(target, adapter, strength)`: W <- W + strength * adapter.delta(W) for one parameter
  (LoRA and its relatives, see `ldmgraph.models.lora`). All weight patches of one parameter are
  summed in float32 and added once, so stacked patches give the same result in any order up to
  float rounding. An adapter whose delta does not depend on W (`uses_weight = False`, every LoRA
  kind but DoRA) is undone without a backup: the delta is computed again and subtracted, and the
  few elements where subtracting does not round back to the original bits (found at apply time,
  kept as an index and a one-byte step in raw bits, about 5 bytes each) are put back. A checksum
  of the original bits is compared after restoring. Adapters that read W keep that weight whole.
  Patching works in row chunks through reused buffers, so its peak memory is the notes plus a few
  MiB.
- `BlockHook(where, position, fn)`: `fn(h, info) -> h` on the input or output of the U-Net's
  `input_blocks`, `middle_block` or `output_blocks` (optionally only some indices).
- `SkipHook(fn)`: `fn(h, skip, info) -> (h, skip)` where an output block's backbone features meet
  their skip connection, before they are concatenated (FreeU, Si et al. 2024).
- `AttentionPatch(fn, which)`: `fn(q, k, v, info) -> out` replaces softmax(QK^T/sqrt(d))V in the
  self- (`attn1`) or cross-attention (`attn2`) layers; q, k, v and out are [B, heads, N, d].
- `OutputPatch(fn)`: `fn(out, x_in, t, model) -> out` on the network's prediction (LCM's boundary
  condition, `ldmgraph.models.model_sampling`).

A plugin makes patches and returns `patched(handle, patches)` from its node; see docs/lora.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

CHUNK_ELEMENTS = 1 << 19
"""Rows of a weight are patched in chunks of about this many elements (2 MiB in float32), so the
temporaries of the largest layer stay small next to the patch's own tensors."""

STATE_ATTR = "_ldmgraph_patch_state"


# ---------------------------------------------------------------------------------- patch kinds


class Adapter(Protocol):
    """What a `WeightPatch` needs from a weight adapter (LoRA, LoHa, LoKr, DoRA, a full diff)."""

    uses_weight: bool
    """True when the delta depends on the weight itself (DoRA): such weights are backed up whole."""

    def delta(self, weight: Tensor, rows: slice) -> Tensor:
        """The float32 change of `weight[rows]` at strength 1 (`weight` is the whole base weight
        in float32 when `uses_weight`, else only its rows)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter's own tensors."""
        ...


@dataclass(frozen=True, eq=False)
class WeightPatch:
    """W <- W + strength * adapter.delta(W) for the parameter `target` (a name in the patched module)."""

    target: str
    adapter: Any
    strength: float = 1.0


@dataclass(frozen=True)
class BlockInfo:
    """Where a hook runs: `where` (input_blocks, middle_block, output_blocks), the block's `index`, its
    resolution `level` (0 = full latent size) and, for output blocks, `up_index` (diffusers' up-block)."""

    where: str
    index: int
    level: int
    up_index: int = -1


@dataclass(frozen=True, eq=False)
class BlockHook:
    """`fn(h, info) -> h` on the `position` ("in" or "out") of U-Net blocks of `where`; `indices`
    None means every block there."""

    where: Literal["input_blocks", "middle_block", "output_blocks"]
    position: Literal["in", "out"]
    fn: Callable[[Tensor, BlockInfo], Tensor]
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class SkipHook:
    """`fn(h, skip, info) -> (h, skip)` before an output block concatenates its input with its skip."""

    fn: Callable[[Tensor, Tensor, BlockInfo], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AttentionInfo:
    """The attention layer being replaced: its module `name` in the U-Net, `which` (attn1 / attn2), heads."""

    name: str
    which: str
    heads: int


@dataclass(frozen=True, eq=False)
class AttentionPatch:
    """`fn(q, k, v, info) -> out` instead of scaled dot-product attention in `which` layers ("attn1",
    "attn2" or "both"); `names`, if given, limits it to those module names."""

    fn: Callable[[Tensor, Tensor, Tensor, AttentionInfo], Tensor]
    which: Literal["attn1", "attn2", "both"] = "both"
    names: frozenset[str] | None = None


@dataclass(frozen=True, eq=False)
class OutputPatch:
    """`fn(out, x_in, t, model) -> out` on the network's prediction: `x_in` is its latent input
    (x_t, the concat channels left out), `t` the timesteps, `model` the handle (its noise schedule).
    What the prediction means changes with it (LCM's boundary condition); nothing is changed in the
    module, so there is nothing to restore."""

    fn: Callable[[Tensor, Tensor, Tensor, Any], Tensor]


Patch = WeightPatch | BlockHook | SkipHook | AttentionPatch | OutputPatch
PATCH_KINDS = (WeightPatch, BlockHook, SkipHook, AttentionPatch, OutputPatch)


def patch_output(handle: Any, out: Tensor, x_in: Tensor, t: Tensor) -> Tensor:
    """The network's prediction after the handle's output patches, in their order."""
    for patch in getattr(handle, "patches", ()):
        if isinstance(patch, OutputPatch):
            out = patch.fn(out, x_in, t, handle)
    return out


# ---------------------------------------------------------------------------------- handles


def patched(handle: Any, patches: Sequence[Any]) -> Any:
    """A new handle on the same module as `handle` with `patches` appended to its own.

    Nothing is copied but the handle object (its tensors and submodules are shared) and nothing is
    applied yet. MODEL handles apply their patches whenever `apply_model` runs; other handles
    (text encoders) get their `encode*` methods wrapped in `patch_scope`.
    """
    for patch in patches:
        if not isinstance(patch, PATCH_KINDS):
            raise TypeError(f"not a model patch: {type(patch).__name__}; use one of "
                            f"{', '.join(k.__name__ for k in PATCH_KINDS)}")
    clone = object.__new__(type(handle))
    clone.__dict__.update(handle.__dict__)
    if isinstance(handle, nn.Module):
        for slot in ("_modules", "_parameters", "_buffers"):
            clone.__dict__[slot] = dict(handle.__dict__[slot])
    clone.__dict__["patches"] = tuple(getattr(handle, "patches", ())) + tuple(patches)
    clone.__dict__["patch_base"] = getattr(handle, "patch_base", handle)
    if not hasattr(type(handle), "apply_model"):
        for name in dir(type(handle)):
            if name.startswith("encode") and callable(getattr(type(handle), name)):
                clone.__dict__[name] = _scoped(clone, getattr(type(handle), name))
    return clone


def _scoped(handle: Any, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with patch_scope(handle):
            return method(handle, *args, **kwargs)

    call.__name__ = getattr(method, "__name__", "call")
    call.__doc__ = method.__doc__
    return call


def patch_target(handle: Any) -> nn.Module:
    """The module a handle's patches change, shared by every handle made from it: a MODEL's U-Net,
    or the base text encoder handle (whose parameters every patched copy shares)."""
    module = getattr(handle, "diffusion_model", None)
    if isinstance(module, nn.Module):
        return module
    return handle.__dict__.get("patch_base", handle)  # type: ignore[no-any-return]


def in_use(handle: Any) -> Any:
    """`patch_scope(handle)` for a handle that carries patches, else a no-op context."""
    if handle is None or not getattr(handle, "patches", ()):
        return nullcontext()
    return patch_scope(handle)


@contextmanager
def patch_scope(handle: Any) -> Iterator[None]:
    """Run with `handle`'s patches applied to its module, restoring the module when the outermost
    scope on it ends. Scopes nest (a sampler opens one, every model call inside opens another); a
    scope for another patch list on the same module first restores it, so each handle sees
    exactly its own patches. A lock makes threads using one module take turns."""
    module = patch_target(handle)
    state = _state(module)
    with state.lock:
        state.depth += 1
        try:
            state.ensure(module, tuple(getattr(handle, "patches", ())))
            yield
        finally:
            state.depth -= 1
            if state.depth == 0:
                state.ensure(module, ())


def applied_patches(module: nn.Module) -> tuple[Any, ...]:
    """The patches applied to `module` right now (empty outside every scope)."""
    state = module.__dict__.get(STATE_ATTR)
    return () if state is None else state.applied


def _state(module: nn.Module) -> _PatchState:
    state = module.__dict__.get(STATE_ATTR)
    if state is None:
        state = module.__dict__.setdefault(STATE_ATTR, _PatchState())
    return state  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------- applying


@dataclass
class _Undo:
    """How to put one parameter back: its patches (delta recomputed) plus the elements where that
    does not round back, or the whole original when a delta reads the weight."""

    patches: list[WeightPatch]
    checksum: int = 0
    notes: _Notes | None = None
    original: Tensor | None = None


@dataclass
class _PatchState:
    lock: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0
    applied: tuple[Any, ...] = ()
    undo: dict[str, _Undo] = field(default_factory=dict)
    attention: list[nn.Module] = field(default_factory=list)
    hooks: bool = False

    # a copied or pickled module (deepcopy, torch.save) starts with no scope and no notes of its own
    def __deepcopy__(self, memo: dict[int, Any]) -> _PatchState:
        return _PatchState()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def ensure(self, module: nn.Module, patches: tuple[Any, ...]) -> None:
        if len(patches) == len(self.applied) and all(a is b for a, b in zip(patches, self.applied, strict=True)):
            return
        self.restore(module)
        try:
            self.apply(module, patches)
        except BaseException:
            self.restore(module)
            raise

    @torch.no_grad()
    def apply(self, module: nn.Module, patches: tuple[Any, ...]) -> None:
        self.applied = patches
        params = dict(module.named_parameters())
        grouped: dict[str, list[WeightPatch]] = {}
        for patch in patches:
            if isinstance(patch, WeightPatch) and patch.strength != 0.0:
                if patch.target not in params:
                    raise KeyError(f"model patch names the weight {patch.target!r}, which this model does not have")
                grouped.setdefault(patch.target, []).append(patch)
        ws = _Workspace()
        for name, group in grouped.items():
            self.undo[name] = _apply_weight(params[name], group, ws)
        hooks = [p for p in patches if isinstance(p, BlockHook | SkipHook)]
        if hooks:
            if not hasattr(module, "input_blocks"):
                raise TypeError(f"block hooks need a U-Net; this model is a {type(module).__name__}")
            module.patch_hooks = BlockHooks(module, hooks)  # type: ignore[assignment]
            self.hooks = True
        attention = [p for p in patches if isinstance(p, AttentionPatch)]
        if attention:
            self.attention = _install_attention(module, attention)

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        ws = _Workspace()
        for name, undo in self.undo.items():
            _restore_weight(params[name], undo, ws)
        self.undo = {}
        if self.hooks:
            module.patch_hooks = None  # type: ignore[assignment]
            self.hooks = False
        for layer in self.attention:
            layer.attention_override = None  # type: ignore[assignment]
        self.attention = []
        self.applied = ()


def _chunks(weight: Tensor, whole: bool) -> Iterator[slice]:
    rows = weight.shape[0] if weight.dim() else 1
    per_row = max(1, weight.numel() // max(rows, 1))
    step = rows if whole else max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class _Workspace:
    """Buffers reused by every chunk of every weight: patching allocates no large temporaries (which
    would also fragment the heap around the notes kept for restoring, and raise the peak RSS)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (name, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = torch.empty(max(like.numel(), CHUNK_ELEMENTS), dtype=dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)


def _delta(group: list[WeightPatch], weight: Tensor, rows: slice, out: Tensor, ws: _Workspace) -> Tensor:
    """The summed float32 delta of a weight's patches for `rows`, written into `out`."""
    for i, patch in enumerate(group):
        part = _adapter_delta(patch.adapter, weight, rows, out if i == 0 else ws.get("part", out))
        if i == 0:
            if patch.strength != 1.0:
                out.mul_(float(patch.strength))
        else:
            out.add_(part, alpha=float(patch.strength))
    return out


def _adapter_delta(adapter: Any, weight: Tensor, rows: slice, out: Tensor) -> Tensor:
    """The adapter's delta written into `out`. An adapter kept in host memory patching weights on
    a GPU (a model the device-memory manager moved there) computes on its own device and the
    result is copied over."""
    home = _adapter_device(adapter)
    fill = getattr(adapter, "delta_into", None)
    if fill is not None and (home is None or home == out.device):
        return fill(weight, rows, out)  # type: ignore[no-any-return]
    if home is not None and home != weight.device and getattr(adapter, "uses_weight", False):
        weight = weight.to(home)
    return out.copy_(adapter.delta(weight, rows).reshape(out.shape))


def _adapter_device(adapter: Any) -> torch.device | None:
    """Where an adapter's own tensors are (None: it holds none)."""
    for value in vars(adapter).values() if hasattr(adapter, "__dict__") else ():
        if isinstance(value, Tensor):
            return value.device
    return None


def _bits(t: Tensor) -> Tensor:
    """The raw bits (NaN, -0.0 and +0.0 compare as what they are)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _checksum(weight: Tensor, ws: _Workspace) -> int:
    """The sum of the raw bits as 64-bit integers, chunk by chunk."""
    bits = _bits(weight)
    total = 0
    for rows in _chunks(weight, whole=False):
        chunk = bits[rows]
        total += int(ws.get("sum", chunk, torch.int64).copy_(chunk).sum())
    return total


def _release(group: list[WeightPatch]) -> None:
    """Let the adapters drop their memory-mapped pages once used (re-read from the file if needed again)."""
    for patch in group:
        release = getattr(patch.adapter, "release", None)
        if release is not None:
            release()


def _apply_weight(param: nn.Parameter, group: list[WeightPatch], ws: _Workspace) -> _Undo:
    """W <- W + delta in row chunks, noting the elements where W + delta - delta does not round back
    (as an index and the step, in units in the last place, from what subtracting gives to W)."""
    weight = param.data
    undo = _Undo(group, checksum=_checksum(weight, ws))
    if any(getattr(p.adapter, "uses_weight", False) for p in group):
        undo.original = weight.clone()
        base = weight.float()
        weight.copy_((base + _delta(group, base, slice(None), torch.empty_like(base), ws)).to(weight.dtype))
        _release(group)
        return undo
    notes: list[tuple[Tensor, Tensor, Tensor]] = []
    width = weight.numel() // max(weight.shape[0], 1) if weight.dim() else 1
    exact = weight.dtype == torch.float32
    for rows in _chunks(weight, whole=False):
        part = weight[rows]
        delta = _delta(group, part, rows, ws.get("delta", part), ws)
        base = part if exact else ws.get("base", part).copy_(part)
        new = torch.add(base, delta, out=ws.get("new", part))
        rounded = new if exact else ws.get("rounded", part, weight.dtype).copy_(new)
        back = torch.sub(new if exact else new.copy_(rounded), delta, out=delta)
        back = back if exact else ws.get("back", part, weight.dtype).copy_(back)
        wrong = torch.ne(_bits(back), _bits(part), out=ws.get("mask", part, torch.bool)).flatten().nonzero().flatten()
        if wrong.numel():
            steps = _bits(part).flatten()[wrong].long() - _bits(back).flatten()[wrong].long()
            notes.append((wrong + rows.start * width, steps, part.flatten()[wrong]))
        part.copy_(rounded)
    if notes:
        undo.notes = _Notes.of(notes, weight.numel())
    _release(group)
    return undo


@dataclass
class _Notes:
    """Elements to put back after subtracting: an index, and the step in raw bits from the subtraction's
    result to the original (one byte when it fits, which is nearly always), else the original value."""

    index: Tensor
    steps: Tensor
    far_index: Tensor
    far_values: Tensor

    @classmethod
    def of(cls, notes: list[tuple[Tensor, Tensor, Tensor]], numel: int) -> _Notes:
        """From per-chunk (flat index, step, original value) triples."""
        index_dtype = torch.int32 if numel < 2**31 else torch.int64
        near = [s.abs() < 128 for _, s, _ in notes]
        return cls(
            torch.cat([i[n] for (i, _, _), n in zip(notes, near, strict=True)]).to(index_dtype),
            torch.cat([s[n] for (_, s, _), n in zip(notes, near, strict=True)]).to(torch.int8),
            torch.cat([i[~n] for (i, _, _), n in zip(notes, near, strict=True)]),
            torch.cat([v[~n] for (_, _, v), n in zip(notes, near, strict=True)]),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.steps, self.far_index, self.far_values))

    def put_back(self, weight: Tensor) -> None:
        bits = _bits(weight).view(-1)
        index = self.index.long()
        bits[index] = (bits[index].long() + self.steps.long()).to(bits.dtype)
        weight.view(-1)[self.far_index] = self.far_values


def _restore_weight(param: nn.Parameter, undo: _Undo, ws: _Workspace) -> None:
    """W <- W - delta in row chunks, then the noted elements; checked against the original's checksum."""
    weight = param.data
    if undo.original is not None:
        weight.copy_(undo.original)
    else:
        for rows in _chunks(weight, whole=False):
            part = weight[rows]
            delta = _delta(undo.patches, part, rows, ws.get("delta", part), ws)
            part.copy_(torch.sub(ws.get("base", part).copy_(part), delta, out=delta))
        if undo.notes is not None:
            undo.notes.put_back(weight)
        _release(undo.patches)
    if _checksum(weight, ws) != undo.checksum:
        raise RuntimeError(
            "a patched weight did not come back bit for bit (its delta computed differently on restore); "
            "load the model again")


# ---------------------------------------------------------------------------------- hooks


class BlockHooks:
    """The hooks installed on a U-Net while a handle's patches are applied (`UNetModel.patch_hooks`).

    The U-Net calls `run` for each block and `skip` before each output block's concatenation.
    """

    def __init__(self, unet: nn.Module, hooks: list[Any]) -> None:
        self.block_hooks = [h for h in hooks if isinstance(h, BlockHook)]
        self.skip_hooks = [h for h in hooks if isinstance(h, SkipHook)]
        self.levels = _block_levels(unet)

    def info(self, where: str, index: int) -> BlockInfo:
        level, up_index = self.levels.get((where, index), (-1, -1))
        return BlockInfo(where, index, level, up_index)

    def run(self, where: str, index: int, block: Callable[..., Tensor], h: Tensor, *args: Any) -> Tensor:
        """`block(h, *args)` with this block's "in" hooks before and "out" hooks after, in order."""
        info = self.info(where, index)
        for hook in self.block_hooks:
            if hook.where == where and hook.position == "in" and (hook.indices is None or index in hook.indices):
                h = hook.fn(h, info)
        h = block(h, *args)
        for hook in self.block_hooks:
            if hook.where == where and hook.position == "out" and (hook.indices is None or index in hook.indices):
                h = hook.fn(h, info)
        return h

    def skip(self, index: int, h: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        """The output block `index`'s backbone features and skip after every `SkipHook`."""
        info = self.info("output_blocks", index)
        for hook in self.skip_hooks:
            h, skip = hook.fn(h, skip, info)
        return h, skip


def _block_levels(unet: Any) -> dict[tuple[str, int], tuple[int, int]]:
    """(where, index) -> (resolution level, diffusers up-block index) from the U-Net's layout."""
    per_level = list(getattr(unet, "num_res_blocks", []))
    table: dict[tuple[str, int], tuple[int, int]] = {("input_blocks", 0): (0, -1)}
    n = 1
    for level, count in enumerate(per_level):
        for _ in range(count):
            table[("input_blocks", n)] = (level, -1)
            n += 1
        if level != len(per_level) - 1:
            table[("input_blocks", n)] = (level, -1)
            n += 1
    table[("middle_block", 0)] = (len(per_level) - 1, -1)
    n = 0
    for up, level in enumerate(reversed(range(len(per_level)))):
        for _ in range(per_level[level] + 1):
            table[("output_blocks", n)] = (level, up)
            n += 1
    return table


def _install_attention(unet: nn.Module, patches: list[AttentionPatch]) -> list[nn.Module]:
    installed = []
    for name, layer in unet.named_modules():
        which = name.rsplit(".", 1)[-1]
        if which not in ("attn1", "attn2") or not hasattr(layer, "attention_override"):
            continue
        chosen = [p for p in patches if p.which in (which, "both") and (p.names is None or name in p.names)]
        if chosen:
            info = AttentionInfo(name, which, int(getattr(layer, "heads", 1)))
            layer.attention_override = _attention_chain(chosen, info)
            installed.append(layer)
    if not installed:
        raise TypeError("attention patches found no attention layer (attn1 / attn2) in this model")
    return installed


def _attention_chain(patches: list[AttentionPatch], info: AttentionInfo) -> Callable[..., Tensor]:
    """The last patch for a layer wins (a replacement replaces; later patches come later in order)."""
    fn = patches[-1].fn

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return fn(q, k, v, info)

    return attend
