"""Loading SDXL: full-size configs from key shapes (meta tensors, no memory), the autoencoder's dtype
and scale, text encoders on their own, U-Net-only files and fine-tunes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdxl_models as sm  # noqa: E402

from ldmgraph.models import sdxl  # noqa: E402
from ldmgraph.models.files import StateDict  # noqa: E402

# diffusers' published config.json values for the SDXL 1.0 base and refiner U-Nets
DIFFUSERS_SDXL: dict[str, dict[str, Any]] = {
    "base": dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "refiner": dict(
        in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[384, 768, 1536, 1536],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560),
}


def _meta_state(factory: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(factory(**kwargs).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_sdxl_full_size_unet_detected_and_mapped_like_diffusers(which):
    """diffusers' SDXL U-Net renamed by the key table fits our U-Net built from the detected config."""
    from diffusers import UNet2DConditionModel

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.detection import detect_unet_config
    from ldmgraph.models.unet import UNetModel

    released = sdxl.base_unet() if which == "base" else sdxl.refiner_unet()
    ours = _meta_state(UNetModel, **released)
    assert sum(t.numel() for t in ours.values()) == {"base": 2_567_463_684, "refiner": 2_259_526_660}[which]
    detected = detect_unet_config(ours, "meta")
    assert _meta_state(UNetModel, **detected).keys() == ours.keys()
    cfg = {"_class_name": "UNet2DConditionModel", **DIFFUSERS_SDXL[which]}
    theirs = _meta_state(UNet2DConditionModel, **DIFFUSERS_SDXL[which])
    renamed = dk.unet_from_diffusers(theirs, dk.unet_config_from_diffusers(cfg))
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sdxl_load")
    modules = sm.build(root)
    sm.write_single_file(root / "base.safetensors", modules["base"], refiner=False)
    return root, modules


def test_sdxl_fp16_load_keeps_the_autoencoder_in_float32_with_scale_013025(files):
    from ldmgraph.models.checkpoint import load_checkpoint

    root, _ = files
    for name in ("base.safetensors", "sdxl"):
        checkpoint = load_checkpoint(root / name, dtype="float16")
        assert checkpoint.unet.dtype == torch.float16
        assert checkpoint.vae.dtype == torch.float32  # SDXL's autoencoder overflows in fp16
        assert checkpoint.vae.scale_factor == pytest.approx(0.13025)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_sdxl_unet_only_files_are_detected_with_the_released_vector_layout(which):
    from ldmgraph.models.detection import detect
    from ldmgraph.models.unet import UNetModel

    released = sdxl.base_unet() if which == "base" else sdxl.refiner_unet()
    state = StateDict(Path(f"{which}.safetensors"), {
        "model.diffusion_model." + k: v for k, v in _meta_state(UNetModel, **released).items()})
    info = detect(state)
    assert info.architecture == f"sdxl-{which}" and info.text_encoder is None
    numbers = 6 if which == "base" else 5
    assert info.metadata["vector_layout"] == {
        "numbers": list(sdxl.BASE_NUMBERS if which == "base" else sdxl.REFINER_NUMBERS),
        "pooled_dim": 1280, "fourier_dim": 256}
    assert info.unet["adm_in_channels"] == 1280 + numbers * 256


def test_sdxl_text_encoder_loads_alone_from_a_checkpoint(files):
    from ldmgraph.models.checkpoint import load_checkpoint, load_text_encoder

    root, _ = files
    encoder = load_text_encoder(root / "base.safetensors")
    plain = load_checkpoint(root / "base.safetensors").text_encoder
    assert type(encoder).__name__ == "SDXLTextEncoder" and encoder.context_dim == 128
    assert torch.equal(encoder.encode(["a cat"]).context, plain.encode(["a cat"]).context)


def test_sdxl_readme_and_docs_name_every_refused_family():
    from ldmgraph.models.families import FAMILIES

    root = Path(__file__).resolve().parents[2]
    pages = [(root / "README.md").read_text(encoding="utf-8"), (root / "docs" / "sdxl.md").read_text(encoding="utf-8")]
    refused = [f.label for f in FAMILIES if not f.supported]
    assert len(refused) >= 6
    assert [(label, i) for label in refused for i, page in enumerate(pages) if label not in page] == []


def test_sdxl_micro_conditioning_is_replaced_and_other_vector_contributions_add():
    """Through the conditioner contract's `add_contribution`: a later size conditioning replaces an
    earlier one; a plugin's tensor on the vector route adds to the resolved features."""
    from ldmgraph.conditioners import CondEntry, add_contribution

    layout = sdxl.VectorLayout(sdxl.BASE_NUMBERS, 4, 2)
    pooled = torch.arange(4.0)[None]
    entry = add_contribution(CondEntry(pooled=pooled), "vector", sdxl.MicroConditioning(16, 16))
    replaced = add_contribution(entry, "vector", sdxl.MicroConditioning(8, 8))
    extra = torch.full((1, layout.width), 0.5)
    added = add_contribution(replaced, "vector", extra)

    def expected(height: int, width: int) -> torch.Tensor:
        numbers = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return torch.cat([pooled, sdxl.fourier_features(numbers, 2)], dim=1)

    assert torch.allclose(layout.vector(pooled, entry.vector, (9, 9), False), expected(16, 16))
    assert torch.allclose(layout.vector(pooled, replaced.vector, (9, 9), False), expected(8, 8))
    assert torch.allclose(layout.vector(pooled, added.vector, (9, 9), False), expected(8, 8) + 0.5)
    assert torch.allclose(layout.vector(pooled, None, (2, 3), False), expected(16, 24))  # latent x 8
