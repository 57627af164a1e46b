"""``ldmgraph serve``: the HTTP and websocket server (needs ``pip install "ldmgraph[server]"``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from .state import LOOPBACK_HOSTS, REPO_WORKFLOWS


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    serve = subparsers.add_parser(
        "serve", help="serve ComfyUI's HTTP/websocket API on a persistent queue (and the editor, if installed)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other "
                       "address needs --token)")
    serve.add_argument("--port", type=int, default=8188, help="port (default 8188, as ComfyUI)")
    serve.add_argument("--data-dir", type=Path, default=Path("ldmgraph-data"),
                       help="queue database, inputs, outputs, settings (default ./ldmgraph-data)")
    serve.add_argument("--token", help="require this token (Authorization: Bearer, or ?token=) on every request")
    serve.add_argument("--workflows-dir", type=Path, action="append", default=[], metavar="DIR",
                       help="saved workflows to offer (the first one; default ./workflows if it exists, else the "
                       "repository's workflows/); every one is also searched for components, node types "
                       "workflow/<stem> (repeatable)")
    serve.add_argument("--models-dir", type=Path, action="append", default=[], metavar="DIR",
                       help="checkpoint folder (repeatable; the bundled models are always searched last)")
    serve.add_argument("--plugin-dir", action="append", default=[], metavar="DIR", help="extra plugin folder")
    serve.add_argument("--device", help="device override for the model layer (cpu, cuda, mps)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MiB)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser requests from this origin (repeatable; default none)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="accept requests whose Host header is NAME (repeatable; default: only the bound address "
                       "and, on loopback, localhost), e.g. behind a reverse proxy")
    serve.add_argument("--max-nodes", type=int, default=5000, help="largest graph accepted, in nodes (default 5000)")
    serve.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                       help="largest uploaded image, width x height (default 4096x4096)")
    serve.add_argument("--preview-method", choices=["none", "auto", "latent2rgb", "taesd"], default="none",
                       help="latent previews while sampling: none (default, as ComfyUI) unless a job asks for them "
                       "(the editor's setting); any other value draws them for every job with a connected client")
    serve.add_argument("--no-editor", action="store_true", help="do not serve the editor at /")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    serve.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local: one worker thread in this process; ray: jobs run on actors of a Ray cluster "
                       '(pip install "ldmgraph[ray]")')
    serve.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto; default: start a "
                       "local one)")
    serve.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    from ldmgraph.cli import add_model_runtime_arguments, add_precision_argument, add_threads_argument

    add_precision_argument(serve)
    add_threads_argument(serve)
    add_model_runtime_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Build the server state and run uvicorn until interrupted."""
    if not is_loopback(args.host) and not args.token:
        print(f"ldmgraph serve: binding {args.host} (not loopback) needs --token, so that only clients "
              "holding the token can queue jobs", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f'ldmgraph serve: the server needs its extra: pip install "ldmgraph[server]" ({exc})', file=sys.stderr)
        return 1
    from ldmgraph.batch.ray_pool import RayUnavailable
    from ldmgraph.plugins import PluginManager

    from .state import ServerConfig, ServerState

    if args.backend != "ray" and (args.address or args.workers):
        print("ldmgraph serve: --address and --workers are for --backend ray", file=sys.stderr)
        return 2
    precision = None
    if args.precision is not None:
        from ldmgraph.models.precision import resolve_precision

        precision = resolve_precision(args.precision, args.device)
    workflows = args.workflows_dir[0] if args.workflows_dir else None
    if workflows is None:
        workflows = Path("workflows") if Path("workflows").is_dir() else REPO_WORKFLOWS
    config = ServerConfig(
        data_dir=args.data_dir, host=args.host, port=args.port, token=args.token, workflows_dir=workflows,
        model_dirs=tuple(args.models_dir), plugin_dirs=tuple(args.plugin_dir), device=args.device,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), cors_origins=tuple(args.cors_origin),
        frontend=not args.no_editor, precision=precision, backend=args.backend, address=args.address,
        workers=args.workers, allowed_hosts=tuple(args.allow_host), max_nodes=args.max_nodes,
        max_image_pixels=args.max_upload_pixels, preview_method=args.preview_method)
    manager = PluginManager(plugin_dirs=args.plugin_dir, workflow_dirs=args.workflows_dir)
    for status in manager.statuses:
        if not status.ok:
            print(f"ldmgraph: warning: plugin {status.name} failed to load: {status.error}", file=sys.stderr)
    try:
        state = ServerState.build(config, manager.registry)
    except RayUnavailable as exc:
        print(f"ldmgraph serve: {exc}", file=sys.stderr)
        return 1
    executor = getattr(state.worker, "executor", None)
    if executor is not None:
        from ldmgraph.cli import install_model_runtime

        install_model_runtime(executor.resources, args)
    elif args.compile or args.gpu_memory is not None:
        print("ldmgraph serve: --compile and --gpu-memory apply to the local backend only", file=sys.stderr)
        return 2
    app = create_app(state)
    print(f"ldmgraph serve: http://{args.host}:{args.port}/ (data in {config.data_dir.resolve()})",
          file=sys.stderr, flush=True)
    from uvicorn.config import WS_PROTOCOLS

    # The worker thread runs Python between torch calls; a shorter interpreter switch interval lets the
    # event loop answer requests without waiting up to the default 5 ms for the worker's turn to end.
    sys.setswitchinterval(0.001)

    ws = "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "auto"  # uvicorn >= 0.35
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws=ws)
    return 0
