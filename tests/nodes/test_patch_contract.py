"""The model-patch contract a plugin builds on (`ldmgraph.models.patches`), on a tiny U-Net handle.

Each patch kind is checked against a closed form computed here without the patch machinery (torch
forward hooks, weights edited on a copy), and the restore is checked bit for bit, in float32,
float16 and bfloat16, with deltas large enough that many elements do not round back by themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ldmgraph.models.handles import DiffusionModelHandle
from ldmgraph.models.lora import DoraAdapter, LoraAdapter
from ldmgraph.models.patches import (
    AttentionPatch,
    BlockHook,
    SkipHook,
    WeightPatch,
    applied_patches,
    patch_scope,
    patched,
)
from ldmgraph.models.unet import UNetModel

TARGET = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
OTHER = "middle_block.1.transformer_blocks.0.ff.net.2.weight"


def tiny_handle(dtype: torch.dtype = torch.float32) -> DiffusionModelHandle:
    torch.manual_seed(0)
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=4, context_dim=16)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return DiffusionModelHandle(unet.to(dtype).eval())


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 5, 16, generator=g)


def lora(weight: torch.Tensor, seed: int, size: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(torch.randn(weight.shape[0], 3, generator=g) * size,
                       torch.randn(3, weight.shape[1], generator=g) * size, 0.7)


def state(handle: DiffusionModelHandle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in handle.diffusion_model.state_dict().items()}


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_patches_equal_edited_weights_and_restore_bit_for_bit(dtype):
    handle = tiny_handle(dtype)
    before = state(handle)
    weights = dict(handle.diffusion_model.named_parameters())
    patches = [WeightPatch(TARGET, lora(weights[TARGET].float(), 1), 1.3),
               WeightPatch(OTHER, lora(weights[OTHER].float(), 2, size=2.0), -0.8)]
    x, t, context = inputs()
    reference = copy.deepcopy(handle)  # the closed form: W + strength * up @ down * scale, rounded once
    for patch in patches:
        w = reference.diffusion_model.get_parameter(patch.target)
        a = patch.adapter
        w.copy_((w.float() + patch.strength * (a.up @ a.down) * a.scale).to(dtype))
    expected = reference.apply_model(x, t, context)
    got = patched(handle, patches).apply_model(x, t, context)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # the delta's rounding
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    assert not torch.allclose(got, handle.apply_model(x, t, context))
    assert applied_patches(handle.diffusion_model) == ()
    assert bit_equal(before, state(handle))
    assert torch.equal(handle.apply_model(x, t, context), copy.deepcopy(handle).apply_model(x, t, context))


@torch.no_grad()
def test_dora_is_kept_whole_and_restored_and_strength_zero_changes_nothing():
    handle = tiny_handle()
    before = state(handle)
    w = handle.diffusion_model.get_parameter(TARGET)
    dora = DoraAdapter(lora(w, 3), torch.rand(w.shape[0], 1) + 0.5)
    x, t, context = inputs()
    base = handle.apply_model(x, t, context)
    assert torch.equal(patched(handle, [WeightPatch(TARGET, dora, 0.0)]).apply_model(x, t, context), base)
    changed = patched(handle, [WeightPatch(TARGET, dora, 1.0)]).apply_model(x, t, context)
    assert not torch.allclose(changed, base)
    assert bit_equal(before, state(handle))


@torch.no_grad()
def test_stacked_weight_patches_commute_up_to_rounding():
    handle = tiny_handle()
    w = handle.diffusion_model.get_parameter(TARGET)
    a, b = WeightPatch(TARGET, lora(w, 4), 0.9), WeightPatch(TARGET, lora(w, 5), 1.7)
    x, t, context = inputs()
    ab = patched(patched(handle, [a]), [b]).apply_model(x, t, context)
    ba = patched(patched(handle, [b]), [a]).apply_model(x, t, context)
    assert (ab - ba).abs().max() <= 1e-5


@torch.no_grad()
def test_block_hooks_run_in_declared_order_like_forward_hooks():
    handle = tiny_handle()
    x, t, context = inputs()
    double = BlockHook("middle_block", "out", lambda h, info: h * 2)
    shift = BlockHook("middle_block", "out", lambda h, info: h + 1)
    seen: list[tuple[str, int, int]] = []
    spy = BlockHook("output_blocks", "in", lambda h, info: seen.append((info.where, info.index, info.up_index)) or h)

    def closed_form(fns):  # the same functions as a torch forward hook on the base module
        reference = copy.deepcopy(handle)
        hook = reference.diffusion_model.middle_block.register_forward_hook(
            lambda module, args, out: fns[1](fns[0](out)))
        try:
            return reference.apply_model(x, t, context)
        finally:
            hook.remove()

    assert torch.equal(patched(handle, [double, shift, spy]).apply_model(x, t, context),
                       closed_form([lambda h: h * 2, lambda h: h + 1]))
    assert torch.equal(patched(handle, [shift, double]).apply_model(x, t, context),
                       closed_form([lambda h: h + 1, lambda h: h * 2]))
    assert seen == [("output_blocks", 0, 0), ("output_blocks", 1, 0), ("output_blocks", 2, 1), ("output_blocks", 3, 1)]
    assert handle.diffusion_model.patch_hooks is None


@torch.no_grad()
def test_skip_hook_and_attention_patch_then_another_handle_sees_the_base():
    handle = tiny_handle()
    x, t, context = inputs()
    base = handle.apply_model(x, t, context)
    zero_skips = SkipHook(lambda h, skip, info: (h, skip * 0))
    uniform = AttentionPatch(lambda q, k, v, info: v.mean(dim=2, keepdim=True).expand_as(q), which="attn2")
    handle_b = patched(handle, [zero_skips, uniform])
    with patch_scope(handle_b):  # a sampler's scope: inside it, the base handle still gets the base
        changed = handle_b.apply_model(x, t, context)
        assert torch.equal(handle.apply_model(x, t, context), base)
        assert torch.equal(handle_b.apply_model(x, t, context), changed)
    assert not torch.allclose(changed, base)
    assert all(getattr(m, "attention_override", None) is None for m in handle.diffusion_model.modules())


@torch.no_grad()
def test_a_patch_that_fails_leaves_the_base_intact_and_a_changed_delta_is_caught():
    handle = tiny_handle()
    before = state(handle)
    w = handle.diffusion_model.get_parameter(TARGET)
    good = WeightPatch(TARGET, lora(w, 6), 1.0)
    with pytest.raises(KeyError, match="no_such.weight"):
        patched(handle, [good, WeightPatch("no_such.weight", lora(w, 7), 1.0)]).apply_model(*inputs())
    assert bit_equal(before, state(handle))

    class Drifting(LoraAdapter):  # a delta that computes differently the second time
        calls = 0

        def delta_into(self, weight, rows, out):
            type(self).calls += 1
            super().delta_into(weight, rows, out)
            return out.mul_(1.0 if type(self).calls == 1 else 1.001)

    drifting = Drifting(lora(w, 8).up, lora(w, 8).down, 1.0)
    with pytest.raises(RuntimeError, match="bit for bit"):
        patched(handle, [WeightPatch(TARGET, drifting, 1.0)]).apply_model(*inputs())


def test_patched_refuses_what_is_not_a_patch():
    with pytest.raises(TypeError, match="not a model patch"):
        patched(tiny_handle(), [object()])


@torch.no_grad()
def test_two_patched_text_encoders_share_one_state_and_take_turns():
    """Copies of one text encoder handle with different patches: inside one's scope the other
    restores first, so each encodes with exactly its own weights, and the base comes back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from model_helpers import clip_model

    from ldmgraph.models.text_encoders import clip_text_encoder_from_weights

    reference = clip_model(hidden=64, heads=4, layers=2, act="quick_gelu", seed=3)
    config = {k: getattr(reference.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act")}
    base = clip_text_encoder_from_weights({k: v.clone() for k, v in reference.state_dict().items()}, kind="clip-l",
                                          config_kwargs=config, path="tiny-clip")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    target = "transformer.encoder.layers.0.self_attn.q_proj.weight"
    w = base.get_parameter(target)
    a = patched(base, [WeightPatch(target, lora(w, 9), 1.0)])
    b = patched(base, [WeightPatch(target, lora(w, 10), 1.0)])
    alone_a, alone_b = a.encode(["a red cube"]).context, b.encode(["a red cube"]).context
    with patch_scope(a):
        assert torch.equal(b.encode(["a red cube"]).context, alone_b)
        assert torch.equal(a.encode(["a red cube"]).context, alone_a)
    assert not torch.equal(alone_a, alone_b)
    assert bit_equal(before, {k: v.clone() for k, v in base.state_dict().items()})
