"""Conditioning ablation: how the caption reaches the U-Net, measured on ldmgraph's own data set.

    python benchmarks/conditioning_ablation.py                   # the study (a few hours on 2 cores)
    python benchmarks/conditioning_ablation.py --steps 200 --eval-every 100 --samples 32 --label smoke

Each variant trains the shipped text-to-image recipe (U-Net widths 32/64/64, the shipped
autoencoder and scale factor, the same latent pool, batch, seed, learning rate, offset noise and
noise schedule) for the same number of steps; only the conditioning differs
(``ldmgraph.train.conditioning``):

- xattn_frozen: frozen MiniLM context by cross-attention at every attention level (the shipped model)
- xattn_joint: a BERT-tokenised transformer trained from scratch with the U-Net (the paper's recipe)
- vector_only: the pooled MiniLM vector added to the timestep embedding; no cross-attention
  (self-attention blocks stay where the cross-attention ones were)
- xattn_lowres_only: frozen MiniLM by cross-attention in the 4x4 middle block only
- both (``--with-both``): cross-attention everywhere plus the pooled vector

Every ``--eval-every`` steps each variant is exported as a bundled file and scored with the judge
of ``ldmgraph evaluate`` on held-out one-object captions and two-object captions (pairs of held-out
combinations); the two-object score is the mean of its colour, shape and position accuracies.
Training speed is images per CPU-second of the training segments (the machine is shared, so
process CPU time, not wall time), sampling cost the CPU milliseconds of one guided sampler step
(a batch of 8 images, cond and uncond, 16 U-Net evaluations). Everything lives under ``--out``
(default runs/ablation); re-running the same command continues every variant from its checkpoint
and skips what was already scored. The table (``README.md``), the plot (``score_vs_steps.png``)
and the raw figures (``results.json``) go to ``--docs`` (default docs/ablation). The last line is
``xattn_frozen=<s> xattn_joint=<s> vector_only=<s> xattn_lowres_only=<s> best=<name>`` with each
variant's two-object mean score at its last scored step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, dict[str, Any]] = {
    "xattn_frozen": {},
    "xattn_joint": {"text_encoder": "transformer"},
    "vector_only": {"route": "vector", "cross_attention": "none"},
    "xattn_lowres_only": {"cross_attention": "lowest"},
    "both": {"route": "both"},
}
DESCRIPTIONS = {
    "xattn_frozen": "frozen MiniLM, cross-attention at 16x16, 8x8 and the 4x4 middle block (shipped recipe)",
    "xattn_joint": "BERT-tokenised transformer (2 layers, width 128) trained with the U-Net, cross-attention as shipped",
    "vector_only": "pooled MiniLM vector added to the timestep embedding; no cross-attention",
    "xattn_lowres_only": "frozen MiniLM, cross-attention in the 4x4 middle block only",
    "both": "cross-attention as shipped plus the pooled vector",
}
COLOURS = {"xattn_frozen": (31, 119, 180), "xattn_joint": (214, 39, 40), "vector_only": (44, 160, 44),
           "xattn_lowres_only": (255, 127, 14), "both": (148, 103, 189)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per variant (default 1500)")
    p.add_argument("--eval-every", type=int, default=500, help="score every this many steps (default 500)")
    p.add_argument("--batch-size", type=int, default=48, help="images per step (the shipped model's 48)")
    p.add_argument("--samples", type=int, default=96, help="generated images per score (one- and two-object each)")
    p.add_argument("--sampler-steps", type=int, default=20, help="dpmpp_2m / karras steps when scoring")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale when scoring")
    p.add_argument("--pool-size", type=int, default=9000, help="training images (the shipped model's 9000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--with-both", action="store_true", help="also train the 'both' variant")
    p.add_argument("--only", nargs="*", default=None, help="train/score only these variants")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--docs", type=Path, default=Path("docs/ablation"))
    p.add_argument("--label", default="study", help="'smoke' marks a small trial run in the table's heading")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.samples < 1:
        p.error("--steps, --eval-every and --samples must be at least 1")
    return args


# --- the fixed parts: autoencoder, pool ----------------------------------------------------------


def shipped_txt2img() -> Path:
    from ldmgraph.train.export import BUNDLED_NAMES, assets_dir

    return assets_dir() / BUNDLED_NAMES["ldm"]


def prepare(out: Path, pool_size: int, threads: int) -> tuple[Path, Path, float]:
    """The autoencoder run folder (the shipped autoencoder's weights) and the latent pool; the scale factor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldmgraph.train.export import load_autoencoder
    from ldmgraph.train.pool import build_contexts, build_latents

    ae_dir, pool_dir = out / "autoencoder", out / "pool"
    with safe_open(str(shipped_txt2img()), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
        if not (ae_dir / "checkpoint.safetensors").exists():
            tensors = {"ema." + k.removeprefix("first_stage_model."): f.get_tensor(k)
                       for k in f.keys() if k.startswith("first_stage_model.")}
            ae_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(ae_dir / "checkpoint.safetensors"))
            state = {"config": {"ddconfig": meta["vae"]["ddconfig"], "embed_dim": meta["vae"]["embed_dim"]},
                     "step": meta["training"]["autoencoder_steps"], "source": str(shipped_txt2img().name)}
            (ae_dir / "state.json").write_text(json.dumps(state, indent=1))
    scale = float(meta["scale_factor"])
    if not (pool_dir / "contexts.safetensors").exists():
        build_contexts(pool_dir, 0, pool_size, 0)
    if not (pool_dir / "latents.safetensors").exists():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        ae, _ = load_autoencoder(ae_dir)
        build_latents(ae, pool_dir, 0, pool_size)
        torch.set_num_threads(before)
    return ae_dir, pool_dir, scale


# --- scoring ------------------------------------------------------------------------------------


def generate(ckpt: Any, captions: list[str], seed: int, steps: int, cfg: float) -> Any:
    """Images for captions through the library's sampler; the pooled vector goes as ``y`` to U-Nets that take one."""
    from ldmgraph.diffusion import CondEntry, Latent, sample

    takes_y = getattr(ckpt.unet.diffusion_model, "num_classes", None) is not None
    enc, empty = ckpt.text_encoder.encode(list(captions)), ckpt.text_encoder.encode([""])
    n = len(captions)
    pos = CondEntry(context=enc.context.float(), pooled=enc.pooled.float() if takes_y else None)
    neg = CondEntry(context=empty.context.float().expand(n, -1, -1),
                    pooled=empty.pooled.float().expand(n, -1) if takes_y else None)
    import torch

    out = sample(ckpt.unet, Latent(samples=torch.zeros(n, 4, 16, 16)), [pos], [neg], seed=seed, steps=steps,
                 cfg=cfg, sampler="dpmpp_2m", schedule="karras")
    return ckpt.vae.decode(out.samples).numpy()


def score(path: Path, samples: int, steps: int, cfg: float, seed: int = 1234) -> dict[str, float]:
    """Judge scores (as ``ldmgraph evaluate``) of one exported variant on held-out captions."""
    import numpy as np

    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.evaluate import _chunks, _mean_scores, one_object_prompts, two_object_prompts

    ckpt = load_checkpoint(path)
    chunk = 64
    ones = one_object_prompts(samples)
    img1 = np.concatenate([generate(ckpt, [p for _, p in c], seed + i * chunk, steps, cfg)
                           for i, c in enumerate(_chunks(ones, chunk))])
    s1 = _mean_scores(img1, [[c] for c, _ in ones])
    twos = two_object_prompts(samples)
    img2 = np.concatenate([generate(ckpt, [p for _, p in c], seed + i * chunk, steps, cfg)
                           for i, c in enumerate(_chunks(twos, chunk))])
    s2 = _mean_scores(img2, [c for c, _ in twos])
    return {"one_colour": s1["colour"], "one_shape": s1["shape"], "one_position": s1["position"],
            "one_mean": float(np.mean(list(s1.values()))), "two_colour": s2["colour"], "two_shape": s2["shape"],
            "two_position": s2["position"], "two_mean": float(np.mean(list(s2.values())))}


def costs(path: Path, threads: int, repeats: int = 10) -> dict[str, float]:
    """Parameters (trained, and at inference including a frozen text encoder) and CPU ms per guided step."""
    import torch

    from ldmgraph.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    unet = ckpt.unet.diffusion_model
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in ckpt.text_encoder.parameters())
    frozen = ckpt.text_encoder.kind == "minilm-l6-v2"
    enc = ckpt.text_encoder.encode(["a red circle on the left"] * 16)
    y = enc.pooled.float() if unet.num_classes is not None else None
    x, t = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((16,), 500.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with torch.no_grad():
        ckpt.unet.apply_model(x, t, context=enc.context.float(), y=y)  # warm-up
        start = time.process_time()
        for _ in range(repeats):
            ckpt.unet.apply_model(x, t, context=enc.context.float(), y=y)
        step_ms = (time.process_time() - start) / repeats * 1000
    torch.set_num_threads(before)
    return {"params_trained": n_unet + (0 if frozen else n_text), "params_inference": n_unet + n_text,
            "params_unet": n_unet, "params_text": n_text, "sample_step_cpu_ms": step_ms}


# --- the study ----------------------------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"variants": {}}


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=1))
    os.replace(path.with_suffix(".tmp"), path)


def run_variant_to(name: str, target: int, args: argparse.Namespace, pool: dict[str, Any], scale: float,
                   ae_dir: Path, record: dict[str, Any]) -> None:
    """Train one variant up to step ``target`` (resuming), then export and score it there once."""
    from ldmgraph.train.export import export_bundled
    from ldmgraph.train.ldm import LDMConfig, train_ldm

    folder = args.out / name
    cfg = LDMConfig(kind="ldm", steps=target, batch_size=args.batch_size, seed=args.seed, scale_factor=scale,
                    offset_noise=0.1, **VARIANTS[name])
    state_path = folder / "state.json"
    done = json.loads(state_path.read_text())["step"] if state_path.exists() else 0
    if done > target:  # trained past this point in an earlier session with other --eval-every: not scorable
        return
    if done < target:
        wall, cpu = time.time(), time.process_time()
        train_ldm(cfg, pool, folder, resume=True, progress=False, threads=args.threads)
        now = json.loads(state_path.read_text())["step"]
        record["train_cpu_seconds"] = record.get("train_cpu_seconds", 0.0) + time.process_time() - cpu
        record["train_wall_seconds"] = record.get("train_wall_seconds", 0.0) + time.time() - wall
        record["timed_steps"] = record.get("timed_steps", 0) + now - done
        print(f"{name}: trained to step {now} ({time.time() - wall:.0f} s)", file=sys.stderr, flush=True)
    key = str(target)
    if key in record.setdefault("scores", {}):
        return
    path = folder / f"export_{target}.safetensors"
    export_bundled("ldm", folder, ae_dir, scale, path)
    t0 = time.process_time()
    record["scores"][key] = score(path, args.samples, args.sampler_steps, args.cfg)
    record["eval_cpu_seconds"] = record.get("eval_cpu_seconds", 0.0) + time.process_time() - t0
    record.update(costs(path, args.threads))
    for old in folder.glob("export_*.safetensors"):  # keep only the latest export
        if old != path:
            old.unlink()
    print(f"{name} @ {target}: {record['scores'][key]}", file=sys.stderr, flush=True)


def milestones(steps: int, every: int) -> list[int]:
    points = list(range(every, steps + 1, every))
    return points if points and points[-1] == steps else [*points, steps]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [n for n in VARIANTS if n != "both" or args.with_both]
    if args.only:
        unknown = sorted(set(args.only) - set(VARIANTS))
        if unknown:
            print(f"--only: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
            return 2
        names = [n for n in VARIANTS if n in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    study = {"batch_size": args.batch_size, "pool_size": args.pool_size, "seed": args.seed,
             "samples": args.samples, "sampler_steps": args.sampler_steps, "cfg": args.cfg}
    study_path = args.out / "study.json"
    if study_path.exists() and json.loads(study_path.read_text()) != study:
        print(f"{args.out} holds a study with other settings ({study_path.read_text().strip()}); use another --out "
              "or the same settings to continue it", file=sys.stderr)
        return 2
    study_path.write_text(json.dumps(study, indent=1))

    from ldmgraph.train.pool import load_pool

    ae_dir, pool_dir, scale = prepare(args.out, args.pool_size, args.threads)
    pool = load_pool(pool_dir)
    results_path = args.out / "results.json"
    results = load_results(results_path)
    started = time.time()
    for target in milestones(args.steps, args.eval_every):  # all variants advance together
        for name in names:
            record = results["variants"].setdefault(name, {})
            run_variant_to(name, target, args, pool, scale, ae_dir, record)
            save_json(results_path, results)
        write_docs(args, results, names)  # after each round, so an interrupted study still shows its figures
    results["last_session_wall_seconds"] = time.time() - started
    save_json(results_path, results)
    write_docs(args, results, names)
    finals = {n: last_score(results["variants"][n])[1]["two_mean"] for n in names}
    best = max(finals, key=lambda n: finals[n])
    print(" ".join(f"{n}={v:.3f}" for n, v in finals.items()) + f" best={best}")
    return 0


# --- table and plot -----------------------------------------------------------------------------


def write_docs(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> None:
    args.docs.mkdir(parents=True, exist_ok=True)
    save_json(args.docs / "results.json", {"settings": vars_of(args), **results})
    plot(results, names, args.docs / "score_vs_steps.png", args.label)
    (args.docs / "README.md").write_text(table(args, results, names))


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def last_score(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, scores) of a variant's latest scored step."""
    step = max(int(k) for k in record["scores"])
    return step, record["scores"][str(step)]


def table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> str:
    import torch

    cpu_minutes = sum(r.get("train_cpu_seconds", 0) + r.get("eval_cpu_seconds", 0)
                      for r in results["variants"].values()) / 60
    wall_minutes = sum(r.get("train_wall_seconds", 0) for r in results["variants"].values()) / 60
    heading = "SMOKE RUN (not the study's result)" if args.label == "smoke" else f"{args.label}"
    lines = [
        f"# Conditioning ablation: {heading}",
        "",
        f"Command: `python benchmarks/conditioning_ablation.py --steps {args.steps} --eval-every {args.eval_every} "
        f"--batch-size {args.batch_size} --samples {args.samples} --pool-size {args.pool_size} --threads "
        f"{args.threads}{' --with-both' if 'both' in names else ''} --label {args.label}`",
        "",
        f"{args.steps} training steps per variant, batch {args.batch_size}, {args.pool_size} training images, seed "
        f"{args.seed}; scores from {args.samples} one-object and {args.samples} two-object held-out captions "
        f"({args.sampler_steps} dpmpp_2m steps, cfg {args.cfg}). Machine: {platform.machine()}"
        f"{' ' + platform.processor() if platform.processor() else ''}, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
        f"{args.threads} thread(s); {cpu_minutes:.0f} CPU minutes in all (training {wall_minutes:.0f} wall "
        f"minutes); {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "| variant | conditioning | two-object mean | colour / shape / position (two) | one-object mean | "
        "train img/CPU-s | sampler step (CPU ms, 8 images + CFG) | trained params | params at inference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results["variants"].get(n, {})
        if not r.get("scores"):
            continue
        step, s = last_score(r)
        # training speed of the segments this study timed ("-": trained in an interrupted session)
        timed = r.get("timed_steps", 0)
        speed = f"{args.batch_size * timed / r['train_cpu_seconds']:.1f}" if timed else "-"
        lines.append(f"| {n} | {DESCRIPTIONS[n]} ({step} steps) | {s['two_mean']:.3f} | {s['two_colour']:.2f} / {s['two_shape']:.2f} "
                     f"/ {s['two_position']:.2f} | {s['one_mean']:.3f} | {speed} | {r['sample_step_cpu_ms']:.0f} | "
                     f"{r['params_trained'] / 1e6:.2f}M | {r['params_inference'] / 1e6:.2f}M |")
    lines += ["", "Two-object mean score against training steps:", "", "![score vs steps](score_vs_steps.png)", "",
              "| variant | " + " | ".join(f"step {k}" for k in milestones(args.steps, args.eval_every)) + " |",
              "|---|" + "---|" * len(milestones(args.steps, args.eval_every))]
    for n in names:
        sc = results["variants"].get(n, {}).get("scores", {})
        lines.append(f"| {n} | " + " | ".join(f"{sc[str(k)]['two_mean']:.3f}" if str(k) in sc else "-"
                                              for k in milestones(args.steps, args.eval_every)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], names: list[str], path: Path, label: str) -> None:
    """Two-object mean score against training steps, one line per variant (a PNG drawn with Pillow)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 440, 60, 190, 40, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    series = {n: sorted((int(k), v["two_mean"]) for k, v in results["variants"].get(n, {}).get("scores", {}).items())
              for n in names}
    xmax = max((k for s in series.values() for k, _ in s), default=1)
    ymax = max(0.1, min(1.0, 1.1 * max((v for s in series.values() for _, v in s), default=1.0)))

    def at(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / xmax, height - bottom - (height - top - bottom) * value / ymax)

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        v = ymax * i / 5
        x0, y0 = at(0, v)
        d.line([x0 - 4, y0, x0, y0], fill="black")
        d.text((x0 - 40, y0 - 6), f"{v:.2f}", fill="black")
        s = xmax * i / 5
        x1, y1 = at(s, 0)
        d.line([x1, y1, x1, y1 + 4], fill="black")
        d.text((x1 - 12, y1 + 8), f"{s:.0f}", fill="black")
    d.text((left, 10), f"two-object mean judge score vs training steps ({label})", fill="black")
    d.text(((width - right + left) / 2 - 40, height - 20), "training steps", fill="black")
    for j, (n, points) in enumerate(series.items()):
        colour = COLOURS[n]
        xy = [at(k, v) for k, v in points]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 18 * j
        d.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=3)
        d.text((width - right + 36, ly), n, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
