"""Applying a LoRA in place and restoring the base, against diffusers' fuse_lora / unfuse_lora.

    python benchmarks/lora.py               # SD1.5-size U-Net, rank 64 (about 7 GB of RAM, minutes)
    python benchmarks/lora.py --small       # a small U-Net, for a quick check of the script

A random SD1.5-size U-Net (diffusers' `UNet2DConditionModel` with SD1.5's config; ours holds the very
same tensors through the key map, no copy) gets a random rank-64 LoRA on every attention projection
(to_q, to_k, to_v, to_out.0 of attn1 and attn2) and both feed-forward projections of every
transformer block, saved as an fp16 kohya file; each delta's spread is 1% of its weight's
(`--relative-delta`). Restoring without a backup recomputes each delta and subtracts it; the
elements where that does not round back (more as the delta grows: about 2% here, 12% at 0.1) are
noted at apply time, 8 bytes each, which is what the peak above the LoRA's own pages is made of. Figures, CPU time of this process, one run:

- apply_s / restore_s: entering and leaving `patch_scope` for the LoRA's handle (the patches are
  added in place; restoring puts every weight back bit for bit, checked here).
- peak_extra_vs_lora_file: peak RSS while applying (VmHWM, reset just before reading the LoRA)
  above the RSS with the base loaded, over the LoRA file's size.
- strength_change_reloads: model loads counted by the executor's model cache when a workflow on
  the bundled model re-runs with another LoRA strength (the base is never read again).
- diffusers_fuse_s / diffusers_unfuse_s and the ratios: diffusers' `fuse_lora` / `unfuse_lora` of
  the same LoRA on the same tensors (after its `load_lora_adapter`, not timed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SMALL_UNET = dict(
    block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def rss(field: str = "VmRSS") -> int:
    """Bytes of this process's resident set (VmRSS) or its peak since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def lora_factors(
    unet: torch.nn.Module, rank: int, relative: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Random rank-`rank` factors (diffusers' module names) on every attention and feed-forward projection,
    scaled so that each delta's spread is `relative` times its weight's."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
            o, i = module.weight.shape
            up_std = relative * float(module.weight.detach().std()) * i**0.5 / rank**0.5
            out[name] = (torch.randn(rank, i, generator=g) / i**0.5, torch.randn(o, rank, generator=g) * up_std,
                         float(rank))
    return out


def kohya_file(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], folder: Path) -> Path:
    from safetensors.torch import save_file

    from ldmgraph.models.lora import flat

    tensors = {}
    for name, (down, up, alpha) in factors.items():
        stem = "lora_unet_" + flat(name)
        tensors |= {stem + ".lora_down.weight": down.half(), stem + ".lora_up.weight": up.half(),
                    stem + ".alpha": torch.tensor(alpha).half()}
    path = folder / "bench_lora.safetensors"
    save_file(tensors, str(path))
    return path


def cpu_seconds(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def ours(reference: torch.nn.Module, path: Path) -> tuple[float, float, float]:
    """(apply_s, restore_s, peak extra bytes) for our patch scope on a U-Net sharing `reference`'s tensors."""
    from models import ours_sharing_unet

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.handles import DiffusionModelHandle
    from ldmgraph.models.lora import lora_patches, read_lora
    from ldmgraph.models.patches import patch_scope, patched

    unet = ours_sharing_unet(reference)
    handle = DiffusionModelHandle(unet, info=SimpleNamespace(unet=dk.unet_config_from_diffusers(dict(reference.config))))
    before = {k: v.clone() for k, v in list(unet.state_dict().items())[:40]}
    base_rss = rss()
    reset_peak()
    patches, _, plan = lora_patches(read_lora(path), unet=handle)
    assert not plan.unmatched and len(patches) == len(plan.groups["unet"])
    scope = patch_scope(patched(handle, patches))
    apply_s = cpu_seconds(scope.__enter__)
    peak = rss("VmHWM") - base_rss
    undo = unet.__dict__["_ldmgraph_patch_state"].undo.values()  # the restore notes, for the report
    noted = [u.notes.index.numel() + u.notes.far_index.numel() for u in undo if u.notes is not None]
    total = sum(unet.get_parameter(p.target).numel() for p in patches)
    print(f"elements noted for an exact restore: {sum(noted) / total:.2%} of {total / 1e6:.0f}M patched")
    restore_s = cpu_seconds(lambda: scope.__exit__(None, None, None))
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base was not restored bit for bit"
    return apply_s, restore_s, peak


def theirs(reference: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[float, float]:
    """(fuse_s, unfuse_s) of diffusers on the same tensors and the same LoRA (rank = alpha: scale 1)."""
    state = {}
    for name, (down, up, _) in factors.items():
        state[f"unet.{name}.lora_A.weight"] = down.half().float()
        state[f"unet.{name}.lora_B.weight"] = up.half().float()
    reference.load_lora_adapter(state, prefix="unet", adapter_name="bench")
    fuse_s = cpu_seconds(lambda: reference.fuse_lora(lora_scale=1.0, adapter_names=["bench"]))
    unfuse_s = cpu_seconds(reference.unfuse_lora)
    return fuse_s, unfuse_s


def strength_change_reloads() -> int:
    """Model-cache loads when a workflow on the bundled model re-runs with another LoRA strength."""
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.models.lora import write_kohya_lora
    from ldmgraph.nodes.common import MODEL_CACHE_KEY
    from ldmgraph.nodes.loaders import BUNDLED_TXT2IMG
    from ldmgraph.plugins import load_registry

    bundled = Path(__file__).resolve().parents[1] / "ldmgraph" / "assets" / "models"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "loras").mkdir()
        unet = load_checkpoint(bundled / BUNDLED_TXT2IMG, text_encoder=False).unet.diffusion_model
        g = torch.Generator().manual_seed(1)
        factors = {name: (torch.randn(4, m.weight.shape[1], generator=g) * 0.1,
                          torch.randn(m.weight.shape[0], 4, generator=g) * 0.1, 4.0)
                   for name, m in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))}
        write_kohya_lora(folder / "loras" / "style.safetensors", factors)
        executor = Executor(load_registry(), Environment(input_dir=folder, output_dir=folder / "out",
                                                         model_dirs=(folder, bundled)))

        def run(strength: float) -> None:
            link = lambda n, o: {"node": n, "output": o}  # noqa: E731
            nodes = {
                "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": BUNDLED_TXT2IMG}},
                "lora": {"type": "LoraLoaderModelOnly", "inputs": {"model": link("ckpt", "model"),
                                                                   "lora_name": "style", "strength_model": strength}},
                "pos": {"type": "TextEncode", "inputs": {"text_encoder": link("ckpt", "text_encoder"), "text": "a red circle"}},
                "latent": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64, "vae": link("ckpt", "vae")}},
                "sample": {"type": "Sampler", "inputs": {"model": link("lora", "model"), "positive": link("pos", "conditioning"),
                                                         "negative": link("pos", "conditioning"), "latent": link("latent", "latent"),
                                                         "steps": 2, "cfg": 1.0}},
            }
            executor.run({"format": "ldmgraph/1", "nodes": nodes}, outputs=["sample"])

        run(1.0)
        loads = executor.resources[MODEL_CACHE_KEY].stats.loads
        run(0.5)
        return int(executor.resources[MODEL_CACHE_KEY].stats.loads - loads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small U-Net instead of SD1.5's")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time counts them all)")
    parser.add_argument("--relative-delta", type=float, default=0.01,
                        help="each delta's spread over its weight's (more noted elements as it grows)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.no_grad():
        reference = UNet2DConditionModel(**(SMALL_UNET if args.small else SD15_UNET)).eval()
    factors = lora_factors(reference, args.rank, args.relative_delta)
    with tempfile.TemporaryDirectory() as tmp:
        path = kohya_file(factors, Path(tmp))
        size = path.stat().st_size
        params = sum(p.numel() for p in reference.parameters()) / 1e6
        print(f"U-Net {params:.0f}M params; LoRA rank {args.rank} on {len(factors)} projections, "
              f"{size / 2**20:.1f} MiB (fp16)")
        apply_s, restore_s, peak = ours(reference, path)
    fuse_s, unfuse_s = theirs(reference, factors)
    print(f"ldmgraph apply {apply_s:.2f} s, restore {restore_s:.2f} s (CPU); peak extra RSS "
          f"{peak / 2**20:.1f} MiB; diffusers fuse_lora {fuse_s:.2f} s, unfuse_lora {unfuse_s:.2f} s")
    reloads = strength_change_reloads()
    print(f"apply_s={apply_s:.3f} restore_s={restore_s:.3f} peak_extra_vs_lora_file={peak / size:.2f} "
          f"strength_change_reloads={reloads} apply_vs_diffusers_fuse={apply_s / fuse_s:.2f} "
          f"restore_vs_diffusers_unfuse={restore_s / unfuse_s:.2f}")


if __name__ == "__main__":
    main()
