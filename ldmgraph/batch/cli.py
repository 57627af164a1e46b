"""``ldmgraph batch``: run a saved workflow once per row of a parameter table, locally or on Ray.

Registered lazily by ``ldmgraph.cli``; importing this module imports neither torch nor Ray.
Exit codes as ``ldmgraph run``: 0 every row succeeded, 2 invalid workflow or parameter table
(nothing ran), 1 some rows failed or the batch was interrupted (run the same command again to
finish the missing rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def register(subparsers: Any) -> None:
    """Add the ``batch`` subcommand to the main parser."""
    parser = subparsers.add_parser(
        "batch", help="run a workflow once per row of a CSV/JSONL table (and sweeps), locally or on Ray",
        description="Run a saved workflow once per row of a parameter table (columns: the workflow's "
        "parameters) times the product of --sweep lists. Every row's values are checked first (the whole "
        "graph with the first row, then each row again just before it runs); outputs are "
        "named rowNNNNN_*.png; OUTPUT_DIR/manifest.jsonl records each finished row, and running the "
        "same command again skips them.")
    from ldmgraph.cli import add_model_runtime_arguments, add_precision_argument, add_workflows_dir_argument

    parser.add_argument("workflow", type=Path, help="workflow file (JSON, or a PNG saved by ldmgraph)")
    parser.add_argument("--params", type=Path, metavar="FILE", help="parameter table: .csv (header row) or .jsonl")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="run every row with each of these values (repeatable: the product of the lists)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter value for every row (a row's own column wins)")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="local: one executor in this process; ray: one actor per worker on a Ray cluster")
    parser.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001, HOST:6379, or auto: the "
                        "cluster `ray start` recorded); default: $RAY_ADDRESS, else a private local cluster "
                        "started for this batch and stopped with it")
    parser.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per --threads CPUs)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads per worker (default 1, or $OMP_NUM_THREADS locally; on Ray "
                        "each actor reserves N CPUs). CPU results depend on it: same N, same bytes")
    parser.add_argument("--shared-output", action="store_true",
                        help="Ray: workers write outputs straight into --output-dir (a folder every worker "
                        "sees at the same path) instead of sending them back to this process")
    parser.add_argument("--output-dir", type=Path, default=Path("output"), help="output folder (default ./output)")
    parser.add_argument("--input-dir", type=Path, help="folder of input files (default: inputs/ beside the "
                        "workflow file if it exists, else ./input)")
    parser.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="checkpoint folder (repeatable; default ./models, then the bundled models)")
    parser.add_argument("--device", help="device override for the model layer (cpu, cuda, mps)")
    parser.add_argument("--output", dest="outputs", action="append", metavar="NODE_ID",
                        help="run only these output nodes (repeatable)")
    parser.add_argument("--no-resume", action="store_true", help="run every row, even those the manifest has")
    parser.add_argument("--max-rows", type=int, default=1_000_000, metavar="N",
                        help="refuse a batch whose table times its sweeps makes more than N rows (default 1000000)")
    parser.add_argument("--plugin-dir", action="append", default=[], metavar="DIR", help="extra plugin folder")
    parser.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_runtime_arguments(parser)
    add_precision_argument(parser)
    add_workflows_dir_argument(parser)
    parser.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    """Validate every row, then run the batch on the chosen backend."""
    from ldmgraph.cli import environment, set_precision
    from ldmgraph.graph.components import expanded_document
    from ldmgraph.graph.errors import ValidationError
    from ldmgraph.graph.loading import load_workflow_file
    from ldmgraph.plugins import PluginManager

    from .driver import BatchSummary, run_batch
    from .manifest import Manifest, ManifestError
    from .params import BatchInputError, open_rows, text_parameters
    from .plan import check_rows, plan_lazily

    manager = PluginManager(plugin_dirs=args.plugin_dir, workflow_dirs=args.workflows_dirs)
    env = _absolute(environment(args))
    try:
        # components expanded here: the workers need none of this machine's workflow folders
        doc = expanded_document(load_workflow_file(args.workflow).document, manager.registry)
        if not isinstance(doc, dict):
            raise BatchInputError([f"{args.workflow}: not a workflow document"])
        set_precision(doc, args)  # a concrete dtype in the document: every worker and row loads alike
        if args.outputs:
            doc = {**doc, "outputs": args.outputs}  # travels with the document to every worker
        registry = manager.registry
        declared = list((doc.get("parameters") or {}).keys())
        text_params = text_parameters(doc, lambda t, i: _socket_name(registry, t, i))
        if args.params is None and not args.sweep:
            raise BatchInputError(["give a parameter table (--params FILE.csv or .jsonl), a --sweep, or both"])
        source = open_rows(args.params, args.sweep, declared, text_params,
                           constant=_constant_values(args.overrides, text_params), max_rows=args.max_rows)
        label = str(args.params or "")
        check_rows(doc, source, registry, env, label=label, total=source.total,
                   progress=not (args.json or args.no_progress))
        Manifest(env.output_dir).check()  # a link, FIFO or folder there is refused before any row runs
    except (BatchInputError, ValidationError, ManifestError) as exc:
        return _invalid(args, exc)
    planned = plan_lazily(doc, source, registry, env, label=label)
    if args.backend != "local" and (args.compile or args.gpu_memory is not None):
        print("ldmgraph batch: --compile and --gpu-memory apply to --backend local only", file=sys.stderr)
        return EXIT_INVALID
    backend = _backend(args, env)
    runner = getattr(backend, "runner", None)
    if runner is not None:
        from ldmgraph.cli import install_model_runtime

        install_model_runtime(runner.executor.resources, args)
    summary = BatchSummary()
    try:
        run_batch(doc, planned, backend, env.output_dir, resume=not args.no_resume,
                  progress=not (args.json or args.no_progress), summary=summary, total=source.total)
    except KeyboardInterrupt:
        print(f"interrupted: {summary.done} row(s) finished in this run, {summary.skipped} before; run the "
              "same command again to finish the rest", file=sys.stderr)
        return EXIT_FAILED
    finally:
        backend.close()
    _report(args, summary)
    return EXIT_OK if summary.failed == 0 else EXIT_FAILED


def _backend(args: argparse.Namespace, env: Any) -> Any:
    from .driver import LocalBackend, RayBackend

    if args.backend == "local":
        from ldmgraph.threads import resolve_threads

        return LocalBackend(env, args.plugin_dir, threads=resolve_threads(args.threads))
    from .ray_pool import RayWorkerPool

    write_dir = env.output_dir if args.shared_output else None
    return RayBackend(RayWorkerPool(env, workers=args.workers, address=args.address,
                                    plugin_dirs=[str(Path(p).resolve()) for p in args.plugin_dir],
                                    write_dir=write_dir, threads=args.threads or 1))


def _constant_values(items: list[str], text_params: set[str]) -> dict[str, Any]:
    """``--set`` values for every row, read as ``ldmgraph run`` reads them: JSON when it parses, but a
    text parameter keeps the text as typed (``--set prompt=42`` is the prompt "42", as a CSV cell is)."""
    from ldmgraph.cli_overrides import read_overrides

    return {o.name: o.text if o.name in text_params and not isinstance(o.value, str) else o.value
            for o in read_overrides(items)}


def _absolute(env: Any) -> Any:
    """Folders as absolute paths, so that workers started elsewhere find the same ones."""
    from dataclasses import replace

    return replace(env, input_dir=env.input_dir.resolve(), output_dir=env.output_dir.resolve(),
                   model_dirs=tuple(d.resolve() for d in env.model_dirs))


def _socket_name(registry: Any, node_type: Any, input_name: Any) -> str | None:
    cls = registry.node(node_type) if isinstance(node_type, str) else None
    spec = cls.spec.inputs.get(input_name) if cls is not None else None
    return spec.socket.name if spec is not None else None


def _invalid(args: argparse.Namespace, exc: Any) -> int:
    problems = [str(p) for p in getattr(exc, "problems", [exc])]
    if args.json:
        json.dump({"ok": False, "problems": problems}, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        for line in problems[:50]:
            print(f"error: {line}", file=sys.stderr)
        if len(problems) > 50:
            print(f"error: ... and {len(problems) - 50} more", file=sys.stderr)
        print("nothing ran", file=sys.stderr)
    return EXIT_INVALID


def _report(args: argparse.Namespace, summary: Any) -> None:
    if args.json:
        json.dump(summary.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    print(f"batch: {summary.total} rows: {summary.ok} ok, {summary.failed} failed, {summary.skipped} done before "
          f"({summary.retried} retried); {summary.seconds:.1f} s, {rate:.2f} rows/s; manifest {summary.manifest}",
          file=sys.stderr)
