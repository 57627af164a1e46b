"""Benchmark ldmgraph's models against diffusers/transformers on identical weights, in one run.

    python benchmarks/models.py            # everything (SD1.5-size parts take minutes on a CPU)
    python benchmarks/models.py --quick    # skips the SD1.5 U-Net and the SD1.5-size load
    python benchmarks/models.py --clock cpu --threads 1   # on a busy shared machine

Figures: medians of interleaved timed calls (ours, theirs, ours, theirs, ...) after a warm-up,
under `torch.inference_mode`; the same weight tensors are shared by both models (our modules
are built on the meta device and given diffusers' tensors through the key map, no copy).
- U-Net forward: a small config (bundled-model size) and the SD1.5 config, batch 2, 32x32 latents.
- VAE: the SD VAE config, encode and decode (decode ratio in the summary).
- Text: transformers `CLIPTextModel` (ViT-L/14 config) vs our `ClipTextEncoder.encode_ids`.
- Load: a random SD1.5-size fp32 checkpoint (U-Net + VAE + CLIP, original layout) is written to
  a temporary folder; a fresh subprocess loads it with `load_checkpoint` and then touches every
  weight; peak RSS (`getrusage` maxrss, which includes the interpreter and torch) / file size.
The last line is the summary: ratios are ldmgraph / reference (below 1.0: we are faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SMALL_UNET = dict(
    block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=384, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)  # diffusers' defaults are SD1.x otherwise
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


CLOCK = {"clock": "wall"}  # set once by main(): "wall" (perf_counter) or "cpu" (process time)


def timed_pair(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int, device: str) -> tuple[float, float]:
    """Medians (seconds) of interleaved calls after one warm-up call each.

    The clock is wall time, or with `--clock cpu` this process's CPU time, which a busy shared
    machine disturbs far less (use it with `--threads 1`, where CPU time is compute time).
    """
    clock = time.process_time if CLOCK["clock"] == "cpu" else time.perf_counter

    def once(fn: Callable[[], Any]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return clock() - start

    once(ours)
    once(theirs)
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        ours_times.append(once(ours))
        theirs_times.append(once(theirs))
    return statistics.median(ours_times), statistics.median(theirs_times)


def ours_sharing_unet(reference: torch.nn.Module) -> torch.nn.Module:
    """Our UNetModel holding the very same tensors as the diffusers model (no copy)."""
    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.unet import UNetModel

    kwargs = dk.unet_config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        ours = UNetModel(**kwargs)
    ours.load_state_dict(dk.unet_from_diffusers(reference.state_dict(), kwargs), assign=True, strict=True)
    return ours.eval()


def bench_unet(config: dict[str, Any], repeats: int, device: str, label: str) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config).eval().to(device)
    ours = ours_sharing_unet(reference)
    x = torch.randn(2, 4, 32, 32, device=device)
    t = torch.tensor([999.0, 500.0], device=device)
    context = torch.randn(2, 77, config["cross_attention_dim"], device=device)
    with torch.inference_mode():
        diff = (ours(x, t, context) - reference(x, t, context).sample).abs().max().item()
        mine, theirs = timed_pair(lambda: ours(x, t, context), lambda: reference(x, t, context), repeats, device)
    params = sum(p.numel() for p in reference.parameters()) / 1e6
    print(f"unet {label} ({params:.0f}M params, batch 2, 32x32): ldmgraph {mine * 1e3:.1f} ms, "
          f"diffusers {theirs * 1e3:.1f} ms, ratio {mine / theirs:.3f}, max|diff| {diff:.1e}")
    return mine / theirs


def bench_vae(repeats: int, device: str, side: int) -> float:
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    reference = DiffusersVAE(**SD_VAE).eval().to(device)
    kwargs = dk.vae_config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        ours = AutoencoderKL(**kwargs)
    ours.load_state_dict(dk.vae_from_diffusers(reference.state_dict()), assign=True, strict=True)
    ours.eval()
    z = torch.randn(1, 4, side, side, device=device)
    image = torch.rand(1, 3, side * 8, side * 8, device=device) * 2 - 1
    with torch.inference_mode():
        diff = (ours.decode(z) - reference.decode(z).sample).abs().max().item()
        dec = timed_pair(lambda: ours.decode(z), lambda: reference.decode(z), repeats, device)
        enc = timed_pair(lambda: ours.encode(image).mean, lambda: reference.encode(image).latent_dist.mean,
                         repeats, device)
    print(f"vae decode (SD VAE, {side}x{side} latent -> {side * 8} px): ldmgraph {dec[0] * 1e3:.1f} ms, "
          f"diffusers {dec[1] * 1e3:.1f} ms, ratio {dec[0] / dec[1]:.3f}, max|diff| {diff:.1e}")
    print(f"vae encode ({side * 8} px): ldmgraph {enc[0] * 1e3:.1f} ms, diffusers {enc[1] * 1e3:.1f} ms, "
          f"ratio {enc[0] / enc[1]:.3f}")
    return dec[0] / dec[1]


def bench_text(repeats: int, device: str) -> float:
    try:
        from ldmgraph.models.text_encoders import ClipTextEncoder, build_clip_text_model, clip_config
    except ImportError as exc:
        print(f"text: ldmgraph.models.text_encoders not available ({exc}); text_ratio=nan")
        return math.nan
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = clip_config("clip-l")
    model = build_clip_text_model(config).to(device)
    ours = ClipTextEncoder(model, kind="clip-l")
    reference = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(config))).eval().to(device)
    reference.load_state_dict(model.state_dict())  # the same weights under the same key names
    ids = torch.randint(1, 49405, (2, 77), device=device)
    ids[:, 0], ids[:, 20:] = 49406, 49407
    with torch.inference_mode():
        diff = (ours.encode_ids(ids).context - reference(input_ids=ids).last_hidden_state).abs().max().item()
        mine, theirs = timed_pair(lambda: ours.encode_ids(ids), lambda: reference(input_ids=ids), repeats, device)
    print(f"text (CLIP ViT-L/14 config, 2 x 77 tokens): ldmgraph {mine * 1e3:.1f} ms, "
          f"transformers {theirs * 1e3:.1f} ms, ratio {mine / theirs:.3f}, max|diff| {diff:.1e}")
    return mine / theirs


# --- peak RSS while loading an SD1.5-size checkpoint --------------------------------------------

_WRITE = r"""
import sys, torch
from ldmgraph.models.unet import UNetModel
from ldmgraph.models.autoencoder import AutoencoderKL
from ldmgraph.models.single_file import save_single_file
from ldmgraph.models.text_encoders import build_clip_text_model, clip_config
with torch.device("meta"):
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768)
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                             ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0), 4)
    text = build_clip_text_model(clip_config("clip-l"))
gen = torch.Generator().manual_seed(0)
def rand(sd):
    return {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in sd.items()}
extra = {"cond_stage_model.transformer.text_model." + k: v for k, v in rand(text.state_dict()).items()}
save_single_file(sys.argv[1], unet=rand(unet.state_dict()), vae=rand(vae.state_dict()), extra=extra)
"""

_LOAD = r"""
import json, resource, sys, time
import torch
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
before = rss_mb()
start = time.perf_counter()
try:
    from ldmgraph.models.checkpoint import load_checkpoint
    checkpoint = load_checkpoint(sys.argv[1])
    modules = [checkpoint.unet, checkpoint.vae, checkpoint.text_encoder]
    how = "ldmgraph.models.checkpoint.load_checkpoint"
except ImportError:
    from safetensors.torch import load_file
    modules = [load_file(sys.argv[1])]
    how = "safetensors.load_file (load_checkpoint not available)"
load_s = time.perf_counter() - start
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
total = 0.0
count = 0
with torch.no_grad():  # touch every weight: a lazily mapped file is read in full here
    for m in modules:
        values = m.state_dict().values() if isinstance(m, torch.nn.Module) else (m or {}).values()
        for t in values:
            total += float(t.float().sum()) if t.is_floating_point() else 0.0
            count += t.numel()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"how": how, "baseline_mb": before, "after_load_mb": after_load, "peak_mb": peak,
                  "load_s": load_s, "elements": count}))
"""


def bench_load_rss() -> float:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix="ldmgraph-bench-") as folder:
        path = Path(folder) / "sd15-random.safetensors"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _WRITE, str(path)], check=True, env=env)
        size_mb = path.stat().st_size / 2**20
        print(f"load: wrote a random SD1.5-size fp32 checkpoint, {size_mb:.0f} MiB, in {time.perf_counter() - start:.0f} s")
        out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], check=True, env=env,
                             capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["peak_mb"] / size_mb
    print(f"load via {result['how']}: {result['load_s']:.2f} s; RSS before {result['baseline_mb']:.0f} MiB, "
          f"peak after load {result['after_load_mb']:.0f} MiB, peak after touching every weight "
          f"{result['peak_mb']:.0f} MiB = {ratio:.3f} x file size "
          f"({(result['peak_mb'] - result['baseline_mb']) / size_mb:.3f} x without the interpreter)")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the SD1.5 U-Net and the SD1.5-size load")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model (medians)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["clock"] = args.clock
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    small = bench_unet(SMALL_UNET, args.repeats, args.device, "small")
    sd15 = math.nan if args.quick else bench_unet(SD15_UNET, max(3, args.repeats // 2), args.device, "SD1.5")
    vae = bench_vae(max(3, args.repeats // 2), args.device, side=16 if args.quick else 32)
    text = bench_text(args.repeats, args.device)
    load = math.nan if args.quick else bench_load_rss()
    print(f"unet_ratio_small={small:.3f} unet_ratio_sd15={sd15:.3f} vae_decode_ratio={vae:.3f} "
          f"text_ratio={text:.3f} load_rss_ratio={load:.3f}")


if __name__ == "__main__":
    main()
