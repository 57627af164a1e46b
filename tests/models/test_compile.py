"""`--compile` on the CPU: the U-Net through torch.compile gives eager's image, compiles once per
shape for a whole session, and falls back to eager with one line where compiling cannot work.

Every workflow runs through the Executor on the bundled text-to-image model; the reference is the
same workflow in a session without compile. The fast tests use dynamo's "eager" backend (graph
capture, guards and recompilation are dynamo's, the kernels eager's: no C++ compiler needed, a few
seconds on two shared cores); inductor's C++ backend, the one `--compile` picks on a CPU, runs in
the slow test.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_offload  # noqa: E402
from test_offload import executor, image, txt2img  # noqa: E402

models_dir = test_offload.models_dir  # the offload tests' fixtures: tiny checkpoints and one registry
registry = test_offload.registry

from ldmgraph.models.compile import CompileOptions, compiled_call  # noqa: E402
from ldmgraph.models.manager import ModelRuntime  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def reference(registry, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    return image(executor(registry, models_dir, tmp_path_factory.mktemp("ref"), None), txt2img())


def unet_of(ex) -> torch.nn.Module:
    return ex.run(txt2img(), outputs=["ckpt"]).outputs["ckpt"]["model"].diffusion_model


@pytest.fixture(scope="module")
def compiled_session(registry, models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One session with --compile (dynamo's eager backend): two jobs, the second with another seed."""
    runtime = ModelRuntime(compile=True, compile_options=CompileOptions(backend="eager"))
    ex = executor(registry, models_dir, tmp_path_factory.mktemp("compiled"), runtime)
    first = image(ex, txt2img())
    call = compiled_call(unet_of(ex))
    after_first = (call.compilations, len(call.signatures)) if call else None
    doc = txt2img()
    doc["nodes"]["sample"]["inputs"]["seed"] = 4
    second = image(ex, doc)
    return {"ex": ex, "runtime": runtime, "first": first, "second": second, "after_first": after_first,
            "call": call}


def test_compile_agrees_with_eager_through_the_executor(compiled_session, reference):
    call = compiled_session["call"]
    assert call is not None and call.disabled is None, compiled_session["runtime"].messages
    assert call.compilations > 0  # dynamo really captured graphs: the U-Net ran compiled
    torch.testing.assert_close(compiled_session["first"], reference, rtol=1e-5, atol=1e-5)


def test_compile_module_is_reused_across_two_runs(compiled_session, registry, models_dir, tmp_path):
    """The second job (new seed, same shapes) compiles nothing: one compiled call per shape, kept on
    the model the session's cache holds."""
    call = compiled_session["call"]
    compilations, shapes = compiled_session["after_first"]
    assert shapes == 1  # one shape: the CFG batch of a 64x64 latent
    assert (call.compilations, len(call.signatures)) == (compilations, shapes)
    assert call.calls >= 2 * 3  # every step of both jobs went through it
    assert not torch.equal(compiled_session["first"], compiled_session["second"])
    # a cache hit hands out the same module, compiled call included
    assert compiled_call(unet_of(compiled_session["ex"])) is call


def test_compile_falls_back_to_eager_with_a_message_when_no_cpp_compiler(registry, models_dir, tmp_path, reference,
                                                                         monkeypatch, capsys):
    """Inductor on a CPU needs a C++ compiler: on a machine without one the U-Net runs eager and one
    line says why. The machine without a compiler is stood in by the lookup answering "none" (emptying
    PATH or naming another $CXX would leak into torch's own cached compiler lookup and break the
    inductor test that follows)."""
    import ldmgraph.models.compile as compile_module

    monkeypatch.setattr(compile_module, "find_compiler", lambda name: None)
    runtime = ModelRuntime(compile=True, compile_options=CompileOptions(backend="inductor"))
    ex = executor(registry, models_dir, tmp_path, runtime)
    out = image(ex, txt2img())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert lines == ["ldmgraph: --compile: UNetModel runs eager: inductor needs a C++ compiler on the CPU and "
                     "'g++' was not found"]
    assert compiled_call(unet_of(ex)).compilations == 0


def test_compile_falls_back_to_eager_when_the_backend_fails(registry, models_dir, tmp_path, reference, capsys):
    runtime = ModelRuntime(compile=True, compile_options=CompileOptions(backend="no-such-backend"))
    out = image(executor(registry, models_dir, tmp_path, runtime), txt2img())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert len(lines) == 1 and "UNetModel runs eager: compiling is unavailable" in lines[0]
    assert "no-such-backend" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compile_inductor_agrees_with_eager(registry, models_dir, tmp_path, reference):
    """The backend --compile picks on a CPU (inductor, C++ kernels): fp32 within 1e-4 of eager."""
    runtime = ModelRuntime(compile=True)
    ex = executor(registry, models_dir, tmp_path, runtime)
    out = image(ex, txt2img())
    call = compiled_call(unet_of(ex))
    assert call.disabled is None and call.compilations > 0, runtime.messages
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_compile_a_copied_model_runs_eager_on_its_own_weights(compiled_session):
    """A deepcopy of a compiled session's model (a plugin merging weights, say) is a new model:
    it must not call the original's compiled graph."""
    import copy

    model = compiled_session["ex"].run(txt2img(), outputs=["ckpt"]).outputs["ckpt"]["model"]
    clone = copy.deepcopy(model)
    assert compiled_call(clone.diffusion_model) is None
    with torch.no_grad():
        for p in clone.diffusion_model.out.parameters():
            p.zero_()  # the copy's output layer is zero: its prediction must be zero, the original's not
        x = torch.randn(2, clone.in_channels, 8, 8)
        t = torch.tensor([500.0, 500.0])
        context = torch.randn(2, 4, clone.context_dim)
        assert torch.count_nonzero(clone.apply_model(x, t, context)) == 0  # not the original's graph
    assert all(torch.count_nonzero(p) for p in model.diffusion_model.out.parameters())  # the original untouched
