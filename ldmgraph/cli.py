"""The ``ldmgraph`` command line: run, validate, nodes, schema, plugins (+ subcommands of other layers).

Exit codes: 0 success, 2 invalid workflow, 1 failed or cancelled run. ``--json`` prints
machine-readable output on stdout. Start-up stays light: torch is only imported by nodes that
need it, when they run; ``validate``, ``nodes``, ``schema`` and ``plugins`` never import it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .graph.context import Environment
from .graph.errors import ExecutionError, LdmGraphError, ValidationError
from .graph.events import Event
from .graph.loading import LoadedWorkflow, load_workflow_file
from .graph.registry import HOOK_TABLES
from .graph.workflow import workflow_json_schema
from .plugins import PluginManager

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

# Subcommands of other layers, imported only when used: name -> module with register(subparsers).
LAZY_SUBCOMMANDS: dict[str, str] = {
    "train": "ldmgraph.train.cli",
    "evaluate": "ldmgraph.train.cli",
    "import": "ldmgraph.interop.cli",
}

BUNDLED_MODELS = Path(__file__).resolve().parent / "assets" / "models"


# -- argument parsing ---------------------------------------------------------------------------------
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` (if a lazy one) has its module imported and registered."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin-dir", action="append", default=[], metavar="DIR",
                        help="extra plugin folder (repeatable; also $LDMGRAPH_PLUGIN_DIR)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--input-dir", type=Path, help="folder of input files (default: inputs/ beside the "
                       "workflow file if it exists, else ./input)")
    paths.add_argument("--output-dir", type=Path, default=Path("output"), help="output folder (default ./output)")
    paths.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                       help="checkpoint folder (repeatable; default ./models, then the bundled models)")
    paths.add_argument("--device", help="device override for the model layer (cpu, cuda, cuda:1, mps)")
    paths.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                       help="override a declared workflow parameter (VALUE parsed as JSON, else text)")
    paths.add_argument("--output", dest="outputs", action="append", metavar="NODE_ID",
                       help="run only these output nodes (repeatable; default all output nodes)")

    parser = argparse.ArgumentParser(prog="ldmgraph", description="Latent-diffusion workflows as JSON graphs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", parents=[common, paths], help="run a workflow (JSON, or a PNG with one)")
    run.add_argument("workflow", type=Path)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", parents=[common, paths], help="check a workflow without running it")
    validate.add_argument("workflow", type=Path)
    validate.set_defaults(func=cmd_validate)

    nodes = sub.add_parser("nodes", parents=[common], help="list node types, their inputs and outputs")
    nodes.set_defaults(func=cmd_nodes)
    schema = sub.add_parser("schema", parents=[common], help="print the workflow file's JSON Schema")
    schema.set_defaults(func=cmd_schema)
    plugins = sub.add_parser("plugins", parents=[common], help="list plugins and whether they loaded")
    plugins.set_defaults(func=cmd_plugins)

    _add_lazy_subcommands(sub, command)
    return parser


def _add_lazy_subcommands(sub: Any, command: str | None) -> None:
    """Import the module of the requested lazy subcommand only; list the others as stubs."""
    done: set[str] = set()
    for name, module_name in LAZY_SUBCOMMANDS.items():
        if module_name in done or _find_spec(module_name) is None:
            continue
        if command == name:
            try:
                importlib.import_module(module_name).register(sub)
            except Exception as exc:  # noqa: BLE001 - a broken layer must not break the other commands
                print(f"ldmgraph: cannot load the {name!r} command from {module_name}: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
            done.add(module_name)
    registered = set(sub.choices)
    for name, module_name in LAZY_SUBCOMMANDS.items():
        if name not in registered and _find_spec(module_name) is not None:
            stub = sub.add_parser(name, help=f"(from {module_name})", add_help=False)
            stub.set_defaults(func=None)


def _find_spec(module_name: str) -> Any:
    try:
        return importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["steps=20", "prompt=a cat"]`` -> ``{"steps": 20, "prompt": "a cat"}`` (JSON when it parses)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"ldmgraph: --set expects NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def environment(args: argparse.Namespace) -> Environment:
    """Folders and device from the arguments, with the documented defaults."""
    input_dir = args.input_dir
    if input_dir is None:
        beside = args.workflow.resolve().parent / "inputs"
        input_dir = beside if beside.is_dir() else Path("input")
    model_dirs = tuple(args.models_dir) or (Path("models"),)
    return Environment(input_dir=input_dir, output_dir=args.output_dir,
                       model_dirs=(*model_dirs, BUNDLED_MODELS), device=args.device)


# -- commands -------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    """``ldmgraph validate``: report every problem, run nothing."""
    from .graph.validate import validate_workflow

    manager = _manager(args)
    loaded = load_workflow_file(args.workflow)
    compiled = validate_workflow(loaded.document, manager.registry, environment(args),
                                 parse_overrides(args.overrides), args.outputs)
    summary = {"ok": True, "kind": loaded.kind, "nodes": len(compiled.workflow.nodes),
               "outputs": compiled.outputs, "parameters": compiled.parameters}
    if args.json:
        _print_json(summary)
    else:
        print(f"{args.workflow}: ok ({summary['nodes']} nodes, outputs {', '.join(compiled.outputs)})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``ldmgraph run``: validate, then execute with a progress bar."""
    from .graph.executor import Executor

    manager = _manager(args)
    loaded: LoadedWorkflow = load_workflow_file(args.workflow)
    executor = Executor(manager.registry, environment(args))
    compiled = executor.validate(loaded.document, parse_overrides(args.overrides), args.outputs)
    bar = _ProgressBar(enabled=not (args.json or args.no_progress))
    try:
        result = executor.execute(compiled, on_event=bar)
    finally:
        bar.close()
    if args.json:
        _print_json(result.to_dict())
    else:
        for path in result.files:
            print(f"wrote {path}")
        print(f"done: {len(result.executed)} node(s) executed, {len(result.cached)} cached, "
              f"{result.seconds:.2f} s", file=sys.stderr)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    """``ldmgraph nodes``: every node type with inputs, outputs, bounds, defaults and help."""
    registry = _manager(args).registry
    listing = {}
    for name in sorted(registry.nodes):
        entry = registry.nodes[name].spec.describe(registry)
        entry["plugin"] = registry.owner("node type", name)
        if getattr(registry.nodes[name], "route", None):
            entry["route"] = registry.nodes[name].route  # type: ignore[attr-defined]  # a conditioner's node
        listing[name] = entry
    if args.json:
        _print_json(listing)
        return EXIT_OK
    by_category: dict[str, list[str]] = {}
    for name, entry in listing.items():
        by_category.setdefault(entry["category"], []).append(name)
    for category in sorted(by_category):
        print(f"{category}:")
        for name in by_category[category]:
            entry = listing[name]
            ins = ", ".join(f"{k}: {v['type']}" for k, v in entry["inputs"].items())
            outs = ", ".join(f"{k}: {v['type']}" for k, v in entry["outputs"].items())
            first_line = (entry["description"].splitlines() or [""])[0]
            print(f"  {name} ({ins}) -> ({outs})  {first_line}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """``ldmgraph schema``: the workflow file's JSON Schema."""
    _print_json(workflow_json_schema())
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    """``ldmgraph plugins``: each plugin, where it came from, and its status or error."""
    statuses = _manager(args).statuses
    if args.json:
        _print_json([s.to_dict() for s in statuses])
        return EXIT_OK
    for s in statuses:
        state = "ok" if s.ok else "FAILED"
        counts = ", ".join(f"{len(s.entries(table))} {table}" for table in HOOK_TABLES)
        print(f"{state:6} {s.source:11} {s.name}  ({counts}; {s.seconds:.2f} s)")
        if s.error:
            print(f"       error: {s.error}")
    return EXIT_OK


# -- helpers --------------------------------------------------------------------------------------
def _manager(args: argparse.Namespace) -> PluginManager:
    manager = PluginManager(plugin_dirs=args.plugin_dir)
    if args.command != "plugins":
        for status in manager.statuses:
            if not status.ok:
                print(f"ldmgraph: warning: plugin {status.name} failed to load: {status.error}", file=sys.stderr)
    return manager


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


class _ProgressBar:
    """tqdm bar over the nodes of a run, with the current node's k of n as postfix."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
            self.bar = tqdm(total=event.total, unit="node", file=sys.stderr, dynamic_ncols=True, disable=None)
        if event.kind in ("done", "cached"):
            self.bar.update(1)
        label = f"{event.node_id} {event.node_type}"
        if event.kind == "progress":
            label += f" {event.k}/{event.n}"
        self.bar.set_postfix_str(label, refresh=event.kind != "progress" or event.k == event.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _command_of(argv: Sequence[str]) -> str | None:
    for item in argv:
        if not item.startswith("-"):
            return item
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ldmgraph`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    if args.func is None:
        print(f"ldmgraph: the {args.command!r} command is not available", file=sys.stderr)
        return EXIT_FAILED
    try:
        return int(args.func(args))
    except ValidationError as exc:
        if getattr(args, "json", False):
            _print_json(exc.to_dict())
        else:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except ExecutionError as exc:
        _report_failure(args, exc.to_dict(), str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _report_failure(args, {"error": "Cancelled", "message": "interrupted"}, "interrupted")
        return EXIT_FAILED
    except LdmGraphError as exc:
        _report_failure(args, {"error": type(exc).__name__, "message": str(exc)}, str(exc))
        return EXIT_FAILED


def _report_failure(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        _print_json({"ok": False, **payload})
    else:
        print(f"error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
