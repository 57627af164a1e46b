"""Every broken-model case gets one typed error naming the file and the cause, in a few lines:
at validation (exit 2, code bad_model / pickle_checkpoint, nothing run) and from the loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldmgraph.cli import main
from ldmgraph.models.checkpoint import load_checkpoint
from ldmgraph.models.errors import (
    BadMetadataError,
    BadWeightError,
    MissingKeysError,
    PickleRefusedError,
)

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "ldmgraph" / "assets" / "models" / "ldmgraph-shapes-txt2img.safetensors"
WORKFLOW = REPO / "workflows" / "txt2img.json"
UNET = "model.diffusion_model."

pytestmark = pytest.mark.skipif(not BUNDLED.is_file(), reason="needs the bundled models")


def bundled() -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(BUNDLED), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ldmgraph"])


def save(folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict | None) -> Path:
    path = folder / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"ldmgraph": json.dumps(meta)} if meta is not None else None)
    return path


def no_unet_metadata(folder: Path) -> Path:
    tensors, meta = bundled()
    del meta["unet"]
    return save(folder, "no-unet.safetensors", tensors, meta)


def bad_schedule(folder: Path) -> Path:
    tensors, meta = bundled()
    meta["schedule"] = {"beta_schedule": "linear", "linear_start": 0.5, "linear_end": 0.1, "timesteps": 1000}
    return save(folder, "bad-schedule.safetensors", tensors, meta)


def one_d_conv_in(folder: Path) -> Path:
    tensors, meta = bundled()
    tensors[UNET + "input_blocks.0.0.weight"] = tensors[UNET + "input_blocks.0.0.weight"].flatten()
    return save(folder, "flat-conv.safetensors", tensors, meta)


def zero_channels(folder: Path) -> Path:
    tensors, _ = bundled()  # the original layout (no metadata): the config comes from the shapes
    tensors[UNET + "input_blocks.0.0.weight"] = torch.zeros(0, 4, 3, 3)
    return save(folder, "zero-channels.safetensors", tensors, None)


def missing_blocks(folder: Path) -> Path:
    tensors, meta = bundled()
    tensors = {k: v for k, v in tensors.items() if not k.startswith(UNET + "output_blocks.2.")}
    return save(folder, "missing-blocks.safetensors", tensors, meta)


def dtype_lie(folder: Path) -> Path:
    """Every float32 tensor relabelled float16: the bytes fit, the shapes (last axis doubled) do not."""
    tensors, meta = bundled()
    lied = {k: v.contiguous().view(torch.float16) if v.dtype == torch.float32 and v.dim() else v
            for k, v in tensors.items()}
    return save(folder, "dtype-lie.safetensors", lied, meta)


def diffusers_wrong_types(folder: Path) -> Path:
    path = folder / "wrong-types"
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    (path / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "block_out_channels": ["32", "64"], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "cross_attention_dim": 32}))
    return path


CASES = {
    no_unet_metadata: (BadMetadataError, "'unet'"),
    bad_schedule: (BadMetadataError, "noise schedule"),
    one_d_conv_in: (BadWeightError, "input_blocks.0.0.weight"),
    zero_channels: (BadWeightError, "no zero sizes"),
    missing_blocks: (MissingKeysError, "output_blocks.2."),
    dtype_lie: (BadWeightError, "[32, 4, 3, 3]"),
    diffusers_wrong_types: (BadMetadataError, "block_out_channels"),
}


@pytest.mark.parametrize("make", list(CASES), ids=[f.__name__ for f in CASES])
def test_broken_model_is_refused_at_validation_with_file_and_cause(make, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    path = make(models)
    error_type, cause = CASES[make]
    out = tmp_path / "out"
    code = main(["validate", str(WORKFLOW), "--json", "--models-dir", str(models), "--set",
                 f"ckpt_name={path.name}", "--output-dir", str(out)])
    assert code == 2
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert (problem["node_id"], problem["input"], problem["code"]) == ("ckpt", "ckpt_name", "bad_model")
    assert error_type.__name__ in problem["message"] and path.name in problem["message"]
    assert cause in problem["message"] and len(problem["message"]) < 700
    with pytest.raises(error_type) as error:  # the loader says the same, for API callers
        load_checkpoint(path)
    assert str(path) in str(error.value) and len(str(error.value)) < 700
    assert not out.exists()


def test_a_pickle_is_reported_at_validation_and_converts_beside_itself(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    tensors, _ = bundled()
    pickle = models / "model.safetensors"  # a pickle under a safetensors name
    torch.save({"state_dict": tensors}, pickle)
    before = pickle.read_bytes()
    code = main(["validate", str(WORKFLOW), "--json", "--models-dir", str(models), "--set",
                 "ckpt_name=model.safetensors"])
    assert code == 2
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["code"] == "pickle_checkpoint" and "model.converted.safetensors" in problem["message"]
    assert "python -m ldmgraph.models.convert" in problem["message"]
    with pytest.raises(PickleRefusedError):
        load_checkpoint(pickle)
    command = [sys.executable, "-m", "ldmgraph.models.convert", str(pickle)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert pickle.read_bytes() == before  # the input is never overwritten
    converted = models / "model.converted.safetensors"
    with safe_open(str(converted), "pt") as f:
        assert set(f.keys()) == set(tensors)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "exists already" in again.stderr


def test_a_checkpoint_linked_into_the_models_folder_from_elsewhere_is_followed(tmp_path, capsys):
    models, elsewhere = tmp_path / "models", tmp_path / "other-disk"
    models.mkdir()
    elsewhere.mkdir()
    (elsewhere / "real.safetensors").symlink_to(BUNDLED)
    (models / "linked.safetensors").symlink_to(elsewhere / "real.safetensors")
    code = main(["validate", str(WORKFLOW), "--models-dir", str(models), "--set", "ckpt_name=linked.safetensors"])
    assert code == 0, capsys.readouterr().err
    code = main(["validate", str(WORKFLOW), "--models-dir", str(models), "--set",
                 "ckpt_name=../other-disk/real.safetensors"])
    assert code == 2  # names still may not leave the folder
    assert "unsafe_path" in capsys.readouterr().err
