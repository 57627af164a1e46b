"""Conditioning ablation: how the caption reaches the U-Net, measured on ldmgraph's own data set over seeds.

    python benchmarks/conditioning_ablation.py --seeds 3              # the study: about 4.7 CPU hours, 1 thread
    nohup python benchmarks/conditioning_ablation.py --seeds 3 > ablation.log 2>&1 &   # the same, in the background
    python benchmarks/conditioning_ablation.py --seeds 3 --report-only  # rewrite the docs from what is done

Each variant trains the shipped text-to-image recipe (U-Net widths 32/64/64, the shipped
autoencoder and scale factor, the same latent pool, batch, learning rate, offset noise and noise
schedule) for the same number of steps; only the conditioning differs (``ldmgraph.train.conditioning``):

- xattn_frozen: frozen MiniLM context by cross-attention at every attention level (the shipped model)
- xattn_joint: a BERT-tokenised transformer trained from scratch with the U-Net (the paper's recipe)
- vector_only: the pooled MiniLM vector added to the timestep embedding; no cross-attention
  (self-attention blocks stay where the cross-attention ones were)
- xattn_lowres_only: frozen MiniLM by cross-attention in the 4x4 middle block only
- both (``--with-both``): cross-attention everywhere plus the pooled vector

Each variant trains once per training seed (``--seed``, ``--seed`` + 1, ... ``--seeds`` of them: the
seed draws the initial weights, the batches and the noise; the data and the schedule stay the same),
each in its own run folder ``--out/<variant>/seed<k>``. All variants and seeds advance together,
milestone by milestone: every ``--eval-every`` steps each run is exported as a bundled file and
scored with the judge of ``ldmgraph evaluate`` on the same held-out one-object captions and
two-object captions (pairs of held-out combinations; the two-object score is the mean of its
colour, shape and position accuracies), drawn with the same sampler noise. At the final step each
run is also scored on a larger set (``--final-samples`` one-object and as many two-object
captions); those scores are the headline. Per variant the headline is the mean over seeds with its
95% t-interval over seeds, and each pair of variants gets the difference of means with Welch's
interval (``ldmgraph.train.intervals``); a difference whose interval covers 0 is "not
distinguishable at this budget".

Training speed is images per CPU-second of the training segments (the machine is shared, so
process CPU time, not wall time), sampling cost the CPU milliseconds of one guided sampler step
(a batch of 8 images, cond and uncond, 16 U-Net evaluations). Re-running the same command continues
every run from its checkpoint and skips what was already scored, so the study can be stopped at
any time; the docs are rewritten after every scored run and say what is done. The table
(``README.md``), the plot (``score_vs_steps.png``) and the raw figures (``results.json``) go to
``--docs`` (default docs/ablation). The last line is ``xattn_frozen=<mean> xattn_joint=<mean>
vector_only=<mean> xattn_lowres_only=<mean> best=<name> best_separated=<yes|no>``: each variant's
mean two-object score over seeds at the final step, the best mean, and whether the best variant's
difference interval against every other excludes 0. ``--seeds 1 --final-samples 0`` is the
one-seed study as it was first run (run folder ``--out/<variant>`` is still continued if present).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmgraph.train.intervals import Interval, difference_interval, mean_interval, verdict  # noqa: E402

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
# what identifies a study: a run folder trained or scored under other values cannot be continued
STUDY_KEYS = ("batch_size", "pool_size", "seed", "samples", "sampler_steps", "cfg")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per variant (default 1500)")
    p.add_argument("--eval-every", type=int, default=500, help="score every this many steps (default 500)")
    p.add_argument("--batch-size", type=int, default=48, help="images per step (the shipped model's 48)")
    p.add_argument("--samples", type=int, default=96, help="generated images per milestone score (one- and two-object each)")
    p.add_argument("--final-samples", type=int, default=256,
                   help="captions of each kind scored at the final step (default 256; 0: the milestone score is the headline)")
    p.add_argument("--sampler-steps", type=int, default=20, help="dpmpp_2m / karras steps when scoring")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale when scoring")
    p.add_argument("--pool-size", type=int, default=9000, help="training images (the shipped model's 9000)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per variant: --seed, --seed + 1, ... (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--with-both", action="store_true", help="also train the 'both' variant")
    p.add_argument("--only", nargs="*", default=None, help="train/score only these variants (processes with disjoint lists can share one --out: "
                   "one per core; give each its own --docs and rewrite the docs with --report-only at the end)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--docs", type=Path, default=Path("docs/ablation"))
    p.add_argument("--label", default="study", help="'smoke' marks a small trial run in the table's heading")
    p.add_argument("--report-only", action="store_true",
                   help="train and score nothing: rewrite --docs from --out's results and print the last line")
    args = p.parse_args(argv)
    if min(args.steps, args.eval_every, args.samples, args.seeds) < 1 or args.final_samples < 0:
        p.error("--steps, --eval-every, --samples and --seeds must be at least 1, --final-samples at least 0")
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


def load_results(path: Path, first_seed: int) -> dict[str, Any]:
    """The study's results; a one-seed record from before seeds (scores at the variant's top) becomes its seed's."""
    results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    for name, record in results["variants"].items():
        if "seeds" not in record:
            results["variants"][name] = {"seeds": {str(first_seed): record} if record else {}}
    return results


def save_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=1))
    os.replace(path.with_suffix(".tmp"), path)


def save_results(path: Path, results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Write this process's variants into ``results.json``, keeping the other variants as they are on disk.

    Processes with disjoint ``--only`` lists can share one ``--out`` (two cores, two processes): each
    one's save holds a lock, re-reads the file and replaces only its own variants' records.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads(path.read_text()) if path.exists() else {"variants": {}}
        merged = {**on_disk, **{k: v for k, v in results.items() if k != "variants"}}
        merged["variants"] = {**on_disk.get("variants", {}), **{n: results["variants"][n] for n in names
                                                                  if n in results["variants"]}}
        save_json(path, merged)  # atomic; its fixed temporary name is safe under the lock
    return merged


def training_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + args.seeds))


def run_folder(args: argparse.Namespace, name: str, seed: int) -> Path:
    """``--out/<variant>/seed<k>``; the first seed continues a one-seed study's ``--out/<variant>`` if there is one."""
    legacy = args.out / name
    if seed == args.seed and (legacy / "state.json").exists():
        return legacy
    return legacy / f"seed{seed}"


def trained_step(folder: Path) -> int:
    state = folder / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.exists() else 0


def train_to(name: str, seed: int, target: int, args: argparse.Namespace, pool: dict[str, Any], scale: float,
             record: dict[str, Any]) -> bool:
    """Train one run up to step ``target`` (resuming); False when it is already past it (not scorable there)."""
    from ldmgraph.train.ldm import LDMConfig, train_ldm

    folder = run_folder(args, name, seed)
    done = trained_step(folder)
    if done > target:  # trained past this point in an earlier session with other --eval-every
        return False
    if done < target:
        cfg = LDMConfig(kind="ldm", steps=target, batch_size=args.batch_size, seed=seed, scale_factor=scale,
                        offset_noise=0.1, **VARIANTS[name])
        wall, cpu = time.time(), time.process_time()
        train_ldm(cfg, pool, folder, resume=True, progress=False, threads=args.threads)
        now = trained_step(folder)
        record["train_cpu_seconds"] = record.get("train_cpu_seconds", 0.0) + time.process_time() - cpu
        record["train_wall_seconds"] = record.get("train_wall_seconds", 0.0) + time.time() - wall
        record["timed_steps"] = record.get("timed_steps", 0) + now - done
        print(f"{name} seed {seed}: trained to step {now} ({time.time() - wall:.0f} s)", file=sys.stderr, flush=True)
    record["trained_to"] = target
    return True


def score_run(name: str, seed: int, target: int, args: argparse.Namespace, ae_dir: Path, scale: float,
              record: dict[str, Any]) -> None:
    """Export one run at ``target`` and score it once on the milestone captions, and at the final step on the larger set."""
    from ldmgraph.train.export import export_bundled

    folder = run_folder(args, name, seed)
    key, scores = str(target), record.setdefault("scores", {})
    want_final = target == args.steps and args.final_samples > 0 and final_scores(record, args) is None
    if key in scores and not want_final:
        return
    path = folder / f"export_{target}.safetensors"
    export_bundled("ldm", folder, ae_dir, scale, path)  # again after an interruption: a half-written file is no export
    t0 = time.process_time()
    if key not in scores:
        scores[key] = score(path, args.samples, args.sampler_steps, args.cfg)
        print(f"{name} seed {seed} @ {target}: {scores[key]}", file=sys.stderr, flush=True)
    if want_final:
        record["final"] = {"step": target, "samples": args.final_samples,
                           "scores": score(path, args.final_samples, args.sampler_steps, args.cfg)}
        print(f"{name} seed {seed} @ {target}, {args.final_samples} + {args.final_samples} captions: "
              f"{record['final']['scores']}", file=sys.stderr, flush=True)
    record["eval_cpu_seconds"] = record.get("eval_cpu_seconds", 0.0) + time.process_time() - t0
    record["scored_on"] = time.strftime("%Y-%m-%d", time.gmtime())
    record.update(costs(path, args.threads))
    for old in folder.glob("export_*.safetensors"):  # keep only the latest export
        if old != path:
            old.unlink()


def milestones(steps: int, every: int) -> list[int]:
    points = list(range(every, steps + 1, every))
    return points if points and points[-1] == steps else [*points, steps]


def check_study(args: argparse.Namespace) -> str | None:
    """Why ``--out`` cannot be continued with these settings (None when it can), and record them."""
    study = {k: getattr(args, k) for k in STUDY_KEYS}
    path = args.out / "study.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if {k: earlier.get(k) for k in STUDY_KEYS} != study:
            return (f"{args.out} holds a study with other settings ({path.read_text().strip()}); use another --out "
                    "or the same settings to continue it")
    path.write_text(json.dumps(study, indent=1))
    return None


def variant_names(args: argparse.Namespace) -> list[str]:
    names = [n for n in VARIANTS if n != "both" or args.with_both]
    return [n for n in VARIANTS if n in args.only] if args.only else names


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    unknown = sorted(set(args.only or []) - set(VARIANTS))
    if unknown:
        print(f"--only: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    names = variant_names(args)
    results_path = args.out / "results.json"
    if args.report_only:
        if not results_path.exists():
            print(f"--report-only: {results_path} does not exist; run the study first", file=sys.stderr)
            return 2
        results = load_results(results_path, args.seed)
        write_docs(args, results, names)
        print(last_line(args, results, names))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    problem = check_study(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    run_study(args, names, load_results(results_path, args.seed), results_path)
    print(last_line(args, load_results(results_path, args.seed), names))
    return 0


def run_study(args: argparse.Namespace, names: list[str], results: dict[str, Any], results_path: Path) -> None:
    """Every run to every milestone in turn (all variants and seeds advance together), saving after each."""
    from ldmgraph.train.pool import load_pool

    ae_dir, pool_dir, scale = prepare(args.out, args.pool_size, args.threads)
    pool = load_pool(pool_dir)
    started = time.time()
    for target in milestones(args.steps, args.eval_every):
        for name in names:
            for seed in training_seeds(args):
                runs = results["variants"].setdefault(name, {}).setdefault("seeds", {})
                record = runs.setdefault(str(seed), {})
                if train_to(name, seed, target, args, pool, scale, record):
                    write_docs(args, save_results(results_path, results, names), names)  # the docs say what is done
                    score_run(name, seed, target, args, ae_dir, scale, record)
                write_docs(args, save_results(results_path, results, names), names)
    results["last_session_wall_seconds"] = time.time() - started
    write_docs(args, save_results(results_path, results, names), names)


# --- figures over seeds -------------------------------------------------------------------------


def final_scores(record: dict[str, Any], args: argparse.Namespace) -> dict[str, float] | None:
    """A run's headline scores: the larger caption set at the final step (or the milestone set with --final-samples 0)."""
    if args.final_samples == 0:
        return record.get("scores", {}).get(str(args.steps))
    final = record.get("final")
    if final and final["step"] == args.steps and final["samples"] == args.final_samples:
        return final["scores"]
    return None


def runs_of(results: dict[str, Any], name: str, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """This study's runs of a variant (its seeds' records), by seed."""
    runs = results["variants"].get(name, {}).get("seeds", {})
    return {s: runs[str(s)] for s in training_seeds(args) if str(s) in runs}


def headline(results: dict[str, Any], name: str, args: argparse.Namespace, key: str = "two_mean") -> dict[int, float]:
    """A figure of each seed that has its final scores, by seed."""
    out = {}
    for seed, record in runs_of(results, name, args).items():
        final = final_scores(record, args)
        if final is not None:
            out[seed] = final[key]
    return out


def milestone_values(results: dict[str, Any], name: str, args: argparse.Namespace, step: int) -> list[float]:
    return [r["scores"][str(step)]["two_mean"] for r in runs_of(results, name, args).values()
            if str(step) in r.get("scores", {})]


def pairwise(results: dict[str, Any], names: list[str], args: argparse.Namespace) -> list[tuple[str, str, Interval]]:
    """Each pair of variants with final scores: the difference of their mean two-object scores (Welch's interval)."""
    done = [n for n in names if headline(results, n, args)]
    return [(a, b, difference_interval(list(headline(results, a, args).values()),
                                       list(headline(results, b, args).values())))
            for i, a in enumerate(done) for b in done[i + 1:]]


def best_variant(results: dict[str, Any], names: list[str], args: argparse.Namespace) -> tuple[str | None, bool]:
    """The variant with the best mean final two-object score, and whether its interval against every other excludes 0."""
    means = {n: mean_interval(list(v.values())).estimate for n in names if (v := headline(results, n, args))}
    if not means:
        return None, False
    best = max(means, key=lambda n: means[n])
    others = [difference_interval(list(headline(results, best, args).values()), list(headline(results, n, args).values()))
              for n in means if n != best]
    return best, bool(others) and all(not d.covers_zero for d in others)


def last_line(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> str:
    """``<variant>=<mean> ... best=<name> best_separated=<yes|no>`` (nan: a variant with no finished seed)."""
    means = {n: (sum(v.values()) / len(v) if (v := headline(results, n, args)) else math.nan) for n in names}
    best, separated = best_variant(results, names, args)
    return " ".join(f"{n}={m:.3f}" for n, m in means.items()) + f" best={best or '-'} best_separated={'yes' if separated else 'no'}"


# --- table and plot -----------------------------------------------------------------------------


def write_docs(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> None:
    args.docs.mkdir(parents=True, exist_ok=True)
    save_json(args.docs / "results.json", {**results, "settings": vars_of(args)})
    plot(results, names, args, args.docs / "score_vs_steps.png")
    (args.docs / "README.md").write_text(table(args, results, names))


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def shown(interval: Interval) -> str:
    """``mean [low, high]``, or the estimate alone where one seed gives no interval."""
    if math.isinf(interval.low) or math.isinf(interval.high):
        return f"{interval.estimate:.3f} (no interval: 1 seed)"
    return str(interval)


def command(args: argparse.Namespace, names: list[str]) -> str:
    return (f"python benchmarks/conditioning_ablation.py --seeds {args.seeds} --seed {args.seed} --steps {args.steps} "
            f"--eval-every {args.eval_every} --batch-size {args.batch_size} --samples {args.samples} --final-samples "
            f"{args.final_samples} --pool-size {args.pool_size} --threads {args.threads}"
            f"{' --with-both' if 'both' in names else ''} --label {shlex.quote(args.label)}")


def table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> str:
    """The generated page: settings, the pooled figures with intervals, the pairwise table, per-seed figures, progress."""
    heading = "SMOKE RUN (not the study's result)" if args.label == "smoke" else f"{args.label}"
    lines = [f"# Conditioning ablation: {heading}", "", f"Command: `{command(args, names)}`", "",
             settings_text(args, results), "", intervals_text(args), "", progress_text(args, results, names), ""]
    lines += final_table(args, results, names) + [""] + pairs_table(args, results, names) + [""]
    lines += [f"Last line: `{last_line(args, results, names)}`", ""]
    lines += seeds_table(args, results, names) + [""] + steps_table(args, results, names)
    return "\n".join(lines) + "\n"


def settings_text(args: argparse.Namespace, results: dict[str, Any]) -> str:
    from importlib.metadata import version  # not torch itself: the report is written without importing it

    records = [r for v in results["variants"].values() for r in v.get("seeds", {}).values()]
    cpu_minutes = sum(r.get("train_cpu_seconds", 0) + r.get("eval_cpu_seconds", 0) for r in records) / 60
    wall_minutes = sum(r.get("train_wall_seconds", 0) for r in records) / 60
    seeds = ", ".join(str(s) for s in training_seeds(args))
    dates = sorted(r["scored_on"] for r in records if "scored_on" in r)
    when = f"scored {dates[0]} to {dates[-1]}" if dates else f"report written {time.strftime('%Y-%m-%d', time.gmtime())}"
    final = (f"at the final step also {args.final_samples} one-object and {args.final_samples} two-object captions "
             "(the headline figures)" if args.final_samples else "the headline is the last milestone's score")
    return (f"{args.steps} training steps per run, batch {args.batch_size}, {args.pool_size} training images; "
            f"{args.seeds} training seed(s) per variant ({seeds}): the seed draws the initial weights, the batches and "
            f"the noise, the data and schedule are the same. Every {args.eval_every} steps each run is scored on the "
            f"same {args.samples} one-object and {args.samples} two-object held-out captions; {final}; "
            f"{args.sampler_steps} dpmpp_2m steps, cfg {args.cfg}, the same sampler noise for every checkpoint. "
            f"Machine: {platform.machine()}{' ' + platform.processor() if platform.processor() else ''}, "
            f"{os.cpu_count()} cores shared with other jobs, torch {version('torch')}, {args.threads} thread(s); "
            f"{cpu_minutes:.0f} CPU minutes so far (training {wall_minutes:.0f} wall minutes); {when}.")


def intervals_text(args: argparse.Namespace) -> str:
    return ("**Intervals.** A variant's figure is the mean over its training seeds with the 95% t-interval over "
            "seeds (Student: mean +- t(0.975, n-1) s / sqrt(n), s the standard deviation of the per-seed scores). "
            "A difference between two variants is the difference of their means with Welch's 95% interval. Every "
            "checkpoint is scored on the same captions with the same sampler noise, so an interval says how much a "
            "figure moves with another training run, not with another draw of captions. A difference whose "
            "interval covers 0 is *not distinguishable at this budget*; with one seed there is no interval and "
            "no difference is distinguishable.")


def progress_text(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> str:
    total = len(names) * args.seeds
    finished = sum(len(headline(results, n, args)) for n in names)
    state = "complete" if finished == total else "in progress: the same command continues it"
    return (f"**Progress.** {finished} of {total} runs ({len(names)} variants x {args.seeds} seeds) have their "
            f"final scores ({state}); the per-seed table shows each run's scored steps.")


def final_table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> list[str]:
    captions = args.final_samples or args.samples
    lines = [f"Final step ({args.steps}), {captions} one-object and {captions} two-object captions, mean over seeds "
             "with its 95% t-interval over seeds:", "",
             "| variant | conditioning | seeds done | two-object mean [95% interval] | colour / shape / position (two) | "
             "one-object mean [95% interval] | train img/CPU-s | sampler step (CPU ms, 8 images + CFG) | trained params "
             "| params at inference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        two = headline(results, n, args)
        if not two:
            lines.append(f"| {n} | {DESCRIPTIONS[n]} | 0 of {args.seeds} | - | - | - | - | - | - | - |")
            continue
        parts = [sum(v.values()) / len(v) for v in (headline(results, n, args, f"two_{k}")
                                                      for k in ("colour", "shape", "position"))]
        runs = list(runs_of(results, n, args).values())
        timed, cpu = sum(r.get("timed_steps", 0) for r in runs), sum(r.get("train_cpu_seconds", 0.0) for r in runs)
        speed = f"{args.batch_size * timed / cpu:.1f}" if timed and cpu else "-"
        step_ms = [r["sample_step_cpu_ms"] for r in runs if "sample_step_cpu_ms" in r]
        sized = [r for r in runs if "params_trained" in r]
        params = (f"{sized[0]['params_trained'] / 1e6:.2f}M | {sized[0]['params_inference'] / 1e6:.2f}M"
                  if sized else "- | -")
        lines.append(f"| {n} | {DESCRIPTIONS[n]} | {len(two)} of {args.seeds} | {shown(mean_interval(list(two.values())))} | "
                     f"{parts[0]:.2f} / {parts[1]:.2f} / {parts[2]:.2f} | "
                     f"{shown(mean_interval(list(headline(results, n, args, 'one_mean').values())))} | {speed} | "
                     f"{f'{sum(step_ms) / len(step_ms):.0f}' if step_ms else '-'} | {params} |")
    return lines


def pairs_table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> list[str]:
    lines = ["Each pair of variants: the difference of their mean two-object scores at the final step, with "
             "Welch's 95% interval, and what it supports:", "",
             "| pair (a - b) | difference | 95% interval (Welch) | verdict |", "|---|---|---|---|"]
    for a, b, diff in pairwise(results, names, args):
        bounds = ("unbounded (1 seed)" if math.isinf(diff.low) or math.isinf(diff.high)
                  else f"[{diff.low:+.3f}, {diff.high:+.3f}]")
        lines.append(f"| {a} - {b} | {diff.estimate:+.3f} | {bounds} | {verdict(a, b, diff)} |")
    best, separated = best_variant(results, names, args)
    if best:
        lines += ["", f"Best mean: {best}; " + ("its interval against every other variant excludes 0." if separated else
                                                "not separated from every other variant at this budget.")]
    return lines


def seeds_table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> list[str]:
    points = milestones(args.steps, args.eval_every)
    captions = args.final_samples or args.samples
    lines = ["Per seed (two-object mean on the milestone captions at each step; the final-step figures on "
             f"{captions} + {captions} captions):", "",
             "| variant | seed | trained to | " + " | ".join(f"step {k}" for k in points) +
             " | final two-object | colour / shape / position (two) | final one-object |",
             "|---|---|---|" + "---|" * len(points) + "---|---|---|"]
    for n in names:
        for seed in training_seeds(args):
            r = runs_of(results, n, args).get(seed, {})
            sc, final = r.get("scores", {}), final_scores(r, args)
            cells = [f"{sc[str(k)]['two_mean']:.3f}" if str(k) in sc else "-" for k in points]
            tail = (f"{final['two_mean']:.3f} | {final['two_colour']:.2f} / {final['two_shape']:.2f} / "
                    f"{final['two_position']:.2f} | {final['one_mean']:.3f}" if final else "- | - | -")
            trained = r.get("trained_to", max((int(k) for k in sc), default=0))
            lines.append(f"| {n} | {seed} | {trained} | " + " | ".join(cells) + f" | {tail} |")
    return lines


def steps_table(args: argparse.Namespace, results: dict[str, Any], names: list[str]) -> list[str]:
    points = milestones(args.steps, args.eval_every)
    lines = [f"Two-object mean against training steps ({args.samples} + {args.samples} milestone captions; "
             "mean over the seeds scored there, 95% t-interval over seeds; bars in the plot):", "",
             "![score vs steps](score_vs_steps.png)", "",
             "| variant | " + " | ".join(f"step {k}" for k in points) + " |", "|---|" + "---|" * len(points)]
    for n in names:
        cells = []
        for k in points:
            values = milestone_values(results, n, args, k)
            cells.append("-" if not values else f"{values[0]:.3f} (n=1)" if len(values) == 1
                         else f"{mean_interval(values)} (n={len(values)})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, Any], names: list[str], args: argparse.Namespace, path: Path) -> None:
    """Mean two-object score over seeds against training steps, one line per variant, bars of the 95% t-interval (Pillow)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 440, 60, 190, 40, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    series = {n: [(k, mean_interval(v)) for k in milestones(args.steps, args.eval_every)
                  if (v := milestone_values(results, n, args, k))] for n in names}
    xmax = max((k for s in series.values() for k, _ in s), default=1)
    tops = [iv.high if math.isfinite(iv.high) else iv.estimate for s in series.values() for _, iv in s]
    ymax = max(0.1, min(1.0, 1.1 * max(tops, default=1.0)))

    def at(step: float, value: float) -> tuple[float, float]:
        value = min(max(value, 0.0), ymax)
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
        d.text((x1 - 12, y1 + 8), f"{s:g}", fill="black")
    d.text((left, 8), f"two-object mean judge score vs training steps ({args.label})", fill="black")
    d.text((left, 22), f"mean over {args.seeds} seed(s); bars: 95% t-interval over seeds", fill="black")
    d.text(((width - right + left) / 2 - 40, height - 20), "training steps", fill="black")
    for j, (n, points) in enumerate(series.items()):
        colour, shift = COLOURS[n], 4 * (j - (len(series) - 1) / 2)  # side by side, so the bars do not hide each other
        xy = [(at(k, iv.estimate)[0] + shift, at(k, iv.estimate)[1]) for k, iv in points]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for (x, y), (k, iv) in zip(xy, points, strict=True):
            if math.isfinite(iv.low) and math.isfinite(iv.high):
                y_low, y_high = at(k, iv.low)[1], at(k, iv.high)[1]
                d.line([x, y_low, x, y_high], fill=colour, width=1)
                d.line([x - 3, y_low, x + 3, y_low], fill=colour)
                d.line([x - 3, y_high, x + 3, y_high], fill=colour)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 10 + 18 * j
        d.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=3)
        d.text((width - right + 36, ly), n, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    sys.exit(main())
