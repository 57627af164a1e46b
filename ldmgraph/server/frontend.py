"""What ComfyUI's front end (``comfyui-frontend-package``) asks for at start-up, served for real.

The editor is ComfyUI's published front end, installed as its own package (``pip install
"ldmgraph[ui]"``, GPL-3.0) and served from its ``static`` folder; nothing of it is copied here.
At start-up it reads the user mode (``/users``: single user), settings (``/settings``, persisted
in the server's database), user data (``/userdata``: saved editor workflows, files under the data
folder's ``userdata/``), extensions (one: ldmgraph's, which gives the editor its first graph),
translations (none), model folders and the template index. The saved workflows of the workflows
folder appear in its workflow list as ``workflows/<name>.json``, drawn in its UI format; a file the
user saves under that name takes precedence.

The first view: when it has no open workflow to restore, the editor loads a default graph built into
it (made for models this server does not have, so its nodes would be marked missing). ldmgraph's
extension (``assets/editor/ldmgraph.js``) replaces that graph's contents with ``comfyui_txt2img.json``:
ComfyUI's classic text-to-image graph on the bundled model, which runs here as it is. The template
browser (``/templates/index.json``, ``/templates/<name>.json``, ``/templates/<name>-1.png``) lists that
graph and every saved workflow, each with a drawing of its graph as the thumbnail.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ldmgraph.graph.errors import UnsafePathError
from ldmgraph.graph.files import atomic_write_bytes, safe_join

from .api import error
from .protocol import plain_json
from .state import ServerState
from .workflows import to_ui

SEGMENT = re.compile(r"^(?!\.\.?$)[^\x00-\x1f/\\:*?\"<>|]{1,200}$")  # no "." or "..", no control characters
SAVED_PREFIX = "workflows/"
EDITOR_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "editor"
EXTENSION_FILES = {"ldmgraph.js": "text/javascript", "default_graph.json": "application/json"}
DEFAULT_GRAPH = "comfyui_txt2img"  # the editor's first graph, also the first template
TEMPLATE_FILE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,99}?)(?:-(?P<index>[1-9])\.png|\.json)$")


def frontend_static() -> Path | None:
    """The installed front end's static folder, or None when ``ldmgraph[ui]`` is not installed."""
    try:
        import comfyui_frontend_package  # type: ignore[import-not-found]
    except ImportError:
        return None
    folder = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    return folder if (folder / "index.html").is_file() else None


def userdata_path(state: ServerState, name: str) -> Path:
    """A user-data file name -> its path under the data folder; raises UnsafePathError otherwise."""
    parts = name.split("/")
    if not name or len(name) > 400 or not all(SEGMENT.match(p) for p in parts):
        raise UnsafePathError(f"invalid user data name {name[:80]!r}")
    return safe_join(state.userdata_dir, name)


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/users", summary="User mode: single user")
    def get_users() -> dict[str, Any]:
        return {"storage": "server", "migrated": True}

    @router.post("/users", summary="Creating users is not supported (single user)")
    def post_users() -> Any:
        return error(400, "single_user", "this server has a single user")

    @router.get("/settings", summary="Editor settings (persisted)")
    def get_settings() -> dict[str, Any]:
        return state.store.settings()

    @router.post("/settings", summary="Replace several settings")
    async def post_settings(request: Request) -> Any:
        values = await _json(request)
        if not isinstance(values, dict) or not plain_json(values):
            return error(400, "invalid_settings", "settings are a JSON object")
        state.store.set_settings(values)
        return {}

    @router.get("/settings/{setting_id}", summary="One setting (null if unset)")
    def get_setting(setting_id: str) -> Any:
        return state.store.settings().get(setting_id)

    @router.post("/settings/{setting_id}", summary="Set one setting")
    async def post_setting(setting_id: str, request: Request) -> Any:
        if len(setting_id) > 200:
            return error(400, "invalid_setting", "setting ids are at most 200 characters")
        value = await _json(request)
        if not plain_json(value):
            return error(400, "invalid_setting", "a setting's value must be plain JSON (no NaN or Infinity)")
        state.store.set_settings({setting_id: value})
        return {}

    @router.get("/userdata", summary="List user data files in a folder")
    def list_userdata(dir: str = Query(..., max_length=400), recurse: bool = False,
                      full_info: bool = False, split: bool = False) -> Any:
        try:
            folder = userdata_path(state, dir.rstrip("/"))
        except UnsafePathError as exc:
            return error(400, "invalid_path", str(exc))
        entries = _listing(folder, recurse)
        if dir.rstrip("/") == "workflows":
            for name in state.workflows():
                entries.setdefault(f"{name}.json", {"size": 0, "modified": 0.0})
        ordered = sorted(entries.items())
        if full_info:
            return [{"path": p, **info} for p, info in ordered]
        if split:
            return [[p, *p.split("/")] for p, _ in ordered]
        return [p for p, _ in ordered]

    @router.get("/v2/userdata", summary="List user data (files and folders) under a path")
    def list_userdata_v2(path: str = Query("", max_length=400)) -> Any:
        try:
            folder = userdata_path(state, path.strip("/")) if path.strip("/") else state.userdata_dir
        except UnsafePathError as exc:
            return error(400, "invalid_path", str(exc))
        if not folder.is_dir():
            return []
        out = []
        for entry in sorted(folder.iterdir()):
            rel = entry.relative_to(state.userdata_dir).as_posix()
            out.append({"name": entry.name, "path": rel, "type": "directory" if entry.is_dir() else "file",
                        **({} if entry.is_dir() else {"size": entry.stat().st_size,
                                                       "modified": entry.stat().st_mtime})})
        return out

    @router.get("/userdata/{name:path}", summary="Read a user data file")
    def get_userdata(name: str) -> Any:
        try:
            path = userdata_path(state, name)
        except UnsafePathError as exc:
            return error(400, "invalid_path", str(exc))
        if path.is_file():
            return FileResponse(path)
        saved = _saved_workflow(state, name)
        if saved is not None:
            return JSONResponse(saved)
        return error(404, "not_found", f"no user data file {name[:100]!r}")

    @router.post("/userdata/{name:path}", summary="Write a user data file (or move one: .../move/<dest>)")
    async def post_userdata(name: str, request: Request, overwrite: bool = True, full_info: bool = False) -> Any:
        source, sep, dest = name.partition("/move/")
        try:
            path = userdata_path(state, source)
            target = userdata_path(state, dest) if sep else None
        except UnsafePathError as exc:
            return error(400, "invalid_path", str(exc))
        if target is not None:
            if not path.is_file():
                return error(404, "not_found", f"no user data file {source[:100]!r}")
            if target.exists() and not overwrite:
                return error(409, "exists", f"{dest[:100]!r} exists")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            path, source = target, dest
        else:
            if path.exists() and not overwrite:
                return error(409, "exists", f"{source[:100]!r} exists")
            atomic_write_bytes(path, await request.body())
        if full_info:
            stat = path.stat()
            return {"path": source, "size": stat.st_size, "modified": stat.st_mtime}
        return source

    @router.delete("/userdata/{name:path}", summary="Delete a user data file")
    def delete_userdata(name: str) -> Any:
        try:
            path = userdata_path(state, name)
        except UnsafePathError as exc:
            return error(400, "invalid_path", str(exc))
        if not path.is_file():
            return error(404, "not_found", f"no user data file {name[:100]!r}")
        path.unlink()
        return Response(status_code=204)

    @router.get("/extensions", summary="Editor extension scripts (ldmgraph's: the editor's first graph)")
    def get_extensions() -> list[str]:
        return ["/extensions/ldmgraph/ldmgraph.js"] if (EDITOR_ASSETS / "ldmgraph.js").is_file() else []

    @router.get("/i18n", summary="Translations of node names (none)")
    def get_i18n() -> dict[str, Any]:
        return {}

    @router.get("/features", summary="Server features the editor may use")
    def get_features() -> dict[str, Any]:
        return {"supports_preview_metadata": False, "max_upload_size": state.config.max_body_bytes}

    @router.get("/experiment/models", summary="Model folders")
    def get_model_folders() -> list[dict[str, Any]]:
        return [{"name": "checkpoints", "folders": [str(p) for p in state.env.model_dirs]}]

    @router.get("/experiment/models/{folder}", summary="Models in a folder")
    def get_model_files(folder: str) -> Any:
        if folder != "checkpoints":
            return error(404, "unknown_folder", f"no model folder {folder[:60]!r}")
        from ldmgraph.nodes.common import available_models

        return [{"name": n, "pathIndex": 0} for n in available_models(state.env.model_dirs)]

    @router.get("/global_subgraphs", summary="Shared subgraphs (none)")
    def get_global_subgraphs() -> dict[str, Any]:
        return {}

    @router.get("/workflow_templates", summary="Workflow templates of installed node packs (none)")
    def get_workflow_templates() -> dict[str, Any]:
        return {}

    return router


def build_root_router(state: ServerState) -> APIRouter:
    """Routes outside ``/api`` that the page reads: the template index."""
    router = APIRouter()

    @router.get("/extensions/ldmgraph/{name}", include_in_schema=False)
    def get_extension_file(name: str) -> Response:
        if name not in EXTENSION_FILES:
            return error(404, "not_found", f"no editor extension file {name[:60]!r}")
        path = EDITOR_ASSETS / ("comfyui_txt2img.json" if name == "default_graph.json" else name)
        return Response(path.read_bytes(), media_type=EXTENSION_FILES[name], headers={"Cache-Control": "no-store"})

    @router.get("/templates/index.json", include_in_schema=False)
    def get_templates() -> list[Any]:
        return template_index(state)

    @router.get("/templates/index_logo.json", include_in_schema=False)
    def get_template_logos() -> dict[str, Any]:
        return {}

    @router.get("/templates/{file}", include_in_schema=False)
    def get_template(file: str) -> Response:
        match = TEMPLATE_FILE.match(file)
        graph = template_graph(state, match["name"]) if match else None
        if graph is None:
            return error(404, "not_found", f"no template {file[:100]!r}")
        if match and match["index"]:
            return Response(graph_thumbnail(json.dumps(graph, sort_keys=True)), media_type="image/png")
        return JSONResponse(graph)

    @router.get("/user.css", include_in_schema=False)
    def get_user_css() -> Response:
        path = state.userdata_dir / "user.css"
        return Response(path.read_bytes() if path.is_file() else b"", media_type="text/css")

    return router


def template_index(state: ServerState) -> list[dict[str, Any]]:
    """The template browser's index: the default graph, then the saved workflows (the front end's format)."""
    templates = [_template(DEFAULT_GRAPH, "Text to image (ComfyUI nodes)",
                           "ComfyUI's classic text-to-image graph on the bundled model: checkpoint loader, two "
                           "prompts, empty latent, KSampler, VAE decode, save.")]
    for name, doc in state.workflows().items():
        if name != DEFAULT_GRAPH:
            templates.append(_template(name, name, str((doc.get("metadata") or {}).get("description", ""))))
    return [{"moduleName": "default", "title": "ldmgraph", "type": "image", "category": "ldmgraph",
             "templates": templates}]


def _template(name: str, title: str, description: str) -> dict[str, Any]:
    return {"name": name, "title": title, "description": description, "mediaType": "image",
            "mediaSubtype": "png", "tags": ["ldmgraph"], "models": ["ldmgraph-shapes"]}


def template_graph(state: ServerState, name: str) -> dict[str, Any] | None:
    """A template's graph in the editor's UI format (None when there is no such template)."""
    if name == DEFAULT_GRAPH:
        return json.loads((EDITOR_ASSETS / f"{DEFAULT_GRAPH}.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    doc = state.workflows().get(name)
    if doc is None:
        return None
    graph = to_ui(doc, state.registry)
    if graph.get("id") is None:  # the template loader's schema wants a workflow id as a string, or none
        graph.pop("id", None)
    return graph


@lru_cache(maxsize=64)
def graph_thumbnail(graph_json: str) -> bytes:
    """A drawing of a UI-format graph (its nodes as boxes with their titles, its links as lines): the
    template's thumbnail, made from the graph itself so every saved workflow has one."""
    from PIL import Image, ImageDraw

    graph = json.loads(graph_json)
    boxes = {n["id"]: (*n["pos"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in graph["nodes"] if isinstance(n.get("pos"), list) and isinstance(n.get("size"), list)}
    corners = list(boxes.values()) or [(0, 0, 1, 1)]
    width, height, margin = 512, 384, 16
    left, top = min(b[0] for b in corners), min(b[1] for b in corners)
    right, bottom = max(b[2] for b in corners), max(b[3] for b in corners)
    scale = min((width - 2 * margin) / max(right - left, 1), (height - 2 * margin) / max(bottom - top, 1))

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + (x - left) * scale, margin + (y - top) * scale

    image = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    for link in graph.get("links") or []:
        src, dst = boxes.get(link[1]), boxes.get(link[3])
        if src and dst:
            draw.line([at(src[2], (src[1] + src[3]) / 2), at(dst[0], (dst[1] + dst[3]) / 2)], fill=(120, 160, 200), width=2)
    titles = {n["id"]: str(n.get("title") or n.get("type")) for n in graph["nodes"]}
    for node_id, (x0, y0, x1, y1) in boxes.items():
        draw.rounded_rectangle([at(x0, y0), at(x1, y1)], radius=6, fill=(53, 53, 58), outline=(90, 90, 98))
        draw.text((at(x0, y0)[0] + 5, at(x0, y0)[1] + 4), titles[node_id][:28], fill=(220, 220, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _saved_workflow(state: ServerState, name: str) -> dict[str, Any] | None:
    if not (name.startswith(SAVED_PREFIX) and name.endswith(".json")):
        return None
    doc = state.workflows().get(name[len(SAVED_PREFIX):-5])
    return to_ui(doc, state.registry) if doc is not None else None


def _listing(folder: Path, recurse: bool) -> dict[str, dict[str, Any]]:
    if not folder.is_dir():
        return {}
    found = {}
    paths = folder.rglob("*") if recurse else folder.iterdir()
    for path in paths:
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "modified": stat.st_mtime}
    return found


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return None
