"""``ldmgraph train`` and ``ldmgraph evaluate`` (registered lazily by ``ldmgraph.cli``; no torch at import)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

TRAIN_KINDS = ("autoencoder", "ldm", "superres", "inpaint", "controlnet", "lora")


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``evaluate`` subcommands to the main parser."""
    train = subparsers.add_parser("train", help="train the autoencoder or a latent diffusion model",
                                  description="Train ldmgraph's models on the procedural shapes data set: "
                                  "first the autoencoder, then ldm (text-to-image), superres, inpaint; "
                                  "controlnet trains a ControlNet for the bundled text-to-image model; "
                                  "lora trains a LoRA for it from a folder of captioned images.")
    train.add_argument("kind", choices=TRAIN_KINDS, help="what to train: " + ", ".join(TRAIN_KINDS))
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000 / 2000)")
    train.add_argument("--minutes", type=float, default=0.0, help="stop and save after this wall time (0: no limit)")
    train.add_argument("--batch-size", type=int, default=None, help="images per step (default 32 / 64)")
    train.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3 autoencoder, 1e-3 diffusion)")
    train.add_argument("--seed", type=int, default=0, help="initialisation and noise seed")
    train.add_argument("--out", type=Path, default=None, help="run folder (default runs/<kind>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--ae", type=Path, default=Path("runs/autoencoder"),
                       help="autoencoder run folder (diffusion kinds)")
    train.add_argument("--pool", type=Path, default=Path("runs/pool"),
                       help="latent pool folder; built from --ae when missing (diffusion kinds)")
    train.add_argument("--pool-size", type=int, default=12000, help="images in a new pool")
    train.add_argument("--init-from", type=Path, default=None, metavar="PATH",
                       help="start a diffusion model from these U-Net weights (a run folder or bundled file), "
                            "e.g. inpainting from the text-to-image model; extra input channels start at zero")
    train.add_argument("--two-object-prob", type=float, default=0.4,
                       help="share of two-shape scenes in a new pool (default 0.4)")
    train.add_argument("--inpaint-size", type=int, default=16000,
                       help="inpainting examples in a new pool (default 16000; each has its own hole)")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    train.add_argument("--offset-noise", type=float, default=None,
                       help="diffusion models: std of a per-image, per-channel constant added to the noise "
                            "(0.1 used for the shipped txt2img and inpaint models; default 0)")
    train.add_argument("--text-encoder", choices=("minilm", "transformer"), default="minilm",
                       help="ldm: frozen MiniLM contexts (default) or a BERT-tokenised transformer trained "
                            "from scratch with the U-Net (the paper's recipe)")
    train.add_argument("--conditioning-route", choices=("crossattn", "vector", "both"), default="crossattn",
                       help="ldm: the caption reaches the U-Net by cross-attention (default), as a pooled vector "
                            "added to the timestep embedding (needs --cross-attention none), or both")
    train.add_argument("--cross-attention", choices=("all", "lowest", "none"), default="all",
                       help="ldm: U-Net levels with cross-attention: all (default), the lowest (4x4 middle "
                            "block) only, none (vector route)")
    train.add_argument("--context-length", type=int, default=32,
                       help="ldm with --text-encoder transformer: caption tokens (default 32)")
    train.add_argument("--context-refiner", type=int, default=0, metavar="DEPTH",
                       help="text-to-image/inpainting: a DEPTH-layer transformer (width 128, 4 heads) inside the "
                            "U-Net mixes the caption's tokens before cross-attention (0: none, as shipped before)")
    train.add_argument("--clause-tokens", type=int, default=0, metavar="K",
                       help="text-to-image/inpainting with MiniLM: append one pooled token per clause of the caption "
                            "(split at 'and' and commas) to the context, K slots (0: none)")
    train.add_argument("--clause-only", action="store_true",
                       help="with --clause-tokens: the context is the clause tokens alone, without the caption's "
                            "per-word tokens")
    train.add_argument("--high-noise-share", type=float, default=0.0, metavar="P",
                       help="draw the timestep of this share of each batch from [--high-noise-from, 1000) instead "
                            "of [0, 1000): more training where the text alone decides colour and layout (0: none)")
    train.add_argument("--high-noise-from", type=int, default=700, metavar="T",
                       help="the first timestep of --high-noise-share's range (default 700)")
    train.add_argument("--high-noise-weight", type=float, default=1.0, metavar="W",
                       help="weigh each example's eps loss by min(max(1/SNR(t), 1), W): up to W times more where "
                            "the noise hides the image (1: the plain loss)")
    train.add_argument("--export", type=Path, default=None, metavar="PATH",
                       help="after training, write the bundled safetensors file here (diffusion kinds)")
    train.add_argument("--base", type=Path, default=None, metavar="PATH",
                       help="controlnet, lora: the frozen text-to-image model (default: the bundled one)")
    train.add_argument("--data", type=Path, default=None, metavar="FOLDER",
                       help="lora: images with same-named .txt captions (kohya's layout)")
    train.add_argument("--make-data", choices=("outlined",), default=None, metavar="STYLE",
                       help="lora: first draw --count procedural shapes in STYLE (outlined) into --data")
    train.add_argument("--count", type=int, default=2000, help="lora: images --make-data draws (default 2000)")
    train.add_argument("--rank", type=int, default=8, help="lora: rank of the factors (default 8)")
    train.add_argument("--conv-rank", type=int, default=0, help="lora: also factor the residual blocks' 3x3 "
                       "convolutions at this rank (LoCon; 0: linear layers only)")
    train.add_argument("--alpha", type=float, default=None, help="lora: the delta's scale is alpha / rank "
                       "(default alpha = rank)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("evaluate", help="score the bundled models with the judge",
                               description="Autoencoder PSNR, judge scores of text-to-image on held-out "
                               "captions, super-resolution gain over bicubic, inpainting; figures last.")
    ev.add_argument("--models", type=Path, default=None, help="folder of the four bundled files "
                    "(default: the shipped ones)")
    ev.add_argument("--samples", type=int, default=256, help="generated images per figure (fewer: quicker)")
    ev.add_argument("--steps", type=int, default=20, help="sampler steps (dpmpp_2m, karras)")
    ev.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    ev.add_argument("--seed", type=int, default=1234, help="seed of the held-out captions' images (default 1234)")
    ev.add_argument("--grid", type=Path, default=None, help="also save sample grids (PNG) here")
    ev.add_argument("--only", choices=("control",), action="append", default=[],
                    help="compute only these figures (control: the ControlNet's control_iou and colour)")
    from ldmgraph.cli import add_threads_argument

    add_threads_argument(ev)
    ev.set_defaults(func=cmd_evaluate)


def refiner_config(depth: int, context_length: int) -> dict[str, int]:
    """The U-Net's ``context_refiner`` of ``--context-refiner DEPTH`` ({} for 0)."""
    if depth < 0:
        raise ValueError(f"--context-refiner {depth}: give a number of layers >= 0")
    return {"width": 128, "depth": depth, "heads": 4, "max_tokens": context_length} if depth else {}


def cmd_train(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or Path("runs") / args.kind
    if args.kind == "controlnet":
        from .controlnet import cmd_train_controlnet

        return cmd_train_controlnet(args)
    if args.kind == "lora":
        return cmd_train_lora(args, out)
    if args.kind == "autoencoder":
        from .autoencoder import AEConfig, train_autoencoder

        cfg = AEConfig(seed=args.seed, minutes=args.minutes)
        for name in ("steps", "batch_size", "lr", "offset_noise"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        train_autoencoder(cfg, out, resume=args.resume, progress=not args.no_progress, threads=args.threads)
        print(f"autoencoder run: {out}")
        return 0

    from .conditioning import Conditioning
    from .ldm import LDMConfig, train_ldm
    from .pipeline import export_and_grid, prepare_inpaint_pool, prepare_pool, read_scale_factor
    from .pool import INPAINT_TASKS_VERSION, build_contexts, contexts_inpaint_version, load_pool

    options = Conditioning(args.text_encoder, args.conditioning_route, args.cross_attention, args.context_length)
    try:  # before any pool is built
        options.check()
        refiner = refiner_config(args.context_refiner, args.context_length)
        if not 0.0 <= args.high_noise_share <= 1.0 or not 0 <= args.high_noise_from < 1000:
            raise ValueError(f"--high-noise-share {args.high_noise_share} --high-noise-from {args.high_noise_from}: "
                             "use a share in 0..1 and a timestep in 0..999")
        if not 1.0 <= args.high_noise_weight <= 1000.0:
            raise ValueError(f"--high-noise-weight {args.high_noise_weight}: use 1..1000 (1: the plain loss)")
        if args.clause_only and not args.clause_tokens:
            raise ValueError("--clause-only needs --clause-tokens K (K >= 1)")
        if not 0 <= args.clause_tokens <= 16:
            raise ValueError(f"--clause-tokens {args.clause_tokens}: use 0..16 slots")
        if args.clause_tokens and (args.kind == "superres" or args.text_encoder != "minilm"):
            raise ValueError("--clause-tokens appends MiniLM clause tokens to a text context: text-to-image or "
                             "inpainting with the MiniLM encoder only")
        if refiner and args.kind == "superres":
            raise ValueError("--context-refiner refines the text context; the super-resolution model has none")
        if args.kind != "ldm" and not options.is_default:
            raise ValueError("--text-encoder, --conditioning-route, --cross-attention and --context-length are "
                             "options of 'ldmgraph train ldm' only")
    except ValueError as exc:
        print(f"ldmgraph train {args.kind}: {exc}", file=sys.stderr)
        return 2
    if not (args.ae / "checkpoint.safetensors").exists():
        print(f"ldmgraph train {args.kind}: no autoencoder checkpoint in {args.ae}; run "
              f"'ldmgraph train autoencoder --out {args.ae}' first or pass --ae", file=sys.stderr)
        return 1
    contexts = args.pool / "contexts.safetensors"
    if args.kind == "inpaint" and contexts.exists() and contexts_inpaint_version(args.pool) != INPAINT_TASKS_VERSION:
        print(f"{args.pool}: its inpainting examples predate the current tasks; rebuilding them", file=sys.stderr)
        contexts.unlink()
        (args.pool / "inpaint.safetensors").unlink(missing_ok=True)
    if not contexts.exists():
        build_contexts(args.pool, 0, args.pool_size, args.inpaint_size, args.two_object_prob)
    if not (args.pool / "latents.safetensors").exists():
        prepare_pool(args.ae, args.pool, 0, args.pool_size, args.inpaint_size, threads=args.threads,
                     two_object_prob=args.two_object_prob)
    elif args.kind == "inpaint" and not (args.pool / "inpaint.safetensors").exists():
        prepare_inpaint_pool(args.ae, args.pool, 0, args.inpaint_size, threads=args.threads)
    try:
        cfg = LDMConfig(kind=args.kind, seed=args.seed, minutes=args.minutes,
                        scale_factor=read_scale_factor(args.pool, args.init_from), init_from=str(args.init_from or ""),
                        text_encoder=args.text_encoder, route=args.conditioning_route,
                        cross_attention=args.cross_attention, context_length=args.context_length,
                        context_refiner=refiner, clause_tokens=args.clause_tokens,
                        high_noise_share=args.high_noise_share, high_noise_from=args.high_noise_from,
                        high_noise_weight=args.high_noise_weight, clause_only=args.clause_only)
    except ValueError as exc:
        print(f"ldmgraph train {args.kind}: {exc}", file=sys.stderr)
        return 2
    for name in ("steps", "batch_size", "lr", "offset_noise"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    pool = load_pool(args.pool)
    if cfg.clause_tokens:
        from .pool import clause_contexts

        pool["clause_contexts"] = clause_contexts(args.pool, pool["captions"], cfg.clause_tokens,
                                                  progress=not args.no_progress)
    train_ldm(cfg, pool, out, resume=args.resume, progress=not args.no_progress, threads=args.threads)
    print(f"{args.kind} run: {out}")
    if args.export is not None:
        folder, name = args.export.parent, args.export.name
        path = export_and_grid(args.kind, out, args.ae, args.pool, folder)
        if path.name != name:
            path.replace(args.export)
        print(f"exported: {args.export}")
    return 0


def cmd_train_lora(args: argparse.Namespace, out: Path) -> int:
    """``ldmgraph train lora``: draw the data when asked, then train and write the kohya file."""
    from .lora import LoraConfig, train_lora, write_style_dataset

    if args.data is None:
        print("ldmgraph train lora: give --data FOLDER (images with .txt captions)", file=sys.stderr)
        return 2
    cfg = LoraConfig(base=str(args.base or ""), rank=args.rank, alpha=float(args.alpha or args.rank),
                     seed=args.seed, minutes=args.minutes, conv_rank=args.conv_rank)
    for name in ("steps", "batch_size", "lr"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    try:
        cfg.check()
        if args.make_data and not any(args.data.glob("*.txt")):
            write_style_dataset(args.data, args.make_data, args.count, seed=args.seed + 7)
        path = train_lora(cfg, args.data, out, resume=args.resume, progress=not args.no_progress,
                          threads=args.threads, export=args.export)
    except ValueError as exc:
        print(f"ldmgraph train lora: {exc}", file=sys.stderr)
        return 2
    print(f"lora run: {out}\nlora: {args.export or path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .evaluate import evaluate
    from .export import assets_dir

    figures = evaluate(args.models or assets_dir(), samples=args.samples, steps=args.steps, cfg=args.cfg,
                       seed=args.seed, grid=args.grid, log=lambda s: print(s, file=sys.stderr, flush=True),
                       only=tuple(args.only))
    print(figures.two_object_line())
    print(figures.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ldmgraph.train ...`` without the main CLI."""
    parser = argparse.ArgumentParser(prog="python -m ldmgraph.train")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
