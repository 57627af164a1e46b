"""Text-to-image at Stable Diffusion 1.5 size: ldmgraph's graph vs diffusers' pipeline, same weights.

    python benchmarks/txt2img_sd15.py [--workdir /tmp/ldmgraph-bench-sd15] [--steps 4] [--size 256]
                                      [--dtype file|fp32|fp16|bf16] [--device cpu|cuda]

1. Writes (once) an SD1.5-size checkpoint with random weights in the original single-file layout:
   U-Net 860M (`model.diffusion_model.*`), KL-f8 VAE (`first_stage_model.*`), CLIP ViT-L/14 text
   model (`cond_stage_model.transformer.text_model.*`), fp32 safetensors, about 4.3 GB.
2. Runs, each in its own process so peak RSS is its own: ldmgraph's txt2img graph (CheckpointLoader,
   TextEncode x2, EmptyLatent, Sampler euler/normal with CFG 7.5, VAEDecode, SaveImage) and diffusers'
   `StableDiffusionPipeline` built from the same weights (converted with `ldmgraph.models.diffusers_keys`)
   with `EulerDiscreteScheduler`, 256x256, 4 steps, CFG 7.5.
3. Prints both, then the headline on the last line:
   `load_s=.. load_cpu_s=.. step_s=.. decode_s=.. total_s=.. peak_rss_gib=.. step_ratio_vs_diffusers=..`
   (ldmgraph's figures; the ratio is ldmgraph's median seconds per step over diffusers').

Seconds per step is the median interval between consecutive step-end reports: the sampler's progress
events (ours) and diffusers' `callback_on_step_end` calls (theirs), so text encoding and set-up are
in neither. Load is checkpoint file -> ready modules (wall, and CPU seconds of the process, the fair figure on a
shared machine); decode is the VAE decode of the final latent.
`--dtype` sets both sides' precision (ours: the loader's dtype input; diffusers: the pipeline cast)
and `--device` where both run; on a GPU each step report waits for the device, and the figures add
the peak GPU memory (`benchmarks/gpu.py` runs it there).
Heavy: run it alone (minutes of CPU, ~10 GB of disk and RAM at peak across the two processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CKPT_NAME = "sd15-random.safetensors"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"
CFG = 7.5
SEED = 0


def peak_rss_gib() -> float:
    """Peak resident set size of this process: its own high-water mark (VmHWM). Linux's `ru_maxrss`
    keeps the parent's peak across fork and exec, so a child started by a process that held an
    SD1.5-size model would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_checkpoint(path: Path, unet_channels: int = 320) -> None:
    """Random SD1.5-size weights in the original single-file layout (fp32)."""
    import torch

    from ldmgraph.models import configs
    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.single_file import save_single_file
    from ldmgraph.models.text_encoders import build_clip_text_model, clip_config
    from ldmgraph.models.unet import UNetModel

    torch.manual_seed(SEED)
    unet = UNetModel(**configs.sd1_unet(model_channels=unet_channels))
    vae = AutoencoderKL(**configs.sd_vae())
    clip = build_clip_text_model(clip_config("clip-l"))
    text = {}
    for key, tensor in clip.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        text[f"cond_stage_model.transformer.{key}"] = tensor
    save_single_file(path, unet=unet, vae=vae, extra=text)


def _sync(device: str) -> None:
    """Wait for the GPU at each step report, so intervals measure the work and not the queueing.
    (benchmarks/sampling.py has the same, but importing it imports torch before the loader node runs,
    and the load figures here include torch's import.)"""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def ensure_checkpoint(workdir: Path, unet_channels: int = 320) -> Path:
    """The benchmark's checkpoint in workdir, written (once) if it is not there yet."""
    ckpt = workdir / CKPT_NAME.replace(".safetensors", f"-{unet_channels}.safetensors")
    if not ckpt.is_file():
        print(f"writing {ckpt} (random SD1.5-layout weights, fp32) ...", file=sys.stderr, flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(ckpt, unet_channels)
    return ckpt


def _gpu_peak(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}


def txt2img_workflow(ckpt_name: str, steps: int, size: int, dtype: str = "file", device: str = "cpu") -> dict:
    """The benchmark's text-to-image graph as an ldmgraph workflow document."""

    def link(node: str, output: str) -> dict[str, str]:
        return {"node": node, "output": output}

    workflow = {
        "format": "ldmgraph/1",
        "nodes": {
            "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt_name, "dtype": dtype}},
            "pos": {
                "type": "TextEncode",
                "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": PROMPT},
            },
            "neg": {
                "type": "TextEncode",
                "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": NEGATIVE},
            },
            "latent": {
                "type": "EmptyLatent",
                "inputs": {"width": size, "height": size, "batch_size": 1, "vae": link("ckpt", "vae")},
            },
            "sampler": {
                "type": "Sampler",
                "inputs": {
                    "model": link("ckpt", "model"),
                    "positive": link("pos", "conditioning"),
                    "negative": link("neg", "conditioning"),
                    "latent": link("latent", "latent"),
                    "seed": SEED,
                    "steps": steps,
                    "cfg": CFG,
                    "sampler": "euler",
                    "schedule": "normal",
                    "device": device,
                },
            },
            "decode": {
                "type": "VAEDecode",
                "inputs": {"vae": link("ckpt", "vae"), "latent": link("sampler", "latent")},
            },
            "save": {
                "type": "SaveImage",
                "inputs": {"images": link("decode", "image"), "filename_prefix": "bench"},
            },
        },
    }
    return workflow


def run_ours(ckpt: Path, steps: int, size: int, unet_channels: int = 320, dtype: str = "file",
             device: str = "cpu") -> dict[str, float]:
    """ldmgraph's txt2img graph, timed from the executor's events."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    workflow = txt2img_workflow(ckpt.name, steps, size, dtype, device)
    out = Path(tempfile.mkdtemp(prefix="ldmgraph-bench-out-"))
    executor = Executor(load_registry(), Environment(output_dir=out, model_dirs=(ckpt.parent,), device=device))
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    ticks: list[float] = []

    def on_event(event) -> None:
        if event.kind == "start":
            cpu[event.node_id] = time.process_time()
        elif event.kind == "done":
            seconds[event.node_id] = event.seconds
            cpu[event.node_id] = time.process_time() - cpu[event.node_id]
        elif event.kind == "progress" and event.node_id == "sampler":
            _sync(device)
            ticks.append(time.perf_counter())

    started = time.perf_counter()
    executor.run(workflow, on_event=on_event)
    total = time.perf_counter() - started
    intervals = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    return {
        "load_s": seconds["ckpt"],
        "load_cpu_s": cpu["ckpt"],
        "step_s": statistics.median(intervals),
        "decode_s": seconds["decode"],
        "total_s": total,
        "peak_rss_gib": peak_rss_gib(),
        **_gpu_peak(device),
    }


def run_diffusers(ckpt: Path, steps: int, size: int, unet_channels: int = 320, dtype: str = "file",
                  device: str = "cpu") -> dict[str, float]:
    """diffusers' StableDiffusionPipeline on the same weights, timed the same way (`dtype` "file"
    keeps the file's fp32)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldmgraph.models import configs, diffusers_keys
    from ldmgraph.models.text_encoders import clip_config
    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    started, started_cpu = time.perf_counter(), time.process_time()
    state = load_file(str(ckpt))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    unet_config = configs.sd1_unet(model_channels=unet_channels)
    unet = UNet2DConditionModel.from_config(diffusers_keys.unet_config_to_diffusers(unet_config))
    unet.load_state_dict(diffusers_keys.unet_to_diffusers(part("model.diffusion_model."), unet_config))
    vae = AutoencoderKL.from_config(diffusers_keys.vae_config_to_diffusers(configs.sd_vae()))
    vae.load_state_dict(diffusers_keys.vae_to_diffusers(part("first_stage_model.")))
    text_encoder = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(clip_config("clip-l"))))
    text_encoder.load_state_dict(part("cond_stage_model.transformer."), strict=False)
    state.clear()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="linspace",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder())),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    pipe = pipe.to(device, torch_dtype)
    _sync(device)
    load, load_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    ticks: list[float] = []

    def on_step(pipeline, i, t, kwargs):
        _sync(device)
        ticks.append(time.perf_counter())
        return kwargs

    run_started = time.perf_counter()
    with torch.no_grad():
        latents = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=CFG,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
            callback_on_step_end=on_step,
        ).images
        decode_started = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        _sync(device)
        decode = time.perf_counter() - decode_started
    intervals = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    return {
        "load_s": load,
        "load_cpu_s": load_cpu,
        "step_s": statistics.median(intervals),
        "decode_s": decode,
        "total_s": load + (time.perf_counter() - run_started),
        "peak_rss_gib": peak_rss_gib(),
        **_gpu_peak(device),
    }


def worker(kind: str, ckpt: Path, steps: int, size: int, unet_channels: int, dtype: str = "file",
           device: str = "cpu") -> dict[str, float]:
    """Run one side in a fresh process and read its JSON figures."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--ckpt",
        str(ckpt),
        "--steps",
        str(steps),
        "--size",
        str(size),
        "--unet-channels",
        str(unet_channels),
        "--dtype",
        dtype,
        "--device",
        device,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ldmgraph-bench-sd15")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--worker", choices=["ours", "diffusers"])
    parser.add_argument("--dtype", choices=["file", "fp32", "fp16", "bf16"], default="file",
                        help="weights and compute precision of both sides (file: the checkpoint's fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument(
        "--unet-channels", type=int, default=320, help="320 = SD1.5; smaller for a smoke test"
    )
    args = parser.parse_args()
    if args.worker:
        run = run_ours if args.worker == "ours" else run_diffusers
        print(json.dumps(run(args.ckpt, args.steps, args.size, args.unet_channels, args.dtype, args.device)))
        return
    ckpt = ensure_checkpoint(args.workdir, args.unet_channels)
    ours = worker("ours", ckpt, args.steps, args.size, args.unet_channels, args.dtype, args.device)
    theirs = worker("diffusers", ckpt, args.steps, args.size, args.unet_channels, args.dtype, args.device)
    for name, figures in (("ldmgraph", ours), ("diffusers", theirs)):
        print(name, " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    ratio = ours["step_s"] / theirs["step_s"]
    print(
        f"load_s={ours['load_s']:.2f} load_cpu_s={ours['load_cpu_s']:.2f} step_s={ours['step_s']:.3f} decode_s={ours['decode_s']:.2f} "
        f"total_s={ours['total_s']:.2f} peak_rss_gib={ours['peak_rss_gib']:.2f} step_ratio_vs_diffusers={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
