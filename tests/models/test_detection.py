"""Architecture detection over generated checkpoints of every supported kind, and the loader's errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import (
    TINY_VAE,
    bundled_metadata,
    clip_model,
    clip_openclip_keys,
    clip_sd1_keys,
    ldm_bert_keys,
    prefixed,
    tiny_sd2_unet,
    tiny_unet,
    unet_state,
    vae_state,
    write,
)

from ldmgraph.graph.errors import LdmGraphError
from ldmgraph.models.checkpoint import (
    CorruptCheckpointError,
    MissingKeysError,
    ModelFileNotFoundError,
    PickleRefusedError,
    UnexpectedKeysError,
    UnknownArchitectureError,
    detect,
    load_checkpoint,
    read_state_dict,
)

VAE_F4_Z3: dict[str, Any] = {
    "ddconfig": {**TINY_VAE["ddconfig"], "z_channels": 3, "ch_mult": [1, 2, 2]},
    "embed_dim": 3,
}


@functools.cache
def _sd1_text() -> dict[str, torch.Tensor]:
    return clip_sd1_keys(clip_model(hidden=768, layers=1, vocab=64))


@functools.cache
def _sd2_text() -> dict[str, torch.Tensor]:
    return clip_openclip_keys(clip_model(hidden=1024, layers=1, vocab=64, act="gelu"))


# (name, unet config, vae config, text weights factory, metadata, expected fields)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], Any, dict[str, str] | None, dict[str, Any]]] = [
    (
        "sd1",
        tiny_unet(),
        TINY_VAE,
        _sd1_text,
        None,
        {"architecture": "sd1", "concat_kind": None, "prediction_type": "eps", "text": "clip-l"},
    ),
    (
        "sd1-inpaint",
        tiny_unet(in_channels=9),
        TINY_VAE,
        _sd1_text,
        None,
        {"architecture": "sd1-inpaint", "concat_kind": "inpaint-mask-latent", "text": "clip-l"},
    ),
    (
        "sd2",
        tiny_sd2_unet(),
        TINY_VAE,
        _sd2_text,
        None,
        {
            "architecture": "sd2",
            "prediction_type": "eps",
            "prediction_type_source": "default",
            "text": "openclip-h",
        },
    ),
    (
        "sd2-v-modelspec",
        tiny_sd2_unet(),
        TINY_VAE,
        _sd2_text,
        {"modelspec.prediction_type": "v"},
        {"architecture": "sd2", "prediction_type": "v", "prediction_type_source": "modelspec metadata"},
    ),
    (
        "sd2-inpaint",
        tiny_sd2_unet(in_channels=9),
        TINY_VAE,
        _sd2_text,
        None,
        {"architecture": "sd2-inpaint", "concat_kind": "inpaint-mask-latent"},
    ),
    (
        "ldm-inpaint-7ch",
        tiny_unet(in_channels=7, out_channels=3, context_dim=None),
        VAE_F4_Z3,
        None,
        None,
        {"architecture": "ldm-concat", "concat_kind": "inpaint-mask-latent", "text": None},
    ),
    (
        "ldm-superres-6ch",
        tiny_unet(in_channels=6, out_channels=3, context_dim=None),
        VAE_F4_Z3,
        None,
        None,
        {"architecture": "ldm-concat", "concat_kind": "lowres-image"},
    ),
    (
        "ldm-txt2img",
        tiny_unet(context_dim=64),
        TINY_VAE,
        ldm_bert_keys,
        None,
        {"architecture": "ldm-txt2img", "text": "ldm-bert"},
    ),
    (
        "bundled",
        tiny_unet(context_dim=384),
        TINY_VAE,
        None,
        bundled_metadata(tiny_unet(context_dim=384)),
        {"architecture": "bundled-txt2img", "layout": "bundled", "scale_factor": 0.5, "text": "minilm-l6-v2"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_detection_table(tmp_path: Path, case: Any) -> None:
    """Each kind is named right, its U-Net/VAE configs rebuild the exact file, and it loads."""
    name, unet_cfg, vae_cfg, text, metadata, expected = case
    unet_sd = unet_state(unet_cfg)
    tensors = {
        **prefixed("model.diffusion_model.", unet_sd),
        **prefixed("first_stage_model.", vae_state(vae_cfg)),
    }
    if text is not None:
        tensors.update(text())
    path = write(tmp_path / f"{name}.safetensors", tensors, metadata)

    info = detect(read_state_dict(path))
    assert info.architecture == expected["architecture"]
    for key in ("concat_kind", "prediction_type", "prediction_type_source", "layout", "scale_factor"):
        if key in expected:
            assert getattr(info, key) == expected[key], key
    if "text" in expected:
        assert (info.text_encoder or {}).get("kind") == expected["text"]
    for key in (
        "in_channels",
        "out_channels",
        "model_channels",
        "channel_mult",
        "context_dim",
        "use_linear_in_transformer",
        "attention_resolutions",
    ):
        assert info.unet is not None and info.unet[key] == unet_cfg[key], key
    assert info.vae is not None and info.vae["ddconfig"]["ch_mult"] == vae_cfg["ddconfig"]["ch_mult"]

    ckpt = load_checkpoint(path, text_encoder=False)
    assert ckpt.unet is not None and ckpt.vae is not None
    loaded = ckpt.unet.diffusion_model.state_dict()
    assert set(loaded) == set(unet_sd)
    assert all(torch.equal(loaded[k], unet_sd[k]) for k in unet_sd)
    assert ckpt.unet.in_channels == unet_cfg["in_channels"]
    assert ckpt.vae.downscale == 2 ** (len(vae_cfg["ddconfig"]["ch_mult"]) - 1)


def test_sd2_v_needs_override_and_gets_it(tmp_path: Path) -> None:
    """768-v files cannot be told from weights: the default is eps, the argument wins (and is recorded)."""
    tensors = {**prefixed("model.diffusion_model.", unet_state(tiny_sd2_unet())), **_sd2_text()}
    path = write(tmp_path / "sd2-768-v.safetensors", tensors)
    assert detect(read_state_dict(path)).prediction_type == "eps"
    ckpt = load_checkpoint(path, prediction_type="v", text_encoder=False)
    assert ckpt.unet.prediction_type == "v"
    assert ckpt.info.prediction_type_source == "argument"


def test_fp16_weights_stay_fp16_unless_asked(tmp_path: Path) -> None:
    tensors = prefixed("model.diffusion_model.", unet_state(tiny_unet(), dtype=torch.float16))
    path = write(tmp_path / "half.safetensors", tensors)
    ckpt = load_checkpoint(path)
    assert ckpt.unet.dtype == torch.float16 and ckpt.info.dtype == "float16"
    assert ckpt.vae is None and ckpt.text_encoder is None
    assert load_checkpoint(path, dtype="float32").unet.dtype == torch.float32


def test_weights_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    """The loaded parameters are the file's bytes (a read-only memory map), not a private copy."""
    sd = unet_state(tiny_unet())
    path = write(tmp_path / "mm.safetensors", prefixed("model.diffusion_model.", sd))
    state = read_state_dict(path)
    ckpt = load_checkpoint(path)
    weight = ckpt.unet.diffusion_model.input_blocks[0][0].weight
    source = state.tensors["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(weight, source)
    assert not weight.untyped_storage().resizable()  # mmap-backed storages cannot be resized


def test_bundled_metadata_configs_win(tmp_path: Path) -> None:
    """A bundled file carries its configs and schedule; the U-Net uses them (here: 4 heads, not the default 8)."""
    unet_cfg = tiny_unet(context_dim=384, num_heads=4)
    meta = bundled_metadata(unet_cfg)
    path = write(
        tmp_path / "b.safetensors",
        {
            **prefixed("model.diffusion_model.", unet_state(unet_cfg)),
            **prefixed("first_stage_model.", vae_state()),
        },
        meta,
    )
    ckpt = load_checkpoint(path, text_encoder=False)
    assert ckpt.info.unet["num_heads"] == 4
    assert ckpt.unet.schedule == json.loads(meta["ldmgraph"])["schedule"]
    assert ckpt.vae.scale_factor == 0.5


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path: Path, sd1_file: Path) -> None:
    data = sd1_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"cut\.safetensors.*(truncated|damaged)") as err:
        load_checkpoint(cut)
    assert isinstance(err.value, LdmGraphError)


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CorruptCheckpointError, match="garbage.safetensors"):
        load_checkpoint(bad)


def test_pickle_refused_with_conversion_hint_then_opt_in(tmp_path: Path) -> None:
    tensors = prefixed("model.diffusion_model.", unet_state(tiny_unet()))
    ckpt_path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tensors, "global_step": 3}, ckpt_path)
    with pytest.raises(PickleRefusedError) as err:
        load_checkpoint(ckpt_path)
    message = str(err.value)
    assert "old.ckpt" in message and "weights_only=True" in message and "old.converted.safetensors" in message
    assert "allow_pickle=True" in message
    ckpt = load_checkpoint(ckpt_path, allow_pickle=True)
    assert ckpt.info.architecture == "ldm" and ckpt.unet is not None


def test_pickle_disguised_as_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sneaky.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(PickleRefusedError, match="sneaky.safetensors"):
        load_checkpoint(path)


def test_random_tensors_are_unknown_architecture(tmp_path: Path) -> None:
    path = write(tmp_path / "random.safetensors", {"foo": torch.randn(3, 4), "bar.weight": torch.randn(7)})
    with pytest.raises(
        UnknownArchitectureError, match=r"random\.safetensors.*not a latent-diffusion checkpoint"
    ):
        load_checkpoint(path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    tensors = prefixed("model.diffusion_model.", unet_state(tiny_unet()))
    del tensors["model.diffusion_model.input_blocks.1.0.in_layers.2.bias"]
    path = write(tmp_path / "holey.safetensors", tensors)
    with pytest.raises(
        MissingKeysError, match=r"holey\.safetensors: U-Net: 1 weight\(s\) missing \(input_blocks\.1\.0"
    ):
        load_checkpoint(path)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    tensors = prefixed("model.diffusion_model.", unet_state(tiny_unet()))
    tensors["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    path = write(tmp_path / "extra.safetensors", tensors)
    with pytest.raises(UnexpectedKeysError, match=r"extra\.safetensors: U-Net: .*extra_head\.weight"):
        load_checkpoint(path)


def test_standalone_vae_is_pointed_to_the_vae_loader(tmp_path: Path) -> None:
    path = write(tmp_path / "vae.safetensors", vae_state())
    with pytest.raises(UnknownArchitectureError, match="standalone VAE"):
        load_checkpoint(path)


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickling ran code",))


def test_opted_in_pickle_still_cannot_run_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """allow_pickle=True uses weights_only=True: a pickle that calls a function is refused, nothing runs."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _RunsCode()}}, path)
    with pytest.raises(CorruptCheckpointError, match=r"evil\.ckpt.*weights_only=True"):
        load_checkpoint(path, allow_pickle=True)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_legacy_non_zip_pickle_loads_when_opted_in(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(
        prefixed("model.diffusion_model.", unet_state(tiny_unet())),
        path,
        _use_new_zipfile_serialization=False,
    )
    assert load_checkpoint(path, allow_pickle=True).unet.in_channels == 4


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpaint"])
def test_full_size_stable_diffusion_shapes_detect_exactly(family: str) -> None:
    """Real SD 1.x / 2.x key sets and shapes (meta tensors: no memory) give back the released configs."""
    from ldmgraph.models import configs
    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.checkpoint import StateDict
    from ldmgraph.models.text_encoders import build_clip_text_model, clip_config
    from ldmgraph.models.unet import UNetModel

    unet_cfg = {
        "sd1": configs.sd1_unet(),
        "sd2": configs.sd2_unet(),
        "sd1-inpaint": configs.sd1_inpaint_unet(),
    }[family]
    variant = "openclip-h" if family == "sd2" else "clip-l"
    with torch.device("meta"):
        unet = UNetModel(**unet_cfg)
        vae = AutoencoderKL(**configs.sd_vae())
        text = build_clip_text_model(clip_config(variant))
    tensors = {
        **prefixed("model.diffusion_model.", unet.state_dict()),
        **prefixed("first_stage_model.", vae.state_dict()),
    }
    if variant == "clip-l":
        tensors.update(clip_sd1_keys_meta(text))
    else:
        tensors.update(clip_openclip_keys_meta(text))
    info = detect(StateDict(Path(f"{family}.safetensors"), tensors))
    assert info.architecture == family
    expected = dict(unet_cfg, attention_resolutions=sorted(unet_cfg["attention_resolutions"]))
    assert {k: info.unet[k] for k in expected} == expected
    assert info.vae == configs.sd_vae()
    te = info.text_encoder["config"]
    ref = clip_config(variant)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
        assert te[key] == getattr(ref, key), key


def clip_sd1_keys_meta(model: Any) -> dict[str, torch.Tensor]:
    return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in model.state_dict().items()}


def clip_openclip_keys_meta(model: Any) -> dict[str, torch.Tensor]:
    """OpenCLIP key names and shapes (fused in_proj [3D, D]) for a meta CLIPTextModel."""
    cfg, p = model.config, "cond_stage_model.model."
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    meta = torch.device("meta")
    out = {
        p + "token_embedding.weight": torch.empty(cfg.vocab_size, d, device=meta),
        p + "positional_embedding": torch.empty(77, d, device=meta),
        p + "ln_final.weight": torch.empty(d, device=meta),
        p + "ln_final.bias": torch.empty(d, device=meta),
    }
    for i in range(layers):
        r = f"{p}transformer.resblocks.{i}."
        out[r + "attn.in_proj_weight"] = torch.empty(3 * d, d, device=meta)
        out[r + "mlp.c_fc.weight"] = torch.empty(cfg.intermediate_size, d, device=meta)
    return out
