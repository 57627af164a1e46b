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

Last line: ``step_fp16_vs_diffusers_fp16= step_bf16_vs_diffusers_bf16= step_fp16_vs_fp32=
txt2img_step_s_fp16= txt2img_ratio_fp16= txt2img_ratio_bf16= vae2048_peak_gib_full=
vae2048_peak_gib_tiled=`` (ratios: ldmgraph's time over the other's; below 1 is faster).
"""

from __future__ import annotations

import argparse
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


def txt2img(workdir: Path, device: str, steps: int, size: int, channels: int) -> dict[str, dict[str, float]]:
    """benchmarks/txt2img_sd15.py's two sides in fresh processes, fp16 and bf16."""
    import txt2img_sd15 as sd

    ckpt = sd.ensure_checkpoint(workdir, channels)
    results: dict[str, dict[str, float]] = {}
    for dtype in ("fp16", "bf16"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldmgraph-bench-gpu"))
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, reduced U-Net and VAE, small sizes: checks that the script runs")
    args = parser.parse_args()
    from sampling import SD15_UNET, SMALL_UNET

    if args.smoke:
        device, side, config, warmup, timed = "cpu", 8, SMALL_UNET, 1, 2
        steps, size, channels, big = 2, 64, 32, 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark is for a GPU machine (--smoke runs it on the CPU)")
        device, side, config, warmup, timed = "cuda", 64, SD15_UNET, 10, 30
        steps, size, channels, big = 20, 512, 320, 2048
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    unet = unet_steps(device, side, config, warmup, timed)
    t2i = txt2img(args.workdir, device, steps, size, channels)
    cli = cli_run(args.workdir, device, steps, size, channels)
    vae = vae_2048(device, big, not args.smoke)
    if args.json:
        args.json.write_text(json.dumps({"unet_step_s": unet, "txt2img": t2i, "cli_run_s": cli, "vae": vae}, indent=1))

    def ratio(a: str, b: str) -> float:
        return t2i[a]["step_s"] / t2i[b]["step_s"]

    print(f"step_fp16_vs_diffusers_fp16={unet['ours_fp16'] / unet['diffusers_fp16']:.3f} "
          f"step_bf16_vs_diffusers_bf16={unet['ours_bf16'] / unet['diffusers_bf16']:.3f} "
          f"step_fp16_vs_fp32={unet['ours_fp16'] / unet['ours_fp32']:.3f} "
          f"txt2img_step_s_fp16={t2i['ours_fp16']['step_s']:.4f} "
          f"txt2img_ratio_fp16={ratio('ours_fp16', 'diffusers_fp16'):.3f} "
          f"txt2img_ratio_bf16={ratio('ours_bf16', 'diffusers_bf16'):.3f} "
          f"vae2048_peak_gib_full={vae.get('ours_full_peak_gib', float('nan')):.2f} "
          f"vae2048_peak_gib_tiled={vae.get('ours_tiled_peak_gib', float('nan')):.2f}")


if __name__ == "__main__":
    main()
