"""`ldmgraph convert`: Lightning checkpoints convert bit for bit; code-carrying pickles are refused by name
and never run (a marker file that each malicious pickle would create never appears)."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ldmgraph.cli import main

# --- a Lightning-style checkpoint, built the way Lightning saves one -------------------------------


class ModelCheckpoint:  # pickled as a global of a "pytorch_lightning" module (see _lightning_module)
    def __init__(self) -> None:
        self.best = 0.5


class AttributeDict(dict):  # pickled as pytorch_lightning.utilities.parsing.AttributeDict
    pass


def _lightning_module() -> Any:
    """Put ModelCheckpoint and an AttributeDict under pytorch_lightning.* names for pickling."""
    import types

    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        sys.modules.setdefault(name, types.ModuleType(name))
    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]

    AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
    AttributeDict.__qualname__ = "AttributeDict"
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict  # type: ignore[attr-defined]
    return AttributeDict


def lightning_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    attribute_dict: Any = _lightning_module()
    g = torch.Generator().manual_seed(0)
    weights = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half(),
        "first_stage_model.quantize.embedding.weight": torch.randn(16, 3, generator=g).bfloat16(),
        "cond_stage_model.embedding.weight": torch.randn(11, 5, generator=g),
        "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
        "scale_factor": torch.tensor(1.0),
        "betas": torch.linspace(0, 1, 10, dtype=torch.float64),
        "mask": torch.tensor([True, False]),
    }
    base = torch.randn(6, 6, generator=g)
    weights["model.diffusion_model.tied.weight"] = base
    weights["model.diffusion_model.transposed.weight"] = base.t()  # a view with strides, sharing memory
    weights["model.diffusion_model.slice.weight"] = base[2:4]
    state = dict(weights)
    checkpoint = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "obj": ModelCheckpoint()}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
        "hyper_parameters": attribute_dict(lr=1e-4),
    }
    torch.save(checkpoint, path)
    return {k: v.clone() for k, v in weights.items()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else (
        t.numpy().tobytes())


def test_lightning_checkpoint_converts_bit_identically(tmp_path: Path, capsys: Any) -> None:
    ckpt = tmp_path / "last.ckpt"
    expected = lightning_checkpoint(ckpt)
    (tmp_path / "config.yaml").write_text(CONFIG)
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(ckpt), "-o", str(out)]) == 0
    assert "config.yaml" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name, tensor in expected.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert _bits(got) == _bits(tensor), name
        assert "n_embed: 16" in f.metadata()["ldm_config"]


def test_run_refuses_pickles_and_points_to_convert(tmp_path: Path) -> None:
    from ldmgraph.models.files import PickleRefusedError, read_state_dict

    ckpt = tmp_path / "model.ckpt"
    lightning_checkpoint(ckpt)
    with pytest.raises(PickleRefusedError) as error:
        read_state_dict(ckpt)
    assert f"ldmgraph convert '{ckpt}'" in str(error.value) and "model.converted.safetensors" in str(error.value)


# --- malicious pickles ------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> Any:
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, Any]:
    cmd = f"touch {marker}"
    return {
        f"{os.system.__module__}.system": _Reduce(os.system, (cmd,)),
        "builtins.eval": _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        "builtins.exec": _Reduce(builtins.exec, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.call": _Reduce(subprocess.call, (["touch", str(marker)],)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(marker)],)),
        "builtins.getattr": _Reduce(builtins.getattr, (_Reduce(builtins.__import__, ("os",)), "system")),
        "builtins.__import__": _Reduce(builtins.__import__, ("os",)),
    }


def _zip_checkpoint(path: Path, payload: Any) -> None:
    """A torch.save-shaped zip whose data.pkl holds the payload inside a normal-looking dict."""
    data = pickle.dumps({"state_dict": {"w": payload}}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _raw_getattr_chain_pickle(marker: Path) -> bytes:
    """Hand-written opcodes: getattr(__import__('os'), 'system')('touch marker')."""
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + f"touch {marker}".encode()
        + b"\ntR."
    )


@pytest.mark.parametrize("container", ["zip", "plain"])
def test_code_carrying_pickles_are_refused_by_name_and_never_run(tmp_path: Path, container: str, capsys: Any) -> None:
    marker = tmp_path / "PWNED"
    cases = {**_payloads(marker), "builtins.getattr chain": _raw_getattr_chain_pickle(marker)}
    for label, payload in cases.items():
        ckpt = tmp_path / f"evil-{label.replace(' ', '_')}-{container}.ckpt"
        if isinstance(payload, bytes):
            if container == "zip":
                with zipfile.ZipFile(ckpt, "w") as z:
                    z.writestr("archive/data.pkl", payload)
            else:
                ckpt.write_bytes(payload)
        elif container == "zip":
            _zip_checkpoint(ckpt, payload)
        else:
            ckpt.write_bytes(pickle.dumps({"state_dict": {"w": payload}}, protocol=2))
        out = tmp_path / "out.safetensors"
        assert main(["convert", str(ckpt), "-o", str(out), "--json"]) == 2, label
        report = json.loads(capsys.readouterr().out)
        wanted = "builtins.getattr" if label.endswith("chain") else label
        assert report["ok"] is False and f"'{wanted}'" in report["error"] and "refused" in report["error"], label
        assert not marker.exists(), f"{label}: the pickle ran code"
        assert not out.exists()


def test_reduce_tricks_through_allowed_names_cannot_smuggle_a_call(tmp_path: Path, capsys: Any) -> None:
    """A payload hidden in the arguments of an allowed or stand-in callable is still refused by name."""
    _lightning_module()
    marker = tmp_path / "PWNED"
    system = _Reduce(os.system, (f"touch {marker}",))
    for i, payload in enumerate([_Reduce(ModelCheckpoint, (system,)), _Reduce(OrderedDict, ([("k", system)],))]):
        ckpt = tmp_path / f"evil{i}.ckpt"
        _zip_checkpoint(ckpt, payload)
        assert main(["convert", str(ckpt), "-o", str(tmp_path / "o.safetensors")]) == 2
        assert f"'{os.system.__module__}.system'" in capsys.readouterr().err
        assert not marker.exists()


def test_convert_reports_missing_and_non_checkpoint_files(tmp_path: Path, capsys: Any) -> None:
    assert main(["convert", str(tmp_path / "nope.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err
    plain = tmp_path / "list.ckpt"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    assert main(["convert", str(plain)]) == 2
    assert "not a torch checkpoint" in capsys.readouterr().err
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}}, buf)
    good = tmp_path / "good.ckpt"
    good.write_bytes(buf.getvalue())
    assert main(["convert", str(good)]) == 0
    assert (tmp_path / "good.converted.safetensors").is_file()
    assert main(["convert", str(good)]) == 2  # never over an existing file
    assert "exists already" in capsys.readouterr().err


CONFIG = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    timesteps: 1000
    channels: 3
    cond_stage_key: class_label
    conditioning_key: crossattn
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 8
        attention_resolutions: [1]
        num_res_blocks: 1
        channel_mult: [1]
        num_head_channels: 4
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 5
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 16
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        n_classes: 11
        embed_dim: 5
"""


def test_only_the_weights_storages_are_read(tmp_path: Path, capsys: Any) -> None:
    """An optimizer state's storage missing from the zip does not matter; a weight's does, by name."""
    ckpt = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0)}, "optimizer_states": [{"exp_avg": torch.ones(1000)}]}, ckpt)
    with zipfile.ZipFile(ckpt) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    sizes = {n: len(b) for n, b in entries.items() if "/data/" in n}
    optimizer = max(sizes, key=lambda n: sizes[n])
    weights = min(sizes, key=lambda n: sizes[n])
    for dropped, ok in ((optimizer, True), (weights, False)):
        broken = tmp_path / f"broken-{ok}.ckpt"
        with zipfile.ZipFile(broken, "w") as z:
            for name, data in entries.items():
                if name != dropped:
                    z.writestr(name, data)
        code = main(["convert", str(broken), "-o", str(tmp_path / f"out-{ok}.safetensors")])
        err = capsys.readouterr().err
        assert (code == 0) == ok, err
        if not ok:
            assert "missing from the archive" in err
