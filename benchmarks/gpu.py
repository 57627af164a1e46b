"""The benchmarks on an NVIDIA GPU, fp16 and bf16 (and fp32 for reference), in one prepared run.

    python benchmarks/gpu.py [--workdir /tmp/ldmgraph-bench-gpu] [--json results.json]
    python benchmarks/gpu.py --smoke     # on the CPU with reduced models: checks the script runs

Everything runs on the same seeded random SD1.5-size weights (values do not change speed):
1. U-Net step: one classifier-free-guidance step (batch 2: cond and uncond) on 64x64 latents
   (512 px images) with a 77-token context, ldmgraph's UNetModel against diffusers'
   UNet2DConditionModel sharing its tensors (as `benchmarks/sampling.py` builds them), each in
   fp32, fp16 and bf16 (ours keeps its time embedding in fp32, as the loaders do). CUDA-event
   timing, median of 30 steps after 10 warm-up steps; the relative difference of each output to
   diffusers' fp32 output is printed as the agreement check.
2. Text-to-image through the public paths: `benchmarks/txt2img_sd15.py`'s workflow through the
   executor (CheckpointLoader with dtype fp16/bf16, `--device cuda`) against diffusers'
   StableDiffusionPipeline on the same file, 512x512, 20 Euler steps, CFG 7.5; each in a fresh
   process: load, seconds per step (synchronised at each step report), decode, total, peak GPU
   memory.
3. The CLI on the same graph: `ldmgraph run --device cuda --precision auto --profile` (auto is fp16
   on CUDA), its wall time and its profile.
4. VAE decode of a 256x256 latent to 2048x2048 on the GPU in fp16: whole-image and tiled ("on"),
   ours, and diffusers' AutoencoderKL (plain and `enable_tiling()`); seconds and peak GPU memory.

5. `--compile`: the same SD1.5 U-Net CFG step at 512 px in fp16, ours through `ldmgraph.models.
   compile` (inductor, CUDA graphs: what `--compile` installs) against diffusers' eager fp16 step;
   compile seconds, backend compilations, and the compiled output's difference to ours eager. Then
   part 3's `ldmgraph run` with and without `--compile`: wall seconds and the PNGs' difference.
6. `--gpu-memory 4`: `workflows/sdxl_refiner.json` (SDXL base + refiner, random full-size weights
   written as fp16 files, seeded) at 1024x1024, 6 steps (4 base, 2 refiner), each run in a fresh
   process: without a manager (`--gpu-memory 0`: every model on the GPU) and under a 4 GiB budget;
   peak allocated GiB (torch's own count), seconds per sampler step, the manager's moves, and the
   two saved images compared (8-bit PNGs, max and mean difference in 1/255 steps).

`--parts` runs only some parts (e.g. `--parts compile,sdxl` within a short device lease).
`--smoke` runs every part on the CPU with reduced models (compile through dynamo's "eager"
backend, a tiny SDXL pair under a budget of half its U-Net, text-to-image in bf16 only): checks
the script, not the figures; there the peak is the manager's weight accountant and the compiled
step is fp32.
The log (everything printed) goes to `docs/perf/gpu_<card>.log` (`gpu_smoke.log` with `--smoke`).

Last line: ``step_fp16_vs_diffusers_fp16= step_bf16_vs_diffusers_bf16= step_fp16_vs_fp32=
txt2img_step_s_fp16= txt2img_ratio_fp16= txt2img_ratio_bf16= vae2048_peak_gib_full=
vae2048_peak_gib_tiled= step_compiled_vs_diffusers_fp16= sdxl_peak_gib_budget4=
sdxl_step_s_budget4_vs_unbounded= sdxl_image_max_diff_255=`` (ratios: ldmgraph's time over the
other's; below 1 is faster; a part not run prints nan).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402


def _timer(device: str) -> Any:
    """A function that runs fn and returns its seconds: CUDA events on the GPU, else CPU time."""
    def run(fn: Any) -> float:
        if device.startswith("cuda"):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1000
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return run


def unet_steps(device: str, side: int, config: dict[str, Any], warmup: int, timed: int) -> dict[str, float]:
    """Median seconds of one CFG step for ours and diffusers' U-Net in each precision."""
    from precision import unets

    models = unets(config, device, ("fp32", "fp16", "bf16"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g).to(device)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device)
    t = torch.tensor([500, 500], device=device)
    timer = _timer(device)
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        ref = models["diffusers_fp32"](x, t, context).float()
        for name, fn in models.items():
            out = fn(x, t, context).float()
            for _ in range(warmup):
                fn(x, t, context)
            times = [timer(lambda fn=fn: fn(x, t, context)) for _ in range(timed)]
            seconds[name] = statistics.median(times)
            print(f"unet step {name}: {seconds[name] * 1000:.2f} ms, relative difference to diffusers_fp32 "
                  f"{float((out - ref).norm() / ref.norm()):.4f}", flush=True)
    return seconds


def txt2img(workdir: Path, device: str, steps: int, size: int, channels: int,
            dtypes: tuple[str, ...] = ("fp16", "bf16")) -> dict[str, dict[str, float]]:
    """benchmarks/txt2img_sd15.py's two sides in fresh processes, fp16 and bf16 (the smoke run: bf16
    only, since a CPU decodes fp16 about a hundred times slower)."""
    import txt2img_sd15 as sd

    ckpt = sd.ensure_checkpoint(workdir, channels)
    results: dict[str, dict[str, float]] = {}
    for dtype in dtypes:
        for side in ("ours", "diffusers"):
            figures = sd.worker(side, ckpt, steps, size, channels, dtype, device)
            results[f"{side}_{dtype}"] = figures
            print(f"txt2img {size} px {steps} steps {side} {dtype}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in figures.items()), flush=True)
    return results


def cli_run(workdir: Path, device: str, steps: int, size: int, channels: int) -> float:
    """`ldmgraph run` on the same graph with `--device DEVICE --precision auto --profile`: the CLI's
    own path (auto picks fp16 on CUDA); prints its profile and returns its wall seconds."""
    import subprocess

    import txt2img_sd15 as sd

    graph = workdir / "txt2img_gpu.json"
    graph.write_text(json.dumps(sd.txt2img_workflow(sd.ensure_checkpoint(workdir, channels).name, steps, size,
                                                    "file", "auto")))
    command = [sys.executable, "-m", "ldmgraph.cli", "run", str(graph), "--device", device, "--precision", "auto",
               "--models-dir", str(workdir), "--output-dir", str(workdir / "out"), "--profile", "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    print(f"ldmgraph run --device {device} --precision auto: exit {done.returncode}, {seconds:.1f} s wall\n"
          + (done.stdout + done.stderr)[-3000:], flush=True)
    return seconds if done.returncode == 0 else float("nan")


def vae_2048(device: str, side: int, sd_size: bool) -> dict[str, float]:
    """Seconds and peak GPU memory of decoding a side/8 latent to side x side, fp16."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.configs import sd_vae
    from ldmgraph.models.handles import VAEHandle

    config = sd_vae()
    if not sd_size:
        config["ddconfig"] = {**config["ddconfig"], "ch": 32}
    torch.manual_seed(0)
    ours_model = AutoencoderKL(**config).eval()
    theirs = DiffusersVAE.from_config(dk.vae_config_to_diffusers(config)).eval()
    theirs.load_state_dict(dk.vae_to_diffusers(ours_model.state_dict()))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    ours = VAEHandle(ours_model.to(device, dtype), scale_factor=0.18215)
    theirs = theirs.to(device, dtype)
    z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    results: dict[str, float] = {}

    def measure(name: str, fn: Any) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        with torch.inference_mode():
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            results[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        results[f"{name}_s"] = time.perf_counter() - started
        print(f"vae decode {side} px {name}: {results[f'{name}_s']:.2f} s, peak "
              f"{results.get(f'{name}_peak_gib', float('nan')):.2f} GiB above the weights", flush=True)

    measure("ours_full", lambda: ours.decode(z.to(device), tiled="off"))
    measure("ours_tiled", lambda: ours.decode(z.to(device), tiled="on"))
    latent = (z / 0.18215).to(device, dtype)
    measure("diffusers_full", lambda: theirs.decode(latent))
    theirs.enable_tiling()
    measure("diffusers_tiled", lambda: theirs.decode(latent))
    return results


def compiled_step(device: str, side: int, config: dict[str, Any], warmup: int, timed: int,
                  smoke: bool) -> dict[str, float]:
    """Seconds of one CFG step: ours compiled as `--compile` does against diffusers' eager, fp16
    (fp32 in the smoke run: CPUs have no fast fp16)."""
    import copy

    from sampling import build

    from ldmgraph.models.compile import CompileOptions, install

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    reference, handle = build(config, device)
    ours = handle.diffusion_model
    theirs = reference
    if dtype != torch.float32:
        ours, theirs = copy.deepcopy(ours).to(dtype).keep_fp32(), copy.deepcopy(reference).to(dtype)
    call = install(ours, CompileOptions(backend="eager") if smoke else None,
                   lambda message: print(f"compile: {message}", flush=True))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    timer = _timer(device)
    with torch.inference_mode():
        eager = call.eager(x, t, context=context).float()
        started = time.perf_counter()
        compiled = ours(x, t, context=context).float()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        for _ in range(warmup):
            ours(x, t, context=context)
            theirs(x, t, encoder_hidden_states=context)
        ours_s = statistics.median(timer(lambda: ours(x, t, context=context)) for _ in range(timed))
        theirs_s = statistics.median(timer(lambda: theirs(x, t, encoder_hidden_states=context)) for _ in range(timed))
        diffusers_out = theirs(x, t, encoder_hidden_states=context).sample.float()
    difference = float((compiled - eager).norm() / eager.norm())
    print(f"compiled step ({dtype}): first call {compile_s:.1f} s (compiling), {call.compilations} graph(s), "
          f"{'eager: ' + call.disabled if call.disabled else 'compiled'}; {ours_s * 1000:.2f} ms against diffusers "
          f"eager {theirs_s * 1000:.2f} ms; relative difference to ours eager {difference:.5f}, to diffusers "
          f"{float((compiled - diffusers_out).norm() / diffusers_out.norm()):.5f}", flush=True)
    return {"compiled_s": ours_s, "diffusers_s": theirs_s, "compile_s": compile_s, "difference": difference,
            "compilations": float(call.compilations)}


def cli_compile(workdir: Path, device: str, steps: int, size: int, channels: int, smoke: bool) -> dict[str, float]:
    """`ldmgraph run --compile` against `ldmgraph run` on part 3's graph: wall seconds of each, and the
    largest difference between their PNGs in 1/255 steps (the compiled sampling loop end to end)."""
    import subprocess

    import numpy as np
    import txt2img_sd15 as sd
    from PIL import Image

    graph = workdir / "txt2img_gpu.json"
    graph.write_text(json.dumps(sd.txt2img_workflow(sd.ensure_checkpoint(workdir, channels).name, steps, size,
                                                    "file", "auto")))
    env = dict(os.environ, **({"LDMGRAPH_COMPILE_BACKEND": "eager"} if smoke else {}))
    figures: dict[str, float] = {}
    images = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = workdir / f"out_{name}"
        for old in out.glob("*.png") if out.is_dir() else ():
            old.unlink()
        command = [sys.executable, "-m", "ldmgraph.cli", "run", str(graph), "--device", device, "--precision", "auto",
                   "--models-dir", str(workdir), "--output-dir", str(out), "--no-progress", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        figures[f"{name}_s"] = time.perf_counter() - started
        notes = [line for line in done.stderr.splitlines() if "--compile" in line]
        print(f"ldmgraph run{' --compile' if extra else ' (eager)'}: exit {done.returncode}, {figures[f'{name}_s']:.1f} s wall"
              + (f"; {notes}" if notes else "") + ("" if done.returncode == 0 else "\n" + done.stderr[-3000:]),
              flush=True)
        if done.returncode:
            return figures
        images[name] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
    figures["max_diff_255"] = float(np.abs(images["eager"] - images["compiled"]).max())
    print(f"ldmgraph run --compile against eager: images differ by at most {figures['max_diff_255']:.0f}/255", flush=True)
    return figures


# --- SDXL base + refiner under a device-memory budget ------------------------------------------------

SDXL_STEPS, SDXL_SWITCH = 6, 4


def write_sdxl(workdir: Path, device: str, smoke: bool) -> tuple[str, str]:
    """The base and refiner files: full size, seeded random fp16 (drawn on the GPU, written tensor by
    tensor), or in the smoke run the tests' tiny SDXL pair."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = ("sdxl_base.safetensors", "sdxl_refiner.safetensors")
    if all((workdir / n).is_file() for n in names):
        return names
    if smoke:
        sys.path.insert(0, str(ROOT / "tests" / "models"))
        import sdxl_models as sm

        quiet = io.StringIO()  # diffusers' progress bars while the tiny pair is written
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            modules = sm.build(workdir / "diffusers")
            sm.write_single_file(workdir / names[0], modules["base"], refiner=False)
            sm.write_single_file(workdir / names[1], modules["refiner"], refiner=True)
        return names
    from safetensors.torch import save_file
    from sdxl import checkpoint_shapes

    g = torch.Generator(device).manual_seed(1)
    for name, refiner in zip(names, (False, True), strict=True):
        print(f"writing {workdir / name} (random SDXL {'refiner' if refiner else 'base'}, fp16) ...", flush=True)
        tensors = {}
        for key, shape in checkpoint_shapes(refiner).items():
            value = torch.randn(shape, generator=g, device=device) * 0.02
            if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln_final.weight",
                             "ln_1.weight", "ln_2.weight", "norm_out.weight", "layer_norm1.weight",
                             "layer_norm2.weight", "final_layer_norm.weight")):
                value = value + 1.0
            tensors[key] = value.to("cpu", torch.float16)
        save_file(tensors, str(workdir / name))
        del tensors
    return names


def phase_sdxl(workdir: Path, gib: float, device: str, smoke: bool) -> dict[str, Any]:
    """One run of the base + refiner workflow in this process (see the module docstring)."""
    from argparse import Namespace

    from ldmgraph.cli import install_model_runtime
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    size = 64 if smoke else 1024
    out = workdir / f"out_{gib:g}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    env = Environment(input_dir=workdir, output_dir=out, model_dirs=(workdir,), device=device)
    executor = Executor(load_registry(), env)
    if smoke and gib > 0:  # the CPU stand-in: a budget of half the tiny base U-Net, so that it streams
        from ldmgraph.models.cache import ModelCache
        from ldmgraph.models.checkpoint import load_checkpoint
        from ldmgraph.models.manager import ModelManager, ModelRuntime
        from ldmgraph.nodes.common import MODEL_CACHE_KEY

        unet = load_checkpoint(workdir / "sdxl_base.safetensors").unet
        budget = sum(p.numel() * p.element_size() for p in unet.diffusion_model.parameters()) // 2
        runtime: Any = ModelRuntime(manager=ModelManager(budget, "cpu", working_fraction=0.0))
        executor.resources[MODEL_CACHE_KEY] = ModelCache(runtime=runtime)
    else:
        runtime = install_model_runtime(executor.resources, Namespace(compile=False, gpu_memory=gib, device=device))
    doc = json.loads((ROOT / "workflows" / "sdxl_refiner.json").read_text())
    values = {"base_ckpt_name": "sdxl_base.safetensors", "refiner_ckpt_name": "sdxl_refiner.safetensors",
              "width": size, "height": size, "steps": SDXL_STEPS, "switch_step": SDXL_SWITCH, "seed": 7}
    stamps: list[float] = []

    def on_event(event: Any) -> None:
        if event.kind == "progress" and event.node_type and "ampler" in event.node_type:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    executor.run(doc, overrides=values, on_event=on_event)
    seconds = time.perf_counter() - started
    manager = getattr(runtime, "manager", None)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = manager.accountant.peak / 2**30 if manager is not None else float("nan")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    moves = manager.decisions() if manager is not None else []
    summary: dict[str, int] = {}
    for move in moves:
        summary[f"{move['action']} {move['model']}"] = summary.get(f"{move['action']} {move['model']}", 0) + 1
    return {"gib": gib, "peak_gib": peak, "step_s": statistics.median(gaps) if gaps else float("nan"),
            "total_s": seconds, "image": str(next(out.glob("*.png"))), "moves": summary,
            "weights_budget_gib": manager.weights_budget / 2**30 if manager is not None else None,
            "accountant_peak_gib": manager.accountant.peak / 2**30 if manager is not None else None}


def sdxl_budget(workdir: Path, device: str, smoke: bool) -> dict[str, Any]:
    """The workflow unbounded and under 4 GiB, each in a fresh process; the images compared."""
    import subprocess

    import numpy as np
    from PIL import Image

    write_sdxl(workdir, device, smoke)
    runs = {}
    for gib in (0.0, 4.0):
        command = [sys.executable, __file__, "--phase", "sdxl", "--workdir", str(workdir), "--gpu-memory", str(gib)]
        done = subprocess.run(command + (["--smoke"] if smoke else []), capture_output=True, text=True, check=False)
        if done.returncode:
            print(f"sdxl --gpu-memory {gib:g} failed:\n{done.stderr[-4000:]}", flush=True)
            return {}
        runs[gib] = json.loads(done.stdout.strip().splitlines()[-1])
        run = runs[gib]
        budget = run["weights_budget_gib"]
        print(f"sdxl base+refiner {'64' if smoke else '1024'} px, --gpu-memory {gib:g}: peak {run['peak_gib']:.3f} GiB "
              f"({run['peak_gib'] * 1024:.1f} MiB"
              f"{', weight accountant: the CPU stand-in' if not device.startswith('cuda') else ' allocated'}"
              f"{f'; weights budget {budget * 1024:.1f} MiB' if budget else ''}), "
              f"{run['step_s']:.3f} s/step, {run['total_s']:.1f} s in all; moves {run['moves']}", flush=True)
    a, b = (np.asarray(Image.open(runs[g]["image"]), dtype=np.int16) for g in (0.0, 4.0))
    diff = np.abs(a - b)
    print(f"sdxl images, budget vs unbounded: max difference {int(diff.max())}/255, mean {float(diff.mean()):.4f}/255",
          flush=True)
    return {"peak_gib": runs[4.0]["peak_gib"], "step_ratio": runs[4.0]["step_s"] / runs[0.0]["step_s"],
            "max_diff": float(diff.max()), "runs": runs}


PARTS = ("unet", "txt2img", "cli", "vae", "compile", "sdxl")
NAN = float("nan")


class _Tee:
    """stdout also written to the log file (the committed record of a run)."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream, self.file = stream, path.open("w", encoding="utf-8")

    def write(self, text: str) -> int:
        self.file.write(text)
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def _card_name() -> str:
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
    return "_".join(part for part in name.replace("-", " ").split() if part.isalnum()) or "cuda"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldmgraph-bench-gpu"))
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, reduced models, small sizes: checks that the script runs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (of {', '.join(PARTS)})")
    parser.add_argument("--log", type=Path, help="log file (default docs/perf/gpu_<card>.log, gpu_smoke.log with --smoke)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-memory", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "sdxl":
        device = "cpu" if args.smoke else "cuda"
        print(json.dumps(phase_sdxl(args.workdir, args.gpu_memory, device, args.smoke)))
        return
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    from sampling import SD15_UNET, SMALL_UNET

    if args.smoke:
        device, side, config, warmup, timed = "cpu", 8, SMALL_UNET, 1, 2
        steps, size, channels, big = 2, 64, 32, 256
        log = args.log or ROOT / "docs" / "perf" / "gpu_smoke.log"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark is for a GPU machine (--smoke runs it on the CPU)")
        device, side, config, warmup, timed = "cuda", 64, SD15_UNET, 10, 30
        steps, size, channels, big = 20, 512, 320, 2048
        log = args.log or ROOT / "docs" / "perf" / f"gpu_{_card_name()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = _Tee(sys.stdout, log)  # type: ignore[assignment]
    print(f"benchmarks/gpu.py{' --smoke' if args.smoke else ''} --parts {','.join(p for p in PARTS if p in parts)}: "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    unet = unet_steps(device, side, config, warmup, timed) if "unet" in parts else {}
    dtypes = ("bf16",) if args.smoke else ("fp16", "bf16")
    t2i = txt2img(args.workdir, device, steps, size, channels, dtypes) if "txt2img" in parts else {}
    cli = cli_run(args.workdir, device, steps, size, channels) if "cli" in parts else NAN
    vae = vae_2048(device, big, not args.smoke) if "vae" in parts else {}
    compiled = compiled_step(device, side, config, warmup, timed, args.smoke) if "compile" in parts else {}
    if "compile" in parts:
        compiled["cli"] = cli_compile(args.workdir, device, steps, size, channels, args.smoke)
    sdxl = sdxl_budget(args.workdir / "sdxl", device, args.smoke) if "sdxl" in parts else {}
    if args.json:
        args.json.write_text(json.dumps({"unet_step_s": unet, "txt2img": t2i, "cli_run_s": cli, "vae": vae,
                                         "compiled_step": compiled, "sdxl_budget4": sdxl}, indent=1, default=str))

    def ratio(a: str, b: str, table: dict[str, Any]) -> float:
        try:
            first, second = table[a], table[b]
        except KeyError:
            return NAN
        return float(first.get("step_s", NAN) / second.get("step_s", NAN)) if isinstance(first, dict) else first / second

    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"seconds in all: {time.perf_counter() - started:.1f} wall, {cpu:.1f} CPU (this process and its children, "
          "interpreter start-up and imports included)", flush=True)
    print(f"step_fp16_vs_diffusers_fp16={ratio('ours_fp16', 'diffusers_fp16', unet):.3f} "
          f"step_bf16_vs_diffusers_bf16={ratio('ours_bf16', 'diffusers_bf16', unet):.3f} "
          f"step_fp16_vs_fp32={ratio('ours_fp16', 'ours_fp32', unet):.3f} "
          f"txt2img_step_s_fp16={t2i.get('ours_fp16', {}).get('step_s', NAN):.4f} "
          f"txt2img_ratio_fp16={ratio('ours_fp16', 'diffusers_fp16', t2i):.3f} "
          f"txt2img_ratio_bf16={ratio('ours_bf16', 'diffusers_bf16', t2i):.3f} "
          f"vae2048_peak_gib_full={vae.get('ours_full_peak_gib', NAN):.2f} "
          f"vae2048_peak_gib_tiled={vae.get('ours_tiled_peak_gib', NAN):.2f} "
          f"step_compiled_vs_diffusers_fp16={ratio('compiled_s', 'diffusers_s', compiled):.3f} "
          f"sdxl_peak_gib_budget4={sdxl.get('peak_gib', NAN):.2f} "
          f"sdxl_step_s_budget4_vs_unbounded={sdxl.get('step_ratio', NAN):.2f} "
          f"sdxl_image_max_diff_255={sdxl.get('max_diff', NAN):.0f}", flush=True)


if __name__ == "__main__":
    main()
