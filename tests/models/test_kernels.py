"""CPU kernel choices give the same results as the plain layers, and released pages read back intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldmgraph.models import kernels, pages
from ldmgraph.models.kernels import SMALL_MAP_ROWS, Conv2d, conv_as_matmul


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("stride, side", [(1, 4), (1, 8), (2, 8), (1, 5)])
def test_small_map_conv_matches_direct_convolution(
    dtype: torch.dtype, tol: float, stride: int, side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "SMALL_MAP_MIN_WEIGHT", 0)  # this small layer takes the product path too
    torch.manual_seed(0)
    conv = Conv2d(48, 40, 3, stride=stride, padding=1).to(dtype).requires_grad_(False)
    x = torch.randn(2, 48, side, side).to(dtype)
    reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, 1)
    out = conv(x)
    assert out.dtype == dtype and out.shape == reference.shape and out.is_contiguous()
    assert float((out.double() - reference).abs().max() / reference.abs().max()) < tol
    # the same layer on a big map takes the direct path and agrees too
    big = torch.randn(2, 48, 16, 16).to(dtype)
    assert 2 * 16 * 16 > SMALL_MAP_ROWS
    ref_big = F.conv2d(big.double(), conv.weight.double(), conv.bias.double(), stride, 1)
    assert float((conv(big).double() - ref_big).abs().max() / ref_big.abs().max()) < tol


def test_conv_as_matmul_without_bias() -> None:
    torch.manual_seed(1)
    conv = Conv2d(8, 6, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(1, 8, 3, 7)
    assert torch.allclose(conv_as_matmul(x, conv), F.conv2d(x, conv.weight, None, 1, 1), atol=1e-5)


def test_released_pages_of_a_mapped_file_read_back_intact(tmp_path) -> None:
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    values = torch.arange(3 * 2**20, dtype=torch.float32).reshape(3, -1)
    save_file({"w": values}, str(path))
    with safe_open(str(path), framework="pt") as f:
        mapped = f.get_tensor("w")
        ranges = pages.file_ranges(path)
        if not ranges:
            pytest.skip("safetensors did not memory-map the file here")
        assert pages.release(mapped, ranges)
        assert torch.equal(mapped, values)  # faulted in again from the file
    anonymous = values.clone()
    assert not pages.release(anonymous, ranges)  # never anonymous memory
    assert torch.equal(anonymous, values)


def test_small_maps_take_the_product_path_only_for_large_weights() -> None:
    """SD's deepest levels (1280 channels) do; a small model's (256 channels) stay direct, where
    oneDNN is faster."""
    sd = torch.nn.Conv2d(1280, 1280, 3, padding=1, device="meta")
    small = torch.nn.Conv2d(256, 256, 3, padding=1, device="meta")
    assert kernels._small_map(torch.zeros(2, 1280, 4, 4), sd)
    assert not kernels._small_map(torch.zeros(2, 256, 4, 4), small)
