"""Precision as a choice: bf16 agrees with fp32, `auto` resolves per machine, the choice is recorded.

References: the same model in float32 (what bf16 approximates), and the CPU flags / CUDA
availability that `auto` reads, mocked so every branch is exercised on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmgraph.cli import main
from ldmgraph.graph.loading import load_workflow_file
from ldmgraph.models.precision import apply_precision, resolve_precision
from ldmgraph.models.unet import UNetModel

ROOT = Path(__file__).resolve().parents[2]
sys_path_helpers = str(Path(__file__).parent)


@pytest.mark.parametrize(
    ("flags", "cuda", "device", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, False, None, "bf16"),
        ({"amx_bf16", "amx_tile"}, False, "cpu", "bf16"),
        ({"avx2", "avx512f"}, False, None, "fp32"),
        (set(), True, None, "fp16"),
        ({"avx512_bf16"}, False, "cuda:1", "fp16"),
        ({"avx512_bf16"}, False, "mps", "fp32"),
    ],
)
def test_auto_picks_what_the_machine_supports(flags, cuda, device, expected):
    got = resolve_precision("auto", device, flags=lambda: flags, cuda_available=lambda: cuda)
    assert got == expected


def test_explicit_precisions_are_kept_and_bad_ones_refused():
    assert resolve_precision("fp32", flags=lambda: {"avx512_bf16"}, cuda_available=lambda: True) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8")


def test_tiny_unet_in_bf16_agrees_with_fp32():
    """An SD-shaped tiny U-Net: bf16 weights (time embedding kept fp32) vs fp32, relative error < 3%."""
    import sys

    sys.path.insert(0, sys_path_helpers)
    from model_helpers import tiny_unet

    torch.manual_seed(0)
    ref = UNetModel(**tiny_unet()).eval()
    for p in ref.out.parameters():  # the zero-initialised output conv would make every output 0
        torch.nn.init.normal_(p, std=0.05)
    low = UNetModel(**tiny_unet()).eval()
    low.load_state_dict(ref.state_dict())
    low.to(torch.bfloat16).keep_fp32()
    assert next(low.time_embed.parameters()).dtype == torch.float32
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 768)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        a, b = ref(x, t, context=context), low(x, t, context=context)
    assert b.dtype == torch.float32  # latents and sampler arithmetic stay fp32
    assert float((a - b).norm() / a.norm()) < 0.03


def _txt2img(tmp_path: Path, capsys, *extra: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    out = tmp_path / "-".join(extra or ("file",))
    code = main(["run", str(ROOT / "workflows/txt2img.json"), "--output-dir", str(out), "--no-progress",
                 "--set", "steps=6", *extra])
    capsys.readouterr()
    assert code == 0
    png = next(out.rglob("*.png"))
    return np.asarray(Image.open(png).convert("RGB")).astype(np.float64), load_workflow_file(png).document


def test_bundled_txt2img_in_bf16_matches_fp32_and_records_the_precision(tmp_path, capsys):
    reference, doc32 = _txt2img(tmp_path, capsys, "--precision", "fp32")
    image, doc16 = _txt2img(tmp_path, capsys, "--precision", "bf16")
    mse = ((image - reference) ** 2).mean()
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    assert psnr >= 30.0, psnr
    assert doc16["nodes"]["ckpt"]["inputs"]["dtype"] == "bf16"  # in the PNG: a re-run is exact
    assert doc32["nodes"]["ckpt"]["inputs"]["dtype"] == "fp32"


def test_auto_is_written_as_a_concrete_dtype(monkeypatch):
    import ldmgraph.models.precision as precision

    doc = json.loads((ROOT / "workflows/txt2img.json").read_text())
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "_cuda_available", lambda: False)
    assert apply_precision(doc, precision.resolve_precision("auto")) == 1
    assert doc["nodes"]["ckpt"]["inputs"]["dtype"] == "bf16"


def test_precision_is_part_of_the_cache_key(tmp_path):
    """Same document, another dtype: the loader runs again (a cached fp32 model is not reused)."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    doc = {"format": "ldmgraph/1", "nodes": {"ckpt": {"type": "VAELoader", "inputs": {
        "vae_name": "ldmgraph-shapes-txt2img.safetensors", "dtype": "fp32"}}}}
    env = Environment(output_dir=tmp_path, model_dirs=(ROOT / "ldmgraph/assets/models",))
    executor = Executor(load_registry(), env)
    first = executor.run(doc, outputs=["ckpt"])
    doc["nodes"]["ckpt"]["inputs"]["dtype"] = "bf16"
    second = executor.run(doc, outputs=["ckpt"])
    assert second.executed == ["ckpt"]
    assert first.outputs["ckpt"]["vae"].dtype == torch.float32
    assert second.outputs["ckpt"]["vae"].dtype == torch.bfloat16
