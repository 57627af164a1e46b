"""SDXL at full size with random weights: a U-Net step against diffusers', loading, base + refiner.

    OMP_NUM_THREADS=1 python benchmarks/sdxl.py [--workdir /tmp/ldmgraph-bench-sdxl] [--keep]

Each phase runs in its own process, so each peak RSS is its own (VmHWM):

1. `step`: diffusers' `UNet2DConditionModel` with SDXL base's config (2.57 B parameters) in bf16,
   random N(0, 0.02) weights, and ldmgraph's `UNetModel` on the very same tensors (renamed by
   `diffusers_keys`, no copy; time and class embeddings kept in float32 as the loader does). One
   classifier-free-guidance step each (batch 2: cond + uncond, 64x64 latents, a 77-token context of
   2048, the 2816-wide `adm` vector), one warm-up then the smaller of two timed calls, CPU seconds
   (`time.process_time`). `step_bf16_vs_diffusers_bf16` = ours / diffusers'.
2. Writes SDXL base and refiner single files in bf16 (U-Net, CLIP ViT-L, OpenCLIP ViT-bigG in
   OpenCLIP's names, autoencoder; 6.9 GB and 6.1 GB), streaming one random tensor at a time.
3. `load`: `load_checkpoint` of the base file as it is (bf16); `load_peak_vs_file` = (peak RSS during
   the load - RSS before) / file size.
4. `workflow`: `workflows/sdxl_refiner.json` at 512x512, 2 steps (the base 1, the refiner 1), files
   loaded in their bf16; `base_refiner_peak_gib` = the process's peak RSS, printed with the bound
   it must stay under (the two files' sizes + 2 GiB: nothing held twice).

The last line: `step_bf16_vs_diffusers_bf16=.. load_peak_vs_file=.. base_refiner_peak_gib=..`.
Heavy: about 14 GB of disk and up to the two files' sizes of RAM in phase 4; run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

DIFFUSERS_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def rss_gib(field: str = "VmHWM") -> float:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), GiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def _init_(name: str, tensor: Any, generator: Any = None) -> Any:
    """Random weights that keep activations finite: norm scales 1, biases 0, the rest N(0, 0.02)."""
    if name.endswith("weight") and ("norm" in name or ".ln_" in name or name.startswith("ln_")):
        return tensor.fill_(1.0)
    if name.endswith("bias"):
        return tensor.zero_()
    return tensor.normal_(0.0, 0.02, generator=generator)


# --- phase 1: one CFG step, ours and diffusers' on the same bf16 tensors ----------------------------


def phase_step() -> dict[str, float]:
    import torch
    from diffusers import UNet2DConditionModel

    from ldmgraph.models import diffusers_keys as dk
    from ldmgraph.models.unet import UNetModel
    from ldmgraph.models.weights import assign_weights, build_on_meta

    torch.manual_seed(0)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**DIFFUSERS_BASE).to(torch.bfloat16)
    theirs = theirs.to_empty(device="cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            _init_(name, p)
    config = dk.unet_config_from_diffusers({"_class_name": "UNet2DConditionModel", **theirs.config})
    ours: Any = build_on_meta(UNetModel, **config)
    assign_weights(ours, dk.unet_from_diffusers(theirs.state_dict(), config), path="random", component="U-Net")
    ours.keep_fp32().eval()
    x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 2048, dtype=torch.bfloat16)
    pooled, time_ids = torch.randn(2, 1280), torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2)
    y = torch.cat([pooled, theirs.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)

    def run_ours() -> Any:
        return ours(x, t, context=context, y=y)

    def run_theirs() -> Any:
        cond = {"text_embeds": pooled.to(torch.bfloat16), "time_ids": time_ids}
        return theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample

    with torch.no_grad():
        for run in (run_ours, run_theirs):
            run()  # warm-up
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(2):
            for name, run in (("ours", run_ours), ("theirs", run_theirs)):
                start = time.process_time()
                run()
                times[name].append(time.process_time() - start)
    return {"ours_step_cpu_s": min(times["ours"]), "diffusers_step_cpu_s": min(times["theirs"]),
            "step_peak_rss_gib": rss_gib()}


# --- phase 2: bf16 single files, one tensor in memory at a time ---------------------------------------


def _shapes(factory: Any, *args: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        module = factory(*args, **kwargs)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _clip_shapes(hidden: int, layers: int, heads: int, act: str) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, hidden_act=act, vocab_size=49408, max_position_embeddings=77)
    shapes = _shapes(CLIPTextModel, config)
    return {k: s for k, s in shapes.items() if not k.endswith("position_ids")}


def _openclip_shapes(hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (49408, hidden), "positional_embedding": (77, hidden),
        "ln_final.weight": (hidden,), "ln_final.bias": (hidden,), "text_projection": (hidden, hidden),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        out.update({p + "attn.in_proj_weight": (3 * hidden, hidden), p + "attn.in_proj_bias": (3 * hidden,),
                    p + "attn.out_proj.weight": (hidden, hidden), p + "attn.out_proj.bias": (hidden,),
                    p + "ln_1.weight": (hidden,), p + "ln_1.bias": (hidden,), p + "ln_2.weight": (hidden,),
                    p + "ln_2.bias": (hidden,), p + "mlp.c_fc.weight": (4 * hidden, hidden),
                    p + "mlp.c_fc.bias": (4 * hidden,), p + "mlp.c_proj.weight": (hidden, 4 * hidden),
                    p + "mlp.c_proj.bias": (hidden,)})
    return out


def checkpoint_shapes(refiner: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of an SDXL base or refiner single file, by its original key."""
    from ldmgraph.models import configs, sdxl
    from ldmgraph.models.autoencoder import AutoencoderKL
    from ldmgraph.models.unet import UNetModel

    unet = sdxl.refiner_unet() if refiner else sdxl.base_unet()
    shapes = {"model.diffusion_model." + k: s for k, s in _shapes(UNetModel, **unet).items()}
    shapes.update({"first_stage_model." + k: s for k, s in _shapes(AutoencoderKL, **configs.sd_vae()).items()})
    g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    shapes.update({g + k: s for k, s in _openclip_shapes(1280, 32).items()})
    if not refiner:
        shapes.update({"conditioner.embedders.0.transformer.text_model." + k: s
                       for k, s in _clip_shapes(768, 12, 12, "quick_gelu").items()})
    return shapes


def write_random_bf16(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A safetensors file of random bf16 tensors, written tensor by tensor (header, then the data)."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(1)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            tensor = _init_(key, torch.empty(shape, dtype=torch.float32), gen)
            f.write(tensor.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return path.stat().st_size


# --- phases 3 and 4 -------------------------------------------------------------------------------


def phase_load(path: Path) -> dict[str, float]:
    from ldmgraph.models.checkpoint import load_checkpoint

    before = rss_gib("VmRSS")
    start = time.process_time()
    checkpoint = load_checkpoint(path)
    seconds = time.process_time() - start
    assert checkpoint.info.architecture == "sdxl-base", checkpoint.info.architecture
    return {"load_cpu_s": seconds, "load_peak_increase_gib": rss_gib() - before}


def phase_workflow(models: Path, out: Path) -> dict[str, float]:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry

    doc = json.loads((ROOT / "workflows" / "sdxl_refiner.json").read_text())
    values = {"base_ckpt_name": "sdxl_base.safetensors", "refiner_ckpt_name": "sdxl_refiner.safetensors",
              "width": 512, "height": 512, "steps": 2, "switch_step": 1}
    executor = Executor(load_registry(), Environment(input_dir=out, output_dir=out, model_dirs=(models,)))
    start = time.process_time()
    executor.run(doc, overrides=values)
    return {"workflow_cpu_s": time.process_time() - start, "base_refiner_peak_gib": rss_gib()}


def _child(phase: str, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    if done.returncode:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldmgraph-bench-sdxl"))
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.phase:
        result = {"step": phase_step, "load": lambda: phase_load(Path(opts.args[0])),
                  "workflow": lambda: phase_workflow(Path(opts.args[0]), Path(opts.args[1]))}[opts.phase]()
        print(json.dumps(result))
        return
    opts.workdir.mkdir(parents=True, exist_ok=True)
    figures = _child("step")
    print(json.dumps(figures), flush=True)
    sizes = {}
    for name, refiner in (("sdxl_base", False), ("sdxl_refiner", True)):
        path = opts.workdir / f"{name}.safetensors"
        if not path.is_file():
            write_random_bf16(path, checkpoint_shapes(refiner))
        sizes[name] = path.stat().st_size
    load = _child("load", str(opts.workdir / "sdxl_base.safetensors"))
    print(json.dumps(load), flush=True)
    (opts.workdir / "out").mkdir(exist_ok=True)
    flow = _child("workflow", str(opts.workdir), str(opts.workdir / "out"))
    bound = (sizes["sdxl_base"] + sizes["sdxl_refiner"]) / 2**30 + 2
    print(json.dumps({**flow, "files_gib": sum(sizes.values()) / 2**30, "bound_gib": bound}), flush=True)
    if not opts.keep:
        shutil.rmtree(opts.workdir, ignore_errors=True)
    print(f"step_bf16_vs_diffusers_bf16={figures['ours_step_cpu_s'] / figures['diffusers_step_cpu_s']:.3f} "
          f"load_peak_vs_file={load['load_peak_increase_gib'] * 2**30 / sizes['sdxl_base']:.3f} "
          f"base_refiner_peak_gib={flow['base_refiner_peak_gib']:.2f}")


if __name__ == "__main__":
    main()
