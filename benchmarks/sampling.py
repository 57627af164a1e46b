"""Benchmark full sampling loops: ldmgraph's `sample()` vs a diffusers loop, same U-Net weights.

    python benchmarks/sampling.py            # small model and the SD1.5 config
    python benchmarks/sampling.py --quick    # small model only
    python benchmarks/sampling.py --profile  # one step by operator and by Python function

Both loops run Euler over the same 10-step "normal" schedule (diffusers: EulerDiscreteScheduler,
timestep_spacing="linspace"; 999/9 is whole, so the sigmas are identical), classifier-free
guidance 7.5 with cond and uncond in one batch of 2, 32x32 latents, random weights. The U-Nets
share the same tensors: diffusers' UNet2DConditionModel, and our UNetModel given its weights
through `ldmgraph.models.diffusers_keys` (no copy) inside a `DiffusionModelHandle`. Both start
from the same noise (drawn from the seed on the CPU, scaled by sqrt(1 + sigma_max^2)); the final
latents' max |difference| is printed as a check. Per-step time: differences of timestamps taken
once per step (after a device sync), median over interleaved runs (ours, theirs, theirs, ours, ...;
at the default `--repeats 3`, 12 of each for the small model, whose 4-second loops are otherwise at
the mercy of a few seconds of load elsewhere on the host, and 2 for SD1.5) after a warm-up run each. The clock is this process's CPU time (`time.process_time`), not the wall
clock, so that other work on a shared machine does not land in either loop's figures; with one
torch thread on the CPU that is the loops' own compute. (On a GPU the CPU clock does not see the
device's work: use an idle machine and read the wall-clock figures of `benchmarks/gpu.py` there.) The last line is `step_ratio_small=<x> step_ratio_sd15=<x>`
(ldmgraph / diffusers; below 1.0 means ldmgraph is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# diffusers UNet2DConditionModel kwargs (the rest are diffusers' SD1.x defaults)
SMALL_UNET = dict(
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    cross_attention_dim=384,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
STEPS, CFG, SEED, SIDE, TOKENS = 10, 7.5, 1234, 32, 77


def build(config: dict[str, Any], device: str) -> tuple[torch.nn.Module, Any]:
    """The diffusers U-Net (seeded random weights) and our model handle sharing its tensors."""
    from diffusers import UNet2DConditionModel

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.configs import sd_schedule
    from ldmgraph.models.handles import DiffusionModelHandle
    from ldmgraph.models.unet import UNetModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config).eval().to(device)
    kwargs = dk.unet_config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        ours = UNetModel(**kwargs)
    ours.load_state_dict(dk.unet_from_diffusers(reference.state_dict(), kwargs), assign=True, strict=True)
    return reference, DiffusionModelHandle(ours.eval(), prediction_type="eps", schedule=sd_schedule())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(handle: Any, positive: list, negative: list, device: str) -> tuple[list[float], torch.Tensor]:
    from ldmgraph.diffusion import Latent, sample

    stamps: list[float] = []

    def stamp(info: dict[str, Any]) -> None:
        _sync(device)
        stamps.append(time.process_time())

    latent = Latent(torch.zeros(1, 4, SIDE, SIDE))
    out = sample(
        handle,
        latent,
        positive,
        negative,
        seed=SEED,
        steps=STEPS,
        cfg=CFG,
        sampler="euler",
        schedule="normal",
        device=device,
        callback=stamp,
    )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], out.samples


def run_diffusers(
    unet: torch.nn.Module, context: torch.Tensor, device: str
) -> tuple[list[float], torch.Tensor]:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace"
    )
    scheduler.set_timesteps(STEPS, device=device)
    noise = torch.randn((4, SIDE, SIDE), generator=torch.Generator().manual_seed(SEED))[None].to(device)
    x = noise * (1 + scheduler.sigmas.max() ** 2) ** 0.5
    stamps: list[float] = []
    with torch.inference_mode():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps = unet(model_in, t, encoder_hidden_states=context).sample
            uncond, cond = eps.chunk(2)
            _sync(device)
            stamps.append(time.process_time())
            x = scheduler.step(uncond + CFG * (cond - uncond), t, x).prev_sample
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], x.cpu()


def bench(config: dict[str, Any], label: str, device: str, repeats: int) -> float:
    from ldmgraph.diffusion import CondEntry

    unet, handle = build(config, device)
    width = config["cross_attention_dim"]
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(1, TOKENS, width, generator=g), torch.randn(1, TOKENS, width, generator=g)
    context = torch.cat([uncond, cond]).to(device)
    positive, negative = [CondEntry(context=cond.to(device))], [CondEntry(context=uncond.to(device))]
    run_ours(handle, positive, negative, device)  # warm-up
    run_diffusers(unet, context, device)
    mine: list[float] = []
    theirs: list[float] = []
    for repeat in range(repeats):  # alternate who goes first, against drifting machine load
        for who in ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours"):
            if who == "ours":
                steps, ours_latent = run_ours(handle, positive, negative, device)
                mine += steps
            else:
                steps, their_latent = run_diffusers(unet, context, device)
                theirs += steps
    ours_ms, theirs_ms = statistics.median(mine) * 1e3, statistics.median(theirs) * 1e3
    diff = (ours_latent - their_latent).abs().max().item()
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(
        f"sampling {label} ({params:.0f}M params, euler {STEPS} steps, cfg {CFG}, {SIDE}x{SIDE} latents, {device}): "
        f"ldmgraph {ours_ms:.1f} ms/step, diffusers {theirs_ms:.1f} ms/step, ratio {ours_ms / theirs_ms:.3f}, "
        f"final max|diff| {diff:.1e}"
    )
    return ours_ms / theirs_ms


class _NullUNet(torch.nn.Module):
    """A network that costs almost nothing, to time the loops' own overhead per step."""

    def forward(self, x: torch.Tensor, t: Any, encoder_hidden_states: Any = None) -> Any:
        return _Sample(x * 0.1)


class _Sample:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


def bench_overhead(device: str, repeats: int) -> None:
    """Loop overhead per step with a near-free network (ours: denoiser, CFG, sampler; theirs: scheduler)."""
    from ldmgraph.diffusion import CondEntry, NoiseSchedule

    class NullModel:
        prediction_type = "eps"
        noise_schedule = NoiseSchedule.from_config()

        def apply_model(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return x * 0.1

    context = torch.zeros(2, TOKENS, 768, device=device)
    positive, negative = [CondEntry(context=context[:1])], [CondEntry(context=context[1:])]
    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats + 1):
        mine += run_ours(NullModel(), positive, negative, device)[0]
        theirs += run_diffusers(_NullUNet(), context, device)[0]
    ours_us, theirs_us = statistics.median(mine) * 1e6, statistics.median(theirs) * 1e6
    print(
        f"loop overhead (near-free network, {device}): ldmgraph {ours_us:.0f} us/step, diffusers {theirs_us:.0f} us/step"
    )


def profile_step(device: str, rows: int = 15) -> None:
    """What one step costs, by operator and by Python function (docs/perf/step_overhead.md):
    torch.profiler over one U-Net call of each implementation on the small model, then cProfile
    of ldmgraph's loop around a near-free network (the loop's own work, 100 steps)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from ldmgraph.diffusion import CondEntry, Latent, NoiseSchedule, sample

    unet, handle = build(SMALL_UNET, device)
    g = torch.Generator().manual_seed(7)
    context = torch.randn(2, TOKENS, SMALL_UNET["cross_attention_dim"], generator=g).to(device)
    x, t = torch.randn(2, 4, SIDE, SIDE, generator=g).to(device), torch.full((2,), 500.0, device=device)
    calls = {"ldmgraph": lambda: handle.apply_model(x, t, context=context),
             "diffusers": lambda: unet(x, t, encoder_hidden_states=context)}
    with torch.inference_mode():
        for name, call in calls.items():
            call()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                call()
            print(f"one U-Net call, {name}, by operator and shape:")
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))

    class NullModel:
        prediction_type = "eps"
        noise_schedule = NoiseSchedule.from_config()

        def apply_model(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return x * 0.1

    cond = torch.zeros(1, TOKENS, 768)

    def loop() -> None:
        sample(NullModel(), Latent(torch.zeros(1, 4, SIDE, SIDE)), [CondEntry(context=cond)], [CondEntry(context=cond)],
               seed=SEED, steps=100, cfg=CFG, sampler="euler", schedule="normal", callback=lambda info: None)

    loop()  # warm-up: first calls compile and cache
    profiler = cProfile.Profile()
    profiler.enable()
    loop()
    profiler.disable()
    print("ldmgraph's loop around a near-free network, 100 steps, by function:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the SD1.5 config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each loop (the small model's loops, about 4 s each, run 4x as many)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on the CPU, for stable timings on a shared machine)",
    )
    parser.add_argument("--profile", action="store_true", help="profile one step instead (no ratios)")
    args = parser.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.profile:
        profile_step(args.device)
        return
    bench_overhead(args.device, args.repeats)
    small = bench(SMALL_UNET, "small", args.device, 4 * args.repeats)
    sd15 = None if args.quick else bench(SD15_UNET, "sd15", args.device, max(1, args.repeats - 1))
    print(f"step_ratio_small={small:.3f} step_ratio_sd15={'skipped' if sd15 is None else f'{sd15:.3f}'}")


if __name__ == "__main__":
    main()
