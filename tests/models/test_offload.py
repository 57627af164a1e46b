"""The device-memory manager (`--gpu-memory`) decides on the CPU as it would on a card.

Here "device" and host are the same memory, but the manager still copies weights for every move
(a real copy per block when streaming) and its accountant counts the bytes the card would hold;
the decisions (`ModelManager.moves`) are checked as data. Each workflow runs through the Executor
on the bundled text-to-image model and its ControlNet, and each image is compared with the one of
a session without a manager (the independent reference: eager, weights never moved).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldmgraph_tiny_models import BUNDLED_NAMES, write_tiny_checkpoint  # noqa: E402

from ldmgraph.models.manager import GIB, ModelManager, ModelRuntime  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "ldmgraph" / "assets" / "models"
STEPS = 3


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for kind, name in BUNDLED_NAMES.items():
        if not (BUNDLED / name).is_file():
            write_tiny_checkpoint(folder / name, kind)
    return folder


@pytest.fixture(scope="module")
def registry():
    from ldmgraph.plugins import load_registry

    return load_registry()


def link(node: str, output: str) -> dict:
    return {"node": node, "output": output}


def txt2img(lora: str | None = None, strength: float = 1.0) -> dict:
    """Text to image on the bundled model; optionally through a LoraLoader."""
    model, text = link("ckpt", "model"), link("ckpt", "text_encoder")
    nodes: dict = {"ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": BUNDLED_NAMES["txt2img"]}}}
    if lora:
        nodes["lora"] = {"type": "LoraLoader", "inputs": {"model": model, "text_encoder": text, "lora_name": lora,
                                                          "strength_model": strength, "strength_clip": 0.0}}
        model, text = link("lora", "model"), link("lora", "text_encoder")
    nodes.update({
        "pos": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": "a red circle on the left"}},
        "neg": {"type": "TextEncode", "inputs": {"text_encoder": text, "text": ""}},
        "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
        "sample": {"type": "Sampler", "inputs": {
            "model": model, "positive": link("pos", "conditioning"), "negative": link("neg", "conditioning"),
            "latent": link("latent", "latent"), "seed": 3, "steps": STEPS, "cfg": 4.0, "sampler": "euler",
            "schedule": "karras"}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": link("ckpt", "vae"), "latent": link("sample", "latent")}},
    })
    return {"format": "ldmgraph/1", "nodes": nodes}


def executor(registry, models_dir: Path, tmp_path: Path, runtime: ModelRuntime | None):
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.models.cache import ModelCache
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    env = Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(models_dir, BUNDLED),
                      device="cpu")
    ex = Executor(registry, env)
    ex.resources[MODEL_CACHE_KEY] = ModelCache(runtime=runtime)
    return ex


def image(ex, doc: dict) -> torch.Tensor:
    return torch.as_tensor(ex.run(doc, outputs=["decode"]).outputs["decode"]["image"])


def unet_bytes(ex) -> int:
    from ldmgraph.models.cache import module_nbytes

    model = ex.run(txt2img(), outputs=["ckpt"]).outputs["ckpt"]["model"]
    return module_nbytes(model.diffusion_model)


def kind(move) -> str:
    """The module class a move names (the name goes on with the detected architecture)."""
    return move.model.split(" ")[0]


def manager(budget: int) -> ModelManager:
    return ModelManager(budget, "cpu", working_fraction=0.0)


@pytest.fixture(scope="module")
def reference(registry, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """The image of a session without a manager."""
    return image(executor(registry, models_dir, tmp_path_factory.mktemp("ref"), None), txt2img())


def test_offload_streams_a_unet_over_the_budget_with_peak_at_most_the_budget(registry, models_dir, tmp_path,
                                                                          reference):
    probe = executor(registry, models_dir, tmp_path, None)
    budget = unet_bytes(probe) // 2  # the U-Net cannot be resident: it runs block by block
    m = manager(budget)
    ex = executor(registry, models_dir, tmp_path, ModelRuntime(manager=m))
    out = image(ex, txt2img())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    actions = [(mv.action, kind(mv)) for mv in m.moves]
    assert ("stream", "UNetModel") in actions
    assert m.accountant.peak <= m.weights_budget == budget
    assert m.accountant.bytes == 0 or set(m.resident())  # only residents are left on the device
    unet_moves = [mv for mv in m.moves if kind(mv) == "UNetModel" and mv.action == "block_in"]
    # every block came in once per U-Net call (two CFG halves stacked: one call per step), in forward order
    blocks = [mv.block for mv in unet_moves]
    per_call = len(blocks) // STEPS
    assert per_call and blocks == blocks[:per_call] * STEPS
    assert blocks[0] == "time_embed" and blocks[-1] == "out"
    assert blocks[1:4] == ["input_blocks.0", "input_blocks.1", "input_blocks.2"]
    # a text encoder over the budget computes at home, never on the device
    assert any(mv.action == "host" for mv in m.moves)


def test_offload_eviction_order_is_least_recently_used():
    """Three models, room for two: the least recently used idle one goes home first."""
    layers = {name: torch.nn.Linear(64, 64) for name in "abc"}
    size = sum(p.numel() * 4 for p in layers["a"].parameters())
    m = manager(2 * size + size // 2)
    x = torch.randn(1, 64)
    expected = {name: layer(x) for name, layer in layers.items()}
    for name in ["a", "b", "c", "b", "a"]:
        with m.use(layers[name], name):
            torch.testing.assert_close(layers[name](x), expected[name], rtol=0, atol=0)
    assert [(mv.action, mv.model) for mv in m.moves] == [
        ("load", "a"), ("load", "b"), ("evict", "a"), ("load", "c"), ("evict", "c"), ("load", "a")]
    assert m.resident() == ["b", "a"]
    assert m.accountant.peak <= m.weights_budget


def test_offload_forgets_a_model_nobody_holds():
    """A model the session's cache dropped is freed with its device copy: the manager holds no
    reference that would keep it (or its bytes on the card) alive."""
    import gc

    layer = torch.nn.Linear(64, 64)
    m = manager(10**6)
    with m.use(layer, "layer"):
        pass
    assert m.resident() == ["layer"] and m.accountant.bytes > 0
    del layer
    gc.collect()
    assert m.resident() == [] and m.accountant.bytes == 0
    assert [mv.action for mv in m.moves] == ["load", "forget"]


def test_offload_never_evicts_a_model_in_use():
    """A model used inside another's use (a ControlNet inside the U-Net's call) is streamed or kept
    at home rather than evicting the caller."""
    outer, inner = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    size = sum(p.numel() * 4 for p in outer.parameters())
    m = manager(size + size // 2)
    with m.use(outer, "outer"), m.use(inner, "inner"):
        assert m.resident() == ["outer"]
    assert [(mv.action, mv.model) for mv in m.moves] == [("load", "outer"), ("host", "inner")]


def test_gpu_memory_models_stay_resident_between_jobs(registry, models_dir, tmp_path, reference):
    m = manager(4 * GIB)
    ex = executor(registry, models_dir, tmp_path, ModelRuntime(manager=m))
    first = image(ex, txt2img())
    loads = [(mv.action, mv.model) for mv in m.moves]
    assert {"UNetModel", "AutoencoderKL"} <= {model.split(" ")[0] for action, model in loads if action == "load"}
    doc = txt2img()
    doc["nodes"]["sample"]["inputs"]["seed"] = 4  # a new job: the sampler and the decoder run again
    second = image(ex, doc)
    assert [(mv.action, mv.model) for mv in m.moves] == loads  # nothing moved: they stayed on the device
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    assert not torch.equal(first, second)
    assert not any(mv.action == "evict" for mv in m.moves)


def _lora_file(folder: Path, ex) -> str:
    """A kohya LoRA on every attention projection of the bundled U-Net (seeded random factors)."""
    from ldmgraph.models.lora import write_kohya_lora

    model = ex.run(txt2img(), outputs=["ckpt"]).outputs["ckpt"]["model"]
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name, module in model.diffusion_model.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")) and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            modules[name] = (torch.randn(4, in_features, generator=g) * 0.2,
                             torch.randn(out_features, 4, generator=g) * 0.2, 4.0)
    assert modules
    (folder / "loras").mkdir(exist_ok=True)
    path = folder / "loras" / "offload-lora.safetensors"
    write_kohya_lora(path, modules)
    return path.name


def test_offload_lora_patches_apply_to_streamed_weights(registry, models_dir, tmp_path, reference):
    probe = executor(registry, models_dir, tmp_path, None)
    lora = _lora_file(models_dir, probe)
    patched_reference = image(probe, txt2img(lora))  # eager, weights never moved
    assert not torch.equal(patched_reference, reference)  # the LoRA changes the image
    m = manager(unet_bytes(probe) // 2)
    ex = executor(registry, models_dir, tmp_path, ModelRuntime(manager=m))
    streamed = image(ex, txt2img(lora))
    assert ("stream", "UNetModel") in [(mv.action, kind(mv)) for mv in m.moves]
    torch.testing.assert_close(streamed, patched_reference, rtol=0, atol=1e-6)  # applied once: not skipped, not doubled
    # the base model is restored where it lives: the unpatched workflow gives the unpatched image
    torch.testing.assert_close(image(ex, txt2img()), reference, rtol=0, atol=0)
    assert m.accountant.peak <= m.weights_budget


def _controlnet_doc() -> dict:
    import json

    doc = json.loads((REPO / "workflows" / "controlnet.json").read_text())
    doc["nodes"]["sampler"]["inputs"]["steps"] = STEPS
    return doc


def test_offload_controlnet_streams_beside_a_resident_unet(registry, models_dir, tmp_path):
    """The U-Net fits and stays resident; the ControlNet, called inside the U-Net's step, gets the
    room that is left and runs block by block there: the image is the unmanaged one."""
    from ldmgraph.models.cache import module_nbytes

    inputs = REPO / "workflows" / "inputs"
    probe = executor(registry, models_dir, inputs, None)
    reference = image(probe, _controlnet_doc())
    net = probe.run(_controlnet_doc(), outputs=["control_net"]).outputs["control_net"]["control_net"]
    unet, control = unet_bytes(probe), module_nbytes(net.control_model)
    m = manager(unet + control // 2)
    ex = executor(registry, models_dir, inputs, ModelRuntime(manager=m))
    torch.testing.assert_close(image(ex, _controlnet_doc()), reference, rtol=0, atol=0)
    moves = [(mv.action, "ControlNet" if "controlnet" in mv.model else kind(mv)) for mv in m.moves]
    assert moves.count(("stream", "ControlNet")) == STEPS and moves.count(("load", "UNetModel")) == 1
    last_control = max(i for i, move in enumerate(moves) if move[1] == "ControlNet")
    assert ("evict", "UNetModel") not in moves[:last_control]  # never evicted while its steps run
    assert m.accountant.peak <= m.weights_budget


def test_gpu_memory_flag_through_the_cli(tmp_path, models_dir):
    """`ldmgraph run --gpu-memory GIB`: a budget far below the U-Net streams it; same image as
    without the flag. A negative budget is a usage error."""
    import numpy as np
    from PIL import Image

    from ldmgraph.cli import main

    workflow = REPO / "workflows" / "txt2img.json"
    common = [str(workflow), "--device", "cpu", "--set", "steps=2", "--no-progress", "--models-dir", str(models_dir)]
    assert main(["run", *common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main(["run", *common, "--output-dir", str(tmp_path / "budget"), "--gpu-memory", "0.004"]) == 0
    plain, budget = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("plain", "budget"))
    assert np.array_equal(plain, budget)
    with pytest.raises(SystemExit, match="--gpu-memory must be 0"):
        main(["run", *common, "--output-dir", str(tmp_path / "bad"), "--gpu-memory", "-1"])


def test_gpu_memory_and_compile_flags_through_batch(tmp_path, models_dir, capsys, monkeypatch):
    """`ldmgraph batch --gpu-memory GIB --compile` (local backend): the models are resident for both
    rows, and a backend that cannot compile falls back to eager with one line for the whole batch;
    each row's image is the one `ldmgraph run` writes for the same seed without either flag."""
    import numpy as np
    from PIL import Image

    from ldmgraph.cli import main

    workflow = REPO / "workflows" / "txt2img.json"
    common = ["--device", "cpu", "--set", "steps=2", "--no-progress", "--models-dir", str(models_dir)]
    table = tmp_path / "seeds.csv"
    table.write_text("seed\n1\n2\n", encoding="utf-8")
    monkeypatch.setenv("LDMGRAPH_COMPILE_BACKEND", "no-such-backend")
    code = main(["batch", str(workflow), "--params", str(table), *common, "--output-dir", str(tmp_path / "batch"),
                 "--gpu-memory", "1", "--compile"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "--compile" in line]
    assert len(lines) == 1 and "UNetModel runs eager: compiling is unavailable" in lines[0], err
    for row, seed in ((1, 1), (2, 2)):
        assert main(["run", str(workflow), *common, "--set", f"seed={seed}", "--output-dir", str(tmp_path / f"run{seed}")]) == 0
        ran = np.asarray(Image.open(next((tmp_path / f"run{seed}").glob("*.png"))))
        batched = np.asarray(Image.open(next((tmp_path / "batch").glob(f"row{row:05d}_*.png"))))
        assert np.array_equal(ran, batched)


def test_gpu_memory_and_compile_flags_for_serve_and_their_refusal_on_ray(tmp_path, capsys):
    from ldmgraph.cli import build_parser, main

    args = build_parser("serve").parse_args(["serve", "--compile", "--gpu-memory", "6"])
    assert (args.compile, args.gpu_memory) == (True, 6.0)
    table = tmp_path / "seeds.csv"
    table.write_text("seed\n1\n", encoding="utf-8")
    code = main(["batch", str(REPO / "workflows" / "txt2img.json"), "--params", str(table), "--backend", "ray",
                 "--gpu-memory", "4", "--no-progress", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "--compile and --gpu-memory apply to --backend local only" in capsys.readouterr().err


def test_gpu_memory_docs_name_tests_that_exist_and_flags_every_command_has():
    """docs/gpu.md and the README's GPU paragraph stay true: every test the page names exists, and
    run, serve and batch all take both flags."""
    import re

    from ldmgraph.cli import build_parser

    page = (REPO / "docs" / "gpu.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\b(test_(?:offload|gpu_memory|compile)\w*)\b(?!\.py)", page))  # not the files
    here = Path(__file__).parent
    defined = set(re.findall(r"^def (test_\w+)", (here / "test_offload.py").read_text(encoding="utf-8")
                             + (here / "test_compile.py").read_text(encoding="utf-8"), re.MULTILINE))
    prefixes = {name.rstrip("_") for name in named if name.endswith("_")}  # `test_compile_falls_back_to_eager_*`
    assert named and {n for n in named if not n.endswith("_")} <= defined
    assert all(any(d.startswith(p) for d in defined) for p in prefixes)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`--compile` (run, serve, batch)" in readme and "`--gpu-memory GIB`" in readme
    for command, extra in (("run", ["w.json"]), ("serve", []), ("batch", ["w.json", "--params", "t.csv"])):
        args = build_parser(command).parse_args([command, *extra, "--compile", "--gpu-memory", "2"])
        assert (args.compile, args.gpu_memory) == (True, 2.0), command


def test_offload_device_copies_take_patches_outside_inference_mode():
    """Copies made while a sampler runs (inside inference mode) are ordinary tensors, so a patch
    applied later outside inference mode (a text encoder's LoRA under no_grad) can update them."""
    layer = torch.nn.Linear(8, 8).requires_grad_(False)
    m = manager(10**6)
    with torch.inference_mode(), m.use(layer, "layer"):
        layer(torch.randn(1, 8))
    assert m.resident() == ["layer"] and not layer.weight.is_inference()
    with torch.no_grad():
        layer.weight.add_(1.0)


def test_offload_sdxl_base_and_refiner_under_a_budget_give_the_unbounded_image(registry, tmp_path):
    """`workflows/sdxl_refiner.json` on the tests' tiny SDXL pair, with a weights budget of half the
    base U-Net: both U-Nets stream, the accountant's peak stays under the budget, and the image is
    the one of a session without a manager (what benchmarks/gpu.py measures at 1024 px on a card)."""
    import json

    import sdxl_models as sm

    modules = sm.build(tmp_path / "diffusers")
    sm.write_single_file(tmp_path / "base.safetensors", modules["base"], refiner=False)
    sm.write_single_file(tmp_path / "refiner.safetensors", modules["refiner"], refiner=True)
    doc = json.loads((REPO / "workflows" / "sdxl_refiner.json").read_text())
    values = {"base_ckpt_name": "base.safetensors", "refiner_ckpt_name": "refiner.safetensors", "width": 64,
              "height": 64, "steps": 4, "switch_step": 3}

    def run(runtime: ModelRuntime | None) -> torch.Tensor:
        from ldmgraph.graph.context import Environment
        from ldmgraph.graph.executor import Executor
        from ldmgraph.models.cache import ModelCache
        from ldmgraph.nodes.common import MODEL_CACHE_KEY

        out = tmp_path / f"out{id(runtime)}"
        ex = Executor(registry, Environment(input_dir=tmp_path, output_dir=out, model_dirs=(tmp_path,), device="cpu"))
        ex.resources[MODEL_CACHE_KEY] = ModelCache(runtime=runtime)
        ex.run(doc, overrides=values)
        from PIL import Image

        return torch.as_tensor(np.array(Image.open(next(out.glob("*.png")))))

    import numpy as np

    from ldmgraph.models.cache import module_nbytes
    from ldmgraph.models.checkpoint import load_checkpoint

    base = module_nbytes(load_checkpoint(tmp_path / "base.safetensors").unet.diffusion_model)
    m = manager(base // 2)
    torch.testing.assert_close(run(ModelRuntime(manager=m)), run(None), rtol=0, atol=0)
    streamed = {mv.model for mv in m.moves if mv.action == "stream"}
    assert streamed == {"UNetModel (sdxl-base)", "UNetModel (sdxl-refiner)"}
    assert 0 < m.accountant.peak <= m.weights_budget
