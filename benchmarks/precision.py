"""bf16 against fp32: U-Net step speed (ours and diffusers'), judge scores, PSNR, peak memory.

    python benchmarks/precision.py [--rounds 3] [--samples 256] [--skip-rss] [--threads 1]
    python benchmarks/precision.py --profile-ops    # only the top-10 ops tables (docs/perf/unet_step_profile.md)

One run, the same weights throughout:
1. An SD1.5-size U-Net (diffusers' UNet2DConditionModel defaults, cross-attention 768, seeded
   random weights) and ours sharing its tensors (as `benchmarks/sampling.py` builds them), each
   also cast to bf16 (ours keeps its time embedding in fp32, as the loaders do). One step = one
   forward of a batch of 2 (classifier-free guidance: cond and uncond) on 32x32 latents with a
   77-token context. Timed with the process's CPU-time clock (the machine is shared), median of
   interleaved rounds after a warm-up, one thread by default. `--profile-ops` prints only
   torch.profiler's top-10 ops of our fp32 and bf16 steps.
2. The bundled text-to-image model loaded in fp32 and in bf16: `ldmgraph evaluate`'s text-to-image
   figures drawn with both (`--samples` one-object captions, 256 by default as in `evaluate`, and
   half as many two-object captions), scored by its judge (colour, shape, position); judge_delta
   is the largest |bf16 - fp32| of the six mean scores; PSNR of the one-object bf16 images against
   fp32 (all images' mean squared error), each image's PSNR, and the rounded-weights control.
3. Peak RSS of an SD1.5-size 256 px text-to-image in bf16 (`benchmarks/txt2img_sd15.py`'s graph
   and checkpoint, with the loader's dtype bf16), in its own process.

Last line: ``unet_bf16_vs_fp32= step_bf16_vs_diffusers_fp32= step_bf16_vs_diffusers_bf16=
judge_delta= psnr_bf16_vs_fp32_db= peak_rss_gib_bf16=`` (step ratios: ldmgraph bf16 over the other).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIDE, TOKENS = 32, 77


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def unets(config: dict[str, Any] | None = None, device: str = "cpu",
          precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """name -> callable(x, t, context) for ours and diffusers' U-Net (`config`: diffusers kwargs, by
    default SD1.5's) in each precision, "ours_bf16", "diffusers_bf16", ...; same weights throughout
    (ours keeps its time embedding in fp32 below fp32, as the loaders do)."""
    from sampling import SD15_UNET, build

    reference, handle = build(config or SD15_UNET, device)
    ours32 = handle.diffusion_model

    def ours(model: Any, dtype: torch.dtype) -> Any:
        return lambda x, t, c: model(x, t, context=c.to(dtype))

    def theirs(model: Any, dtype: torch.dtype) -> Any:
        return lambda x, t, c: model(x.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()

    models: dict[str, Any] = {}
    for name in precisions:
        dtype = DTYPES[name]
        low = dtype != torch.float32
        models[f"ours_{name}"] = ours(copy.deepcopy(ours32).to(dtype).keep_fp32() if low else ours32, dtype)
        models[f"diffusers_{name}"] = theirs(copy.deepcopy(reference).to(dtype) if low else reference, dtype)
    return models


def step_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents [2, 4, 32, 32], timesteps and a 77-token context: one CFG step's batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, SIDE, SIDE, generator=g)
    context = torch.randn(2, TOKENS, 768, generator=g)
    return x, torch.tensor([500, 500]), context


def time_steps(models: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median CPU seconds of one CFG step per model (interleaved rounds after a warm-up each)."""
    x, t, context = step_inputs()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        outputs = {name: fn(x, t, context).float() for name, fn in models.items()}  # warm-up
        for _ in range(rounds):
            for name, fn in models.items():
                start = time.process_time()
                fn(x, t, context)
                times[name].append(time.process_time() - start)
    ref = outputs["diffusers_fp32"]
    for name, out in outputs.items():
        print(f"{name}: {statistics.median(times[name]):.3f} s CPU per step "
              f"({' '.join(f'{v:.2f}' for v in times[name])}), "
              f"relative difference to diffusers_fp32 {float((out - ref).norm() / ref.norm()):.4f}")
    return {name: statistics.median(v) for name, v in times.items()}


def profile_ops(models: dict[str, Any], names: tuple[str, ...] = ("ours_fp32", "ours_bf16")) -> None:
    """Print torch.profiler's top-10 ops (by self time) of one step of each model, as Markdown."""
    from torch.profiler import ProfilerActivity, profile

    x, t, context = step_inputs()
    with torch.inference_mode():
        for name in names:
            models[name](x, t, context)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                models[name](x, t, context)
            print(f"\n#### {name}, one step, {torch.get_num_threads()} thread(s)\n\n```")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
            print("```", flush=True)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-20)))  # images in 0..1


def bundled(samples: int, steps: int) -> tuple[float, float]:
    """(judge_delta, PSNR dB of bf16 against fp32) for the bundled text-to-image model.

    The judge scores are `ldmgraph evaluate`'s text-to-image figures, drawn the same way (20 steps,
    cfg 4, seed 1234 per chunk of 64): colour, shape and position on `samples` one-object held-out
    captions and on samples / 2 two-object captions; judge_delta is the largest |bf16 - fp32| of
    the six. The PSNR is over all one-object images (their pooled mean squared error); each image's
    PSNR is summarised too.

    Also printed: a control that separates rounding the weights from computing in bf16: the fp32
    model computing in fp32 with its U-Net weights rounded to bf16 (what any bf16 checkpoint
    stores, whatever runs in fp32). An image whose trajectory sits on a bifurcation (two outcomes,
    e.g. dark or light background) flips with either.
    """
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.handles import Checkpoint
    from ldmgraph.train.evaluate import _mean_scores, one_object_prompts, prompt_images, two_object_prompts

    path = ROOT / "ldmgraph/assets/models/ldmgraph-shapes-txt2img.safetensors"
    prompts = one_object_prompts(samples)
    captions = [p for _, p in prompts]
    pairs = two_object_prompts(max(8, samples // 2))
    scores, images = {}, {}
    checkpoints = {name: load_checkpoint(path, dtype=DTYPES[name]) for name in ("fp32", "bf16")}
    for name, ckpt in checkpoints.items():
        images[name] = prompt_images(ckpt, captions, steps)
        one = _mean_scores(images[name], [[c] for c, _ in prompts])
        two = _mean_scores(prompt_images(ckpt, [p for _, p in pairs], steps), [c for c, _ in pairs])
        scores[name] = {**{f"one_{k}": v for k, v in one.items()}, **{f"two_{k}": v for k, v in two.items()}}
        print(f"bundled txt2img {name}: judge " + " ".join(f"{k}={v:.4f}" for k, v in scores[name].items()),
              flush=True)
    fp32 = checkpoints["fp32"]
    rounded = copy.deepcopy(fp32.unet)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    control = prompt_images(Checkpoint(rounded, fp32.vae, fp32.text_encoder, fp32.info), captions, steps)
    per_image = [_psnr(a, b) for a, b in zip(images["fp32"], images["bf16"], strict=True)]
    low = [i for i, v in enumerate(per_image) if v < 30]
    print(f"per-image PSNR bf16 vs fp32: median {statistics.median(per_image):.1f} dB, mean "
          f"{statistics.fmean(per_image):.1f} dB, min {min(per_image):.1f} dB; under 30 dB: {len(low)} of "
          f"{len(per_image)} ({', '.join(f'{captions[i]!r} {per_image[i]:.1f} dB' for i in low[:8])})")
    print(f"control, fp32 compute with bf16-rounded U-Net weights: PSNR {_psnr(images['fp32'], control):.2f} dB, "
          f"per image under 30 dB: {sum(_psnr(a, b) < 30 for a, b in zip(images['fp32'], control, strict=True))}")
    delta = max(abs(scores["bf16"][k] - scores["fp32"][k]) for k in scores["fp32"])
    return delta, _psnr(images["fp32"], images["bf16"])


def peak_rss_bf16(workdir: Path) -> float:
    """Peak RSS (GiB) of benchmarks/txt2img_sd15.py's 256 px graph with the loader's dtype bf16."""
    import txt2img_sd15 as sd

    ckpt = sd.ensure_checkpoint(workdir)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import txt2img_sd15 as sd\n"
        "from pathlib import Path\n"
        "print(json.dumps(sd.run_ours(Path(sys.argv[2]), 4, 256, dtype='bf16')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(ckpt)], check=True,
                         capture_output=True, text=True)
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SD1.5-size txt2img 256 px in bf16: {result}")
    return float(result["peak_rss_gib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256,
                        help="one-object prompts per precision, and half as many two-object ones "
                             "(ldmgraph evaluate's defaults)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the bundled model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, idle OpenMP threads spinning for a "
                             "descheduled sibling inflate the CPU-time clock)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="only print torch.profiler's top-10 ops of our fp32 and bf16 step (Markdown)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the SD1.5-size txt2img (4.3 GB file)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldmgraph-bench-sd15"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile_ops:
        profile_ops(unets())
        return
    delta, psnr = bundled(args.samples, args.steps)
    print(f"judge_delta={delta:.4f} psnr={psnr:.2f} dB", flush=True)
    s = time_steps(unets(), args.rounds)
    peak = float("nan") if args.skip_rss else peak_rss_bf16(args.workdir)
    print(f"unet_bf16_vs_fp32={s['ours_bf16'] / s['ours_fp32']:.3f} "
          f"step_bf16_vs_diffusers_fp32={s['ours_bf16'] / s['diffusers_fp32']:.3f} "
          f"step_bf16_vs_diffusers_bf16={s['ours_bf16'] / s['diffusers_bf16']:.3f} "
          f"judge_delta={delta:.4f} psnr_bf16_vs_fp32_db={psnr:.2f} peak_rss_gib_bf16={peak:.2f}")


if __name__ == "__main__":
    main()
