"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder (time embedding, input blocks, middle block) reads the
noisy latent plus an embedded hint image and returns one residual per input block and one for the
middle block; each passes through a zero-initialised 1x1 convolution ("zero convolution"), so a
new ControlNet starts as a no-op. The frozen U-Net adds the residuals to its skip connections and
to its middle block's output (Sec. 3.2, eq. 4 of the paper).

Attribute names mirror the original `cldm.ControlNet` checkpoint keys under `control_model.`:
`input_hint_block.{0,2,..}` (the hint encoder, a conv + SiLU stack that downsamples by
2^(len(hint_channels) - 1) to the latent's resolution, last conv zero-initialised),
`time_embed.*`, `input_blocks.*`, `middle_block.*` (as in the U-Net), `zero_convs.{i}.0`,
`middle_block_out.0`. Diffusers' `ControlNetModel` stores the same tensors under other names
(`controlnet_cond_embedding.conv_in`, `.blocks.{j}`, `.conv_out`, `controlnet_down_blocks.{i}`,
`controlnet_mid_block`): see `controlnet_from_diffusers`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmgraph.models.attention import zero_module
from ldmgraph.models.detection import detect_unet_config
from ldmgraph.models.diffusers_keys import unet_config_from_diffusers, unet_from_diffusers
from ldmgraph.models.files import read_state_dict
from ldmgraph.models.unet import TimestepEmbedSequential, UNetModel, timestep_embedding

DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)  # SD1.x/2.x: three stride-2 convs, 8x down to the latent


def hint_layers(hint_in: int, channels: Sequence[int], out_channels: int) -> list[nn.Module]:
    """conv(hint_in, c0), then per step conv(c, c), conv(c, c_next, stride 2), then a zero conv to
    the U-Net's width; SiLU between convolutions (original `input_hint_block`)."""
    convs: list[nn.Module] = [nn.Conv2d(hint_in, channels[0], 3, padding=1)]
    for c, c_next in zip(channels[:-1], channels[1:], strict=True):
        convs += [nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c_next, 3, padding=1, stride=2)]
    convs.append(zero_module(nn.Conv2d(channels[-1], out_channels, 3, padding=1)))
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.SiLU()]
    return layers[:-1]


class ControlNet(nn.Module):
    """The control branch: `forward(x, hint, timesteps, context, y)` -> residuals.

    Args: `unet_config` holds the UNetModel kwargs of the U-Net it controls (its encoder is
    copied); `hint_channels` the widths of the hint encoder (`len - 1` stride-2 steps, so the
    hint image has `2 ** (len - 1)` times the latent's side); `hint_in` the hint image's channels.
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        hint_channels: Sequence[int] = DEFAULT_HINT_CHANNELS,
        hint_in: int = 3,
    ) -> None:
        super().__init__()
        encoder = UNetModel(**unet_config)
        self.unet_config = dict(unet_config)
        self.hint_channels = tuple(int(c) for c in hint_channels)
        self.hint_in = int(hint_in)
        self.model_channels = encoder.model_channels
        self.in_channels = encoder.in_channels
        self.context_dim = encoder.context_dim
        self.num_classes = encoder.num_classes
        self.time_embed = encoder.time_embed
        if encoder.num_classes is not None:
            self.label_emb = encoder.label_emb
        # the copy reads the context as its U-Net does: through the U-Net's context refiner, if it has one
        self.context_refiner = encoder.context_refiner
        self.input_hint_block = TimestepEmbedSequential(
            *hint_layers(self.hint_in, self.hint_channels, encoder.model_channels)
        )
        self.input_blocks = encoder.input_blocks
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(zero_module(nn.Conv2d(c, c, 1))) for c in _block_widths(encoder)
        )
        self.middle_block = encoder.middle_block
        mid = int(encoder.middle_block[0].out_layers[3].weight.shape[0])
        self.middle_block_out = TimestepEmbedSequential(zero_module(nn.Conv2d(mid, mid, 1)))

    @property
    def downscale(self) -> int:
        """Hint pixels per latent pixel."""
        return 2 ** (len(self.hint_channels) - 1)

    def forward(
        self,
        x: Tensor,
        hint: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
    ) -> list[Tensor]:
        """Residuals for U-Net input `x` [B, C, h, w] and hint [B, hint_in, h*f, w*f] (0..1):
        one per input block, then the middle block's (the order the U-Net adds them in)."""
        dtype = next(self.time_embed.parameters()).dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None and self.num_classes is not None:
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        context = None if context is None else context.to(dtype)
        if context is not None and self.context_refiner is not None:
            context = self.context_refiner(context)
        guided: Tensor | None = self.input_hint_block(hint.to(dtype), emb, context)
        h = x.to(dtype)
        out = []
        for module, zero_conv in zip(self.input_blocks, self.zero_convs, strict=True):
            h = module(h, emb, context)
            if guided is not None:
                h, guided = h + guided, None
            out.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        out.append(self.middle_block_out(h, emb, context))
        return out


def _block_widths(unet: UNetModel) -> list[int]:
    """Output channels of each input block (the widths of the skips the residuals join)."""
    widths = []
    for block in unet.input_blocks:
        first = block[0]
        if isinstance(first, nn.Conv2d):
            widths.append(first.out_channels)
        elif hasattr(first, "op"):
            widths.append(first.op.out_channels if isinstance(first.op, nn.Conv2d) else widths[-1])
        else:
            widths.append(int(first.out_layers[3].weight.shape[0]))
    return widths


def detect_hint_channels(state: Mapping[str, Tensor]) -> tuple[tuple[int, ...], int]:
    """Hint encoder widths and the hint's channel count from `input_hint_block.*` weights."""
    ids = sorted(int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if len(ids) < 2 or len(ids) % 2:
        raise ValueError(f"input_hint_block has {len(ids)} convolutions; expected an even number >= 2")
    widths = [int(state[f"input_hint_block.{i}.weight"].shape[0]) for i in ids[:-1:2]]
    hint_in = int(state[f"input_hint_block.{ids[0]}.weight"].shape[1])
    return tuple(widths), hint_in


# ----------------------------------------------------------------------------------------------
# Files: the original layout (`control_model.*`, or the bare keys) and diffusers folders

CONTROL_PREFIX = "control_model."
_D_HINT = "controlnet_cond_embedding."


def hint_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' ControlNet-only tensors in the original layout: the hint encoder
    (`conv_in`, `blocks.{j}`, `conv_out` -> `input_hint_block.{2k}`), `controlnet_down_blocks.{i}`
    -> `zero_convs.{i}.0`, `controlnet_mid_block` -> `middle_block_out.0`."""
    out: dict[str, Tensor] = {}
    blocks = sorted({int(k[len(_D_HINT) + 7 :].split(".")[0]) for k in sd if k.startswith(_D_HINT + "blocks.")})
    order = ["conv_in", *[f"blocks.{j}" for j in blocks], "conv_out"]
    for index, name in enumerate(order):
        for leaf in ("weight", "bias"):
            out[f"input_hint_block.{2 * index}.{leaf}"] = sd[f"{_D_HINT}{name}.{leaf}"]
    for key, value in sd.items():
        if key.startswith("controlnet_down_blocks."):
            i, leaf = key[len("controlnet_down_blocks.") :].split(".", 1)
            out[f"zero_convs.{i}.0.{leaf}"] = value
        elif key.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{key[len('controlnet_mid_block.'):]}"] = value
    return out


def load_diffusers_controlnet(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], tuple[int, ...], int]:
    """A diffusers `ControlNetModel` folder -> (original-layout tensors, U-Net config, hint widths, hint channels)."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(weights).tensors
    unet_cfg = unet_config_from_diffusers({**cfg, "_class_name": "UNet2DConditionModel"})
    own = ("controlnet_", )
    shared = {k: v for k, v in sd.items() if not k.startswith(own)}
    tensors = {**unet_from_diffusers(shared, unet_cfg), **hint_from_diffusers(sd)}
    widths = tuple(cfg.get("conditioning_embedding_out_channels", DEFAULT_HINT_CHANNELS))
    return tensors, unet_cfg, widths, int(cfg.get("conditioning_channels", 3))


def controlnet_config(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The U-Net config a ControlNet copies: from bundled metadata, else detected from the weights
    (SD conventions for what weights cannot tell, as for checkpoints)."""
    if "ldmgraph" in metadata:
        return dict(json.loads(metadata["ldmgraph"])["unet"])
    conv_in = tensors["input_blocks.0.0.weight"]
    probe = {**tensors, "out.2.weight": conv_in.new_zeros(conv_in.shape[1], conv_in.shape[0], 3, 3)}
    return detect_unet_config(probe, path)


class ControlNetError(ValueError):
    """A ControlNet file that cannot be used: names the file and the cause."""


class ControlNetHandle(nn.Module):
    """The CONTROL_NET socket value: a loaded ControlNet and the name of its file (shared, never
    mutated; a module so that the model cache can size it and the executor place it)."""

    def __init__(self, control_model: ControlNet, name: str) -> None:
        super().__init__()
        self.control_model = control_model
        self.name = name

    def check_model(self, unet: nn.Module) -> None:
        """Refuse a U-Net whose skips do not match this ControlNet's residuals (a ControlNet for
        another architecture), naming both shapes."""
        ours = {k: self.control_model.unet_config.get(k) for k in ("model_channels", "channel_mult", "num_res_blocks")}
        theirs = {k: getattr(unet, k, None) for k in ("model_channels",)}
        widths = _block_widths(unet) if isinstance(unet, UNetModel) else None
        mine = [int(c.weight.shape[0]) for c in (z[0] for z in self.control_model.zero_convs)]
        context_ok = self.control_model.context_dim in (None, getattr(unet, "context_dim", None))
        if widths is not None and (widths != mine or not context_ok):
            raise ControlNetError(
                f"ControlNet {self.name!r} does not fit this model: it gives residuals of widths {mine} "
                f"(context {self.control_model.context_dim}) for a U-Net with {ours}, but the model's skips "
                f"have widths {widths} (context {getattr(unet, 'context_dim', None)}); {theirs}. "
                "Use a ControlNet trained for this model's architecture (SD1.x, SD2.x or the bundled shapes model)"
            )


def load_controlnet(path: str | Path, device: Any = "cpu") -> ControlNetHandle:
    """Read a ControlNet: a safetensors file in the original layout (keys `control_model.*` or bare)
    or a diffusers `ControlNetModel` folder; the architecture comes from the weights."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ControlNetError(f"{path}: a ControlNet folder needs config.json and diffusion_pytorch_model.safetensors")
        tensors, config, widths, hint_in = load_diffusers_controlnet(path)
    else:
        state = read_state_dict(path)
        tensors = state.sub(CONTROL_PREFIX) if state.has_prefix(CONTROL_PREFIX) else dict(state.tensors)
        if "input_hint_block.0.weight" not in tensors or "input_blocks.0.0.weight" not in tensors:
            raise ControlNetError(
                f"{path}: not a ControlNet (no control_model.input_hint_block / input_blocks weights); "
                "ControlNetLoader takes ControlNet files, CheckpointLoader takes checkpoints"
            )
        config = controlnet_config(tensors, state.metadata, path)
        try:
            widths, hint_in = detect_hint_channels(tensors)
        except ValueError as exc:
            raise ControlNetError(f"{path}: {exc}") from exc
    with torch.device("meta"):
        model = ControlNet(config, widths, hint_in)
    missing = sorted(set(model.state_dict()) - set(tensors))
    if missing:
        raise ControlNetError(f"{path}: ControlNet weights are missing {missing[:3]} (damaged or another layout)")
    try:
        model.load_state_dict({k: tensors[k] for k in model.state_dict()}, assign=True)
    except RuntimeError as exc:
        raise ControlNetError(f"{path}: weights do not match the detected architecture ({str(exc)[:200]})") from exc
    return ControlNetHandle(model.eval().requires_grad_(False).to(device), path.name)


class ControlNetApplied:
    """A `control` route contribution: one ControlNet with its hint image, strength and range.

    The hint (`[B, C, H, W]`, 0..1) is resized (bilinear) to the latent's pixel size (latent side
    times the ControlNet's downscale) and its batch matched to the latent's, once per shape.
    """

    def __init__(self, handle: ControlNetHandle, hint: Tensor, strength: float, start_percent: float,
                 end_percent: float) -> None:
        self.handle = handle
        self.hint = hint
        self.strength = float(strength)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self._hints: dict[tuple, Tensor] = {}

    def check_model(self, unet: nn.Module) -> None:
        self.handle.check_model(unet)

    def _fitted_hint(self, x: Tensor) -> Tensor:
        net = self.handle.control_model
        param = next(net.parameters())
        f = net.downscale
        key = (tuple(x.shape), param.device, param.dtype)
        if key not in self._hints:
            hint = self.hint.to(param.device, torch.float32)
            size = (x.shape[-2] * f, x.shape[-1] * f)
            if tuple(hint.shape[-2:]) != size:
                hint = torch.nn.functional.interpolate(hint, size=size, mode="bilinear", align_corners=False)
            batch = x.shape[0]
            if hint.shape[0] != batch:
                if batch % hint.shape[0]:
                    raise ControlNetError(
                        f"ControlNet hint has batch {hint.shape[0]} but the latent has batch {batch}; "
                        "use one hint image or one per image"
                    )
                hint = hint.repeat(batch // hint.shape[0], 1, 1, 1)
            self._hints = {key: hint.to(param.dtype)}
        return self._hints[key]

    def residuals(self, x: Tensor, t: Tensor, context: Tensor | None, y: Tensor | None) -> list[Tensor]:
        net = self.handle.control_model
        param = next(net.parameters())
        out = net(
            x[:, : net.in_channels].to(param.device, param.dtype),
            self._fitted_hint(x),
            t.to(param.device),
            context=None if net.context_dim is None or context is None else context.to(param.device),
            y=y if net.num_classes is not None else None,
        )
        return [r * self.strength for r in out]
