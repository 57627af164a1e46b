"""The ``ldmgraph`` command line: run, validate, params, nodes, schema, plugins (+ subcommands of
other layers).

Exit codes: 0 success, 2 invalid workflow or a usage error (nothing ran), 1 failed run, 130 / 143
interrupted by SIGINT / SIGTERM (the node that was running is named; temporary files are removed).
``--json`` prints machine-readable output on stdout. Start-up stays light: torch is only imported
by nodes that need it, when they run; ``validate``, ``params``, ``nodes``, ``schema`` and
``plugins`` never import it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .cli_overrides import applied_overrides
from .graph.context import Environment
from .graph.errors import ExecutionError, LdmGraphError, ValidationError
from .graph.events import Event
from .graph.loading import LoadedWorkflow, load_workflow_file
from .graph.registry import HOOK_TABLES
from .graph.workflow import workflow_json_schema
from .plugins import PluginManager

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + 2, 128 + 15

# Subcommands of other layers, imported only when used: name -> (module with register(subparsers),
# one-line help for the command list). A bare module name is accepted too (generic help).
LAZY_SUBCOMMANDS: dict[str, tuple[str, str] | str] = {
    "train": ("ldmgraph.train.cli", "train the bundled models (autoencoder, ldm, superres, inpaint, controlnet) "
              "or a LoRA"),
    "evaluate": ("ldmgraph.train.cli", "score the bundled models with the procedural judge"),
    "import": ("ldmgraph.interop.cli", "convert a ComfyUI workflow (API or UI JSON, or PNG) to ldmgraph/1"),
    "batch": ("ldmgraph.batch.cli", "run a saved workflow once per row of a CSV/JSONL table, locally or on Ray"),
    "serve": ("ldmgraph.server.cli", "serve ComfyUI's HTTP/websocket API on a persistent queue, and its editor"),
    "convert": ("ldmgraph.models.convert", "convert a pickled checkpoint (.ckpt) to .safetensors, running none of its code"),
}


def _lazy_entry(name: str) -> tuple[str, str]:
    entry = LAZY_SUBCOMMANDS[name]
    if isinstance(entry, str):
        return entry, f"the {name} command (see `ldmgraph {name} --help`)"
    return entry


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt, so that the same
    clean-up runs (temporary files removed, the run cancelled)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors that say they are usage errors (exit 2, as argparse's own)."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: usage error: {message}\n")


BUNDLED_MODELS = Path(__file__).resolve().parent / "assets" / "models"
WORKFLOW_HELP = "workflow file: ldmgraph/1 JSON, a PNG that ldmgraph saved, or a ComfyUI graph (JSON or PNG)"
LONG_CHOICES = 12  # text output abbreviates longer choice lists (--json has them all)


# -- argument parsing ---------------------------------------------------------------------------------
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` (if a lazy one) has its module imported and registered."""
    common = _Parser(add_help=False)
    common.add_argument("--plugin-dir", action="append", default=[], metavar="DIR",
                        help="extra plugin folder (repeatable; also $LDMGRAPH_PLUGIN_DIR)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_workflows_dir_argument(common)

    paths = _Parser(add_help=False)
    paths.add_argument("--input-dir", type=Path, help="folder of input files (default: inputs/ beside the "
                       "workflow file if it exists, else ./input)")
    paths.add_argument("--output-dir", type=Path, default=Path("output"), help="output folder (default ./output)")
    paths.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                       help="checkpoint folder (repeatable; default ./models, then the bundled models)")
    paths.add_argument("--device", help="device override for the model layer (cpu, cuda, cuda:1, mps)")
    paths.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                       type=_name_value,
                       help="override a declared workflow parameter (VALUE parsed as JSON, else text)")
    paths.add_argument("--output", dest="outputs", action="append", metavar="NODE_ID",
                       help="run only these output nodes (repeatable; default all output nodes)")
    paths.add_argument("--memory-budget", metavar="SIZE", help="refuse workflows estimated to need more "
                       "memory (e.g. 16G, 512M; 0 = no limit; default: the machine's available memory)")
    paths.add_argument("--disk-budget", metavar="SIZE", help="refuse workflows estimated to write more to "
                       "disk (saved images and the workflow each embeds; e.g. 10G; 0 = no limit; default 1G)")
    paths.add_argument("--max-image-pixels", type=int, default=64_000_000, metavar="N",
                       help="largest input image in pixels, checked before decoding (default 64000000)")

    parser = _Parser(prog="ldmgraph", description="Latent-diffusion workflows as JSON graphs.")
    parser.add_argument("--version", action="version", version=f"ldmgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Any, help_text: str, parents: list[argparse.ArgumentParser]) -> Any:
        command_parser = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
        command_parser.set_defaults(func=func)
        return command_parser

    run = add("run", cmd_run, "run a workflow (JSON, a PNG saved by ldmgraph, or a ComfyUI file)", [common, paths])
    run.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--profile", action="store_true", help="print where the time went on stderr: interpreter "
                     "start, imports, plugin discovery, validation, each node (wall, CPU and import seconds); "
                     "with --json, as one JSON event")
    run.add_argument("--preview-dir", type=Path, metavar="DIR",
                     help="write each sampler step's latent preview there as NODE_stepK.png (created private)")
    run.add_argument("--preview-every", type=int, default=1, metavar="N",
                     help="with --preview-dir: a preview every N steps and at the last (default 1)")
    add_precision_argument(run)
    add_threads_argument(run)
    add_model_runtime_arguments(run)
    validate = add("validate", cmd_validate, "check a workflow without running it (every problem at once)",
                   [common, paths])
    validate.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    params = add("params", cmd_params, "list a workflow's parameters: type, value, bounds, choices, help",
                 [common])
    params.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    nodes = add("nodes", cmd_nodes, "list node types: inputs with type, default, bounds, choices and help; outputs",
                [common])
    nodes.add_argument("filter", nargs="?", metavar="FILTER",
                       help="only node types whose name or category contains this text (any case), e.g. sampler")
    add("schema", cmd_schema, "print the workflow file's JSON Schema", [common])
    add("plugins", cmd_plugins, "list plugins, where they came from, and whether they loaded", [common])

    _add_lazy_subcommands(sub, command)
    return parser


def add_workflows_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--workflows-dir DIR``: a folder whose workflows that declare outputs are node types ``workflow/<stem>``."""
    parser.add_argument("--workflows-dir", dest="workflows_dirs", action="append", default=[], type=Path,
                        metavar="DIR", help="folder of workflow components: each workflow there (or in its "
                        "components/) that declares outputs is a node type workflow/<stem> (repeatable; "
                        "searched before ./workflows and the project's workflows/)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the loaders' weight precision for this run (``auto`` resolved for this machine)."""
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights' precision, written into every loader's dtype input (auto: bf16 on "
                        "CPUs with AVX512-BF16/AMX, fp16 on CUDA, else fp32; default: the workflow's)")


def add_model_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--gpu-memory GIB``: how the session's models run (see docs/gpu.md)."""
    parser.add_argument("--compile", action="store_true",
                        help="compile the U-Net and ControlNet with torch.compile, once per shape (CUDA graphs on "
                        "CUDA); where compiling is unavailable they run eager, with a one-line message")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="device memory the models may use, in GiB: weights live in host memory and move to "
                        "the device when a node needs them (least recently used evicted; a U-Net that does not "
                        "fit is streamed block by block); 0 = off (loaders place models on the device); default "
                        "on CUDA: the free memory minus a tenth of it (at least 0.5 GiB)")


def install_model_runtime(resources: dict[Any, Any], args: argparse.Namespace) -> Any:
    """Give an executor's session the model cache that ``--compile`` / ``--gpu-memory`` ask for
    (returns its runtime, or None: the default cache). Torch is imported only when a flag is given
    or the machine has CUDA (where the manager is on by default)."""
    compiling, gib = bool(getattr(args, "compile", False)), getattr(args, "gpu_memory", None)
    if gib is not None and gib < 0:
        raise SystemExit(f"ldmgraph: --gpu-memory must be 0 (off) or a positive number of GiB, got {gib}")
    device = getattr(args, "device", None)
    if not compiling and gib is None:
        from .nodes.common import device_problem

        if (device or "cuda").split(":")[0] != "cuda" or device_problem("cuda") is not None:
            return None
    from .models.cache import ModelCache
    from .models.manager import runtime_from_flags
    from .nodes.common import MODEL_CACHE_KEY

    runtime = runtime_from_flags(compiling, gib, device)
    if runtime is not None:
        resources[MODEL_CACHE_KEY] = ModelCache(runtime=runtime)
    return runtime


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for this command (default one, waiting passively)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU compute threads (default 1, or $OMP_NUM_THREADS: fast on a machine doing other "
                        "work; more threads help only on an idle machine). CPU results depend on it: same N, "
                        "same bytes")


# commands whose --threads (or its default) this module applies before anything imports torch
THREADED_COMMANDS = ("run", "serve", "evaluate")


def set_precision(document: Any, args: argparse.Namespace) -> None:
    """Resolve ``--precision`` to a concrete dtype and write it into the document's loader nodes."""
    if getattr(args, "precision", None) is None:
        return
    from .models.precision import apply_precision, resolve_precision

    apply_precision(document, resolve_precision(args.precision, getattr(args, "device", None)))


def _name_value(text: str) -> str:
    """argparse type of ``--set``: refuse what is not NAME=VALUE as a usage error."""
    name, sep, _ = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expects NAME=VALUE, got {text!r} (e.g. --set steps=20)")
    return text


def _add_lazy_subcommands(sub: Any, command: str | None) -> None:
    """Import the module of the requested lazy subcommand only; list the others with their help."""
    done: set[str] = set()
    for name in LAZY_SUBCOMMANDS:
        module_name, _ = _lazy_entry(name)
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
    for name in LAZY_SUBCOMMANDS:
        module_name, help_text = _lazy_entry(name)
        if name not in registered and _find_spec(module_name) is not None:
            stub = sub.add_parser(name, help=help_text, add_help=False)
            stub.set_defaults(func=None)


def _find_spec(module_name: str) -> Any:
    """Whether the module exists (truthy) or None; ldmgraph's own are looked up as files, because
    `find_spec("ldmgraph.batch.cli")` imports the `ldmgraph.batch` package to find it."""
    package, _, rest = module_name.partition(".")
    if package == "ldmgraph" and rest:
        base = Path(__file__).resolve().parent.joinpath(*rest.split("."))
        return True if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() else None
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
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
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
    budget = None
    # subcommands of other layers (batch) may not offer the resource flags: their defaults apply
    memory_budget = getattr(args, "memory_budget", None)
    if memory_budget is not None:
        from .graph.estimate import parse_bytes

        try:
            budget = parse_bytes(memory_budget)
        except ValueError as exc:
            raise SystemExit(f"ldmgraph: --memory-budget: {exc}") from None
    disk = None
    if getattr(args, "disk_budget", None) is not None:
        from .graph.estimate import parse_bytes

        try:
            disk = parse_bytes(args.disk_budget)
        except ValueError as exc:
            raise SystemExit(f"ldmgraph: --disk-budget: {exc}") from None
    return Environment(input_dir=input_dir, output_dir=args.output_dir,
                       model_dirs=(*model_dirs, BUNDLED_MODELS), device=args.device,
                       memory_budget=budget, disk_budget=disk,
                       max_image_pixels=getattr(args, "max_image_pixels", Environment.max_image_pixels))


# -- commands -------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    """``ldmgraph validate``: report every problem, run nothing."""
    from .graph.validate import validate_workflow

    manager = _manager(args)
    loaded = load_workflow_file(args.workflow)
    with _environment_for(loaded, args) as env, \
            applied_overrides(loaded.document, args.overrides, manager.registry, env) as (document, overrides, env):
        compiled = validate_workflow(document, manager.registry, env, overrides, args.outputs)
    summary = {"ok": True, "kind": loaded.kind, "nodes": len(compiled.workflow.nodes),
               "outputs": compiled.outputs, "parameters": compiled.parameters,
               "warnings": [w.to_dict() for w in compiled.warnings]}
    if args.json:
        _print_json(summary)
    else:
        _print_warnings(compiled.warnings)
        if (env.device or "").lower().startswith("cpu"):  # without --device, only run asks torch where
            _warn_fp16_on_cpu(compiled, env)
        print(f"{args.workflow}: ok ({summary['nodes']} nodes, outputs {', '.join(compiled.outputs)})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``ldmgraph run``: validate, then execute with a progress bar."""
    from .graph.executor import Executor

    profile = _start_profile(args)
    with profile.phase("plugin discovery"):
        manager = _manager(args)
    with profile.phase("validation"):
        loaded: LoadedWorkflow = load_workflow_file(args.workflow)
        if args.precision is not None:  # loaders inside components too
            from .graph.components import expanded_document

            loaded.document = expanded_document(loaded.document, manager.registry)
        set_precision(loaded.document, args)
    with _environment_for(loaded, args) as env, \
            applied_overrides(loaded.document, args.overrides, manager.registry, env) as (document, overrides, env):
        with profile.phase("validation"):
            executor = Executor(manager.registry, env)
            install_model_runtime(executor.resources, args)
            compiled = executor.validate(document, overrides, args.outputs)
        if not args.json:
            _print_warnings(compiled.warnings)
        _warn_fp16_on_cpu(compiled, env)
        bar = _JsonEvents() if args.json and not args.no_progress else _ProgressBar(enabled=not args.no_progress)
        previews = _PreviewWriter.open(args.preview_dir, args.preview_every)

        def on_event(event: Event) -> None:
            args.running = (event.node_id, event.node_type) if event.kind in ("start", "progress") else None
            if previews is not None and event.preview is not None:
                previews(event)
            bar(event)
            profile.on_event(event)

        try:
            result = executor.execute(compiled, on_event=on_event, previews=previews.every if previews else 0)
        finally:
            bar.close()
    _report_profile(profile, args)
    if args.json:
        _print_json(result.to_dict())
    else:
        for path in result.files:
            print(f"wrote {path}")
        print(f"done: {len(result.executed)} node(s) executed, {len(result.cached)} cached, "
              f"{result.seconds:.2f} s", file=sys.stderr)
    return EXIT_OK


FP16_ON_CPU = ("fp16 weights on the CPU ({nodes}): CPUs have no fast fp16 arithmetic; measured on the bundled "
               "text-to-image model with one thread, sampling took 4.5x the CPU time of fp32 and the whole run "
               "2.4x. Use fp32, or bf16 (--precision auto picks it on CPUs with AVX512-BF16 or AMX)")


def _warn_fp16_on_cpu(compiled: Any, env: Environment) -> None:
    """Say so when a loader casts to fp16 and the models will compute on the CPU (slow, never faster)."""
    fp16 = [node_id for node_id in compiled.order if compiled.nodes[node_id].literals.get("dtype") == "fp16"]
    if not fp16:
        return
    device = (env.device or "").lower()
    if device and not device.startswith("cpu"):
        return
    if not device:
        import torch  # only when a loader asks for fp16: the run imports torch next anyway

        mps = getattr(torch.backends, "mps", None)
        if torch.cuda.is_available() or (mps is not None and mps.is_available()):
            return
    print(f"warning: {FP16_ON_CPU.format(nodes=', '.join(fp16))}", file=sys.stderr)


def _start_profile(args: argparse.Namespace) -> Any:
    """A `Profile` for ``--profile`` (started now), else a stand-in that measures nothing."""
    if not getattr(args, "profile", False):
        return _NoProfile()
    from . import STARTED
    from .profile import Profile

    return Profile.start(*STARTED)


def _report_profile(profile: Any, args: argparse.Namespace) -> None:
    if isinstance(profile, _NoProfile):
        return
    from .profile import print_profile

    report = profile.finish()
    if args.json:
        sys.stderr.write(json.dumps(report) + "\n")
    else:
        print_profile(report, sys.stderr)


class _NoProfile:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def on_event(self, event: Event) -> None:
        pass


def cmd_params(args: argparse.Namespace) -> int:
    """``ldmgraph params``: the parameters a workflow declares, for ``--set NAME=VALUE``."""
    from .graph.validate import describe_parameters
    from .graph.workflow import parse_workflow

    registry = _manager(args).registry
    workflow = parse_workflow(load_workflow_file(args.workflow).document)
    listing = describe_parameters(workflow, registry)
    if args.json:
        _print_json(listing)
        return EXIT_OK
    if not listing:
        print(f"{args.workflow}: declares no parameters")
    for name, entry in listing.items():
        print(f"{name}: {_input_line(entry)}")
        print(f"    sets {', '.join(entry['targets'])}")
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    """``ldmgraph nodes``: every node type with inputs, outputs, bounds, defaults and help."""
    registry = _manager(args).registry
    listing = {}
    wanted = (getattr(args, "filter", None) or "").lower()
    for name in sorted(registry.nodes):
        entry = registry.nodes[name].spec.describe(registry)
        if wanted and wanted not in name.lower() and wanted not in entry["category"].lower():
            continue
        entry["plugin"] = registry.owner("node type", name)
        if getattr(registry.nodes[name], "route", None):
            entry["route"] = registry.nodes[name].route  # type: ignore[attr-defined]  # a conditioner's node
        listing[name] = entry
    if args.json:
        _print_json(listing)
        return EXIT_OK
    if not listing:
        print(f"no node type matches {args.filter!r} (`ldmgraph nodes` lists them all)", file=sys.stderr)
        return EXIT_FAILED
    by_category: dict[str, list[str]] = {}
    for name, entry in listing.items():
        by_category.setdefault(entry["category"], []).append(name)
    for category in sorted(by_category):
        print(f"{category}:")
        for name in by_category[category]:
            entry = listing[name]
            print(f"  {name}  {_first_paragraph(entry['description'])}")
            for input_name, spec in entry["inputs"].items():
                print(f"      {input_name}: {_input_line(spec)}")
            outs = ", ".join(f"{k}: {v['type']}" for k, v in entry["outputs"].items())
            print(f"      -> {outs or '(output node)'}")
    return EXIT_OK


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _input_line(spec: dict[str, Any]) -> str:
    """``INT = 20, 1..10000, one of ...  help`` from an input's (or a parameter's) description."""
    text = spec["type"]
    if spec.get("required"):
        text += " (required)"
    elif "default" in spec:
        text += f" = {json.dumps(spec['default'], ensure_ascii=False, default=str)}"
    if "value" in spec:
        text += f" = {json.dumps(spec['value'], ensure_ascii=False, default=str)}"
    if spec.get("ge") is not None or spec.get("le") is not None:
        text += f", range {_number(spec.get('ge'))}..{_number(spec.get('le'))}"
    if spec.get("multiple_of"):
        text += f", multiple of {_number(spec['multiple_of'])}"
    if spec.get("choices") is not None:
        text += f", one of {_choices_text(spec['choices'])}"
    if spec.get("description"):
        text += f"  {spec['description']}"
    return text


def _first_paragraph(description: str) -> str:
    """A node's description up to its first blank line, on one line (a wrapped line is never cut)."""
    return " ".join(description.strip().split("\n\n", 1)[0].split())


def _choices_text(choices: Sequence[Any]) -> str:
    """Choices for text output: all of a short list; the first few of a long one, and how many there are."""
    if len(choices) <= LONG_CHOICES:
        return ", ".join(map(str, choices))
    shown = ", ".join(map(str, choices[:LONG_CHOICES]))
    return f"{shown}, ... ({len(choices)} choices; --json lists them all)"


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
    manager = PluginManager(plugin_dirs=args.plugin_dir, workflow_dirs=getattr(args, "workflows_dirs", []))
    if args.command != "plugins":
        for status in manager.statuses:
            if not status.ok:
                print(f"ldmgraph: warning: plugin {status.name} failed to load: {status.error}", file=sys.stderr)
    return manager


def _environment_for(loaded: LoadedWorkflow, args: argparse.Namespace) -> Any:
    """The run's environment; for a PNG re-run, with the input files it carries (removed afterwards)."""
    import contextlib

    if loaded.kind != "ldmgraph-png":
        return contextlib.nullcontext(environment(args))
    from .nodes.carried_inputs import carried_environment

    return carried_environment(args.workflow, environment(args))


def _print_warnings(warnings: Sequence[Any]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


class _ProgressBar:
    """tqdm bar over the nodes of a run, and a nested bar for the steps inside the current node
    (sampler steps, checkpoint parts) with their rate."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.inner: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
            self.bar = tqdm(total=event.total, unit="node", file=sys.stderr, dynamic_ncols=True, disable=None)
        if event.kind == "progress":
            if self.inner is None or self.inner.total != event.n:
                self._close_inner()
                unit = "step" if "Sampler" in event.node_type else "part"
                self.inner = tqdm(total=event.n, unit=unit, desc=f"  {event.node_id}", position=1, leave=False,
                                  file=sys.stderr, dynamic_ncols=True, disable=None)
            self.inner.update(event.k - self.inner.n)
            return
        self._close_inner()
        if event.kind in ("done", "cached"):
            self.bar.update(1)
        self.bar.set_postfix_str(f"{event.node_id} {event.node_type}")

    def _close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self._close_inner()
        if self.bar is not None:
            self.bar.close()


class _PreviewWriter:
    """``run --preview-dir``: each preview of a progress event as ``{node}_step{k:04d}.png`` in a
    private folder (0700 when created), written atomically; node ids become safe file names."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder = folder
        self.every = every
        self.files: list[Path] = []

    @classmethod
    def open(cls, folder: Path | None, every: int) -> _PreviewWriter | None:
        if folder is None:
            return None
        from .graph.files import output_folder_problem

        if every < 1:
            raise SystemExit(f"ldmgraph: --preview-every must be at least 1, got {every}")
        problem = output_folder_problem(folder)
        if problem is not None:
            raise SystemExit(f"ldmgraph: --preview-dir: {problem}")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(folder, every)

    def __call__(self, event: Event) -> None:
        import hashlib
        import io
        import re

        from PIL import Image

        from .graph.files import atomic_write_bytes, safe_join

        stem = re.sub(r"[^A-Za-z0-9_-]", "_", event.node_id)[:100]
        if stem != event.node_id:  # two ids that clean to one name keep apart
            stem += "-" + hashlib.blake2b(event.node_id.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        buffer = io.BytesIO()
        Image.fromarray(event.preview).save(buffer, format="PNG")
        self.files.append(atomic_write_bytes(safe_join(self.folder, f"{stem}_step{event.k:04d}.png"), buffer.getvalue()))


class _JsonEvents:
    """``run --json``: each progress event as one JSON object per line on stderr, as it happens
    (stdout keeps the one result document)."""

    def __call__(self, event: Event) -> None:
        sys.stderr.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


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
    args.running = None
    threads: Any = contextlib.nullcontext()
    if args.command in THREADED_COMMANDS:
        from .threads import command_threads, resolve_threads

        try:
            resolve_threads(getattr(args, "threads", None))
        except ValueError as exc:
            print(f"ldmgraph: usage error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        threads = command_threads(getattr(args, "threads", None))
    try:
        with _sigterm_as_interrupt(), threads:
            return int(args.func(args))
    except ValidationError as exc:
        if getattr(args, "json", False):
            _print_json(exc.to_dict())
        else:
            for problem in exc.shown:
                print(f"error: {problem}", file=sys.stderr)
            if exc.more:
                print(f"error: ... and {exc.more} more problem(s)", file=sys.stderr)
        return EXIT_INVALID
    except ExecutionError as exc:
        _report_failure(args, exc.to_dict(), str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        return _report_interrupt(args, exc)
    except BrokenPipeError:  # `ldmgraph nodes | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except LdmGraphError as exc:
        _report_failure(args, {"error": type(exc).__name__, "message": str(exc)}, str(exc))
        return EXIT_FAILED


def entry() -> None:
    """The ``ldmgraph`` console script (and ``python -m ldmgraph.cli``): `main`, then the exit.

    When the command has finished and no other thread runs, the exit handlers run (temporary
    folders removed, logs flushed), the standard streams are flushed and the process ends with
    ``os._exit``: tearing down an interpreter that holds torch costs about half a second of CPU
    and has nothing left to do.
    """
    code = main()
    if threading.active_count() == 1:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM like SIGINT while a command runs: raise in the main thread, so that
    ``finally`` blocks remove temporary files and the run stops where it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_interrupt(args: argparse.Namespace, exc: KeyboardInterrupt) -> int:
    name, code = ("SIGTERM", EXIT_SIGTERM) if isinstance(exc, Terminated) else ("SIGINT", EXIT_SIGINT)
    running = getattr(args, "running", None)
    where = f" while node {running[0]!r} ({running[1]}) was running" if running else ""
    message = f"interrupted by {name}{where}; the run was cancelled and no partial file was left"
    payload: dict[str, Any] = {"error": "Interrupted", "signal": name, "message": message}
    if running:
        payload.update(node_id=running[0], node_type=running[1])
    _report_failure(args, payload, message)
    return code


def _report_failure(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        _print_json({"ok": False, **payload})
    else:
        print(f"error: {text}", file=sys.stderr)


if __name__ == "__main__":
    entry()
