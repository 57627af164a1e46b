"""Plugins: pluggy hook specifications and the plugin manager that fills a :class:`Registry`.

Built-in nodes, samplers, schedules and conditioners register through the same hooks, and load
through the same entry-point group ``ldmgraph``, as third-party plugins: ldmgraph's own
pyproject.toml lists its modules there. Sources, in order: ldmgraph's own entry points (a built-in
module that fails to import is an error: the installation is broken), the other packages' entry
points, then an optional plugin folder (``--plugin-dir`` or the environment variable
``LDMGRAPH_PLUGIN_DIR``: each ``*.py`` file or package folder in it is one plugin). A third-party
plugin that fails to import or register is recorded with its error and the rest still load; so is
one that implements a hook name that does not exist (a misspelling) or registers a name that is
built in. Two plugins registering the same name is an error that names both. An import that takes
longer than SLOW_IMPORT_SECONDS is reported by name while it runs; ``ldmgraph plugins`` shows how
long each plugin took.

A third-party plugin is also time-boxed: its import and each of its hook calls run in a worker
thread bounded by ``LDMGRAPH_PLUGIN_TIMEOUT`` seconds (default PLUGIN_TIMEOUT_SECONDS; 0 = no
bound). Past it the plugin is reported as hung, skipped (nothing of it registered) and the command
goes on. What no in-process bound can defend against: a plugin that calls ``os._exit`` or crashes
the interpreter, one that holds the GIL in a C loop, or one whose hung thread later changes global
state of its own; run untrusted plugins in a separate process (``ldmgraph serve`` workers) or not
at all.

Writing a plugin::

    from ldmgraph.plugins import hookimpl

    @hookimpl
    def ldmgraph_nodes():
        return [MyNode]

    @hookimpl
    def ldmgraph_samplers():
        return {"my_sampler": "my_package.sampling:sample_my"}   # lazy: imported on first use

    @hookimpl
    def ldmgraph_conditioners():
        return [MyConditioner]   # ldmgraph.conditioners.Conditioner subclasses; each gets its node

    @hookimpl
    def ldmgraph_workflows():
        return [Path(__file__).parent / "workflows"]   # components: node types workflow/<stem>
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from .graph.errors import PluginError
from .graph.node import Node
from .graph.registry import HOOK_TABLES, PluginStatus, Registry

PROJECT = "ldmgraph"
ENTRY_POINT_GROUP = "ldmgraph"
PLUGIN_DIR_ENV = "LDMGRAPH_PLUGIN_DIR"
PROJECT_WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"  # the project's saved workflows

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

SLOW_IMPORT_SECONDS = 3.0  # a plugin import still running after this long is reported by name
PLUGIN_TIMEOUT_ENV = "LDMGRAPH_PLUGIN_TIMEOUT"
PLUGIN_TIMEOUT_SECONDS = 10.0  # a third-party plugin's import or hook call running this long is skipped


class PluginHungError(PluginError):
    """A third-party plugin's import or hook call ran past the time box; it was skipped."""


def plugin_timeout() -> float:
    """The time box for third-party plugins, from LDMGRAPH_PLUGIN_TIMEOUT (seconds; 0 = unbounded)."""
    text = os.environ.get(PLUGIN_TIMEOUT_ENV, "")
    try:
        return max(float(text), 0.0) if text else PLUGIN_TIMEOUT_SECONDS
    except ValueError:
        return PLUGIN_TIMEOUT_SECONDS


def bounded(name: str, what: str, call: Callable[[], Any], seconds: float) -> Any:
    """``call()`` in a daemon thread, waited for at most ``seconds`` (its result or its exception);
    PluginHungError if it is still running then (the thread is abandoned, never joined)."""
    if seconds <= 0:
        return call()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"ldmgraph plugin {name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise PluginHungError(f"plugin {name} hung: its {what} was still running after {seconds:g} s, so it was "
                              f"skipped (raise {PLUGIN_TIMEOUT_ENV} if it is only slow)")
    if "error" in box:
        raise box["error"]
    return box.get("value")
HOOK_PREFIX = "ldmgraph_"


class HookSpecs:
    """The hooks a plugin may implement (each returns what it adds; all are optional)."""

    @hookspec
    def ldmgraph_nodes(self) -> list[type[Node]]:  # type: ignore[empty-body]
        """Node classes to register."""

    @hookspec
    def ldmgraph_samplers(self) -> dict[str, Callable[..., Any] | str]:  # type: ignore[empty-body]
        """Sampler functions by name (callable or lazy ``"module:function"``)."""

    @hookspec
    def ldmgraph_schedules(self) -> dict[str, Callable[..., Any] | str]:  # type: ignore[empty-body]
        """Sigma schedules by name: ``fn(n, noise_schedule) -> n + 1 sigmas ending in 0``."""

    @hookspec
    def ldmgraph_conditioners(self) -> list[type[Any]] | dict[str, type[Any]]:  # type: ignore[empty-body]
        """Conditioners (``ldmgraph.conditioners.Conditioner`` subclasses), a list or a dict by
        type name; each one's node is registered with it."""

    @hookspec
    def ldmgraph_workflows(self) -> list[str | os.PathLike[str]]:  # type: ignore[empty-body]
        """Folders of workflow files that the plugin ships; each one that declares outputs becomes
        a node type ``workflow/<stem>`` (see ``ldmgraph.graph.components``)."""

    @hookspec
    def ldmgraph_derived_nodes(self, registry: Registry) -> list[type[Node]]:  # type: ignore[empty-body]
        """Node classes made from what is registered (e.g. one options node per sampler), asked
        again after every plugin registers; return only the ones not yet in ``registry.nodes``.
        A node's ``derived_from = (kind, name)`` credits it to the plugin that registered that name."""


class PluginManager:
    """Finds plugins, registers them, and holds the resulting :class:`Registry` (no global state)."""

    def __init__(
        self,
        *,
        builtins: Iterable[str] | None = None,
        entry_points_group: str | None = ENTRY_POINT_GROUP,
        plugin_dirs: Iterable[str | os.PathLike[str]] = (),
        use_env: bool = True,
        on_slow: Callable[[str, float], None] | None = None,
        workflow_dirs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.registry = Registry()
        self._plugin_workflow_dirs: list[tuple[str, Path]] = []
        self._default_workflow_dirs = entry_points_group is not None
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(HookSpecs)
        self._on_slow = on_slow or _report_slow
        self.timeout = plugin_timeout()
        own, others = _entry_points(entry_points_group or ENTRY_POINT_GROUP)
        if builtins is None:
            if not own:
                raise PluginError(
                    "ldmgraph's built-in plugins are not registered (no 'ldmgraph' entry points of the "
                    "ldmgraph distribution): reinstall ldmgraph, e.g. pip install -e ."
                )
            builtins = [ep.value for ep in own]
        for name in builtins:
            self._load_builtin(name)
        if entry_points_group:
            for ep in others:
                self._import_and_register(f"{ep.name} ({ep.value})", "entry-point", ep.load)
        dirs = [Path(d) for d in plugin_dirs]
        if use_env and os.environ.get(PLUGIN_DIR_ENV):
            dirs += [Path(p) for p in os.environ[PLUGIN_DIR_ENV].split(os.pathsep) if p]
        for folder in dirs:
            self._load_folder(folder)
        self.load_workflows(workflow_dirs)

    def load_workflows(self, workflow_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Register the workflow components (workflows that declare outputs) as node types
        ``workflow/<stem>``, after the plugins whose nodes they use. Folders, the first one a stem is
        found in winning: ``workflow_dirs`` (``--workflows-dir``), then (with entry-point discovery)
        ``./workflows``, the plugins' folders (hook ``ldmgraph_workflows``) and the project's
        ``workflows/``; in each, ``*.json`` and ``components/*.json``."""
        from .graph.components import register_components

        sources = [(f"workflows:{folder}", Path(folder)) for folder in workflow_dirs]
        if self._default_workflow_dirs and Path("workflows").resolve() != PROJECT_WORKFLOWS:
            sources.append(("workflows:./workflows", Path("workflows")))
        sources += [(owner, folder) for owner, folder in self._plugin_workflow_dirs]
        if self._default_workflow_dirs and PROJECT_WORKFLOWS.is_dir():
            sources.append((f"workflows:{PROJECT_WORKFLOWS}", PROJECT_WORKFLOWS))
        for status in register_components(self.registry, sources):
            if status.nodes or not status.ok:
                self.registry.plugins.append(status)

    @property
    def statuses(self) -> list[PluginStatus]:
        """Every plugin seen, with whether it loaded and the error if not."""
        return self.registry.plugins

    def register(self, plugin: object, name: str, source: str = "api") -> PluginStatus:
        """Register an already-imported plugin object (module or instance with hook functions)."""
        status = PluginStatus(name=name, source=source, ok=True)
        self.registry.plugins.append(status)
        if source == "builtin":
            self.registry.builtins.add(name)
        snapshot = self.registry.snapshot()
        started = time.perf_counter()
        try:
            _check_hook_names(plugin, name)
            self._pm.register(plugin, name=name)
            self._collect(plugin, status, source != "builtin")
            self._derive()
            for folder in self._call(self._pm.hook.ldmgraph_workflows, plugin, name, source != "builtin") or []:
                self._plugin_workflow_dirs.append((name, Path(folder)))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
            self.registry.restore(snapshot)  # all or nothing: no half-registered plugin
            for table in HOOK_TABLES:
                status.entries(table).clear()
            self._fail(status, exc)
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            if source == "builtin":
                raise PluginError(f"built-in plugin module {name} failed to register: {status.error}") from exc
        status.seconds += time.perf_counter() - started
        return status

    # -- sources --------------------------------------------------------------------------------
    def _load_builtin(self, dotted: str) -> None:
        """Import one of ldmgraph's own plugin modules; failing to is an error (a broken install)."""
        try:
            plugin = self._timed(dotted, lambda: importlib.import_module(dotted))[0]
        except Exception as exc:
            raise PluginError(f"built-in plugin module {dotted} cannot be imported: {type(exc).__name__}: {exc}") from exc
        self.register(plugin, dotted, "builtin")

    def _load_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            status = PluginStatus(name=str(folder), source="plugin-dir", ok=False,
                                  error=f"plugin folder {folder} does not exist")
            self.registry.plugins.append(status)
            return
        for path in sorted(folder.iterdir()):
            if path.name.startswith((".", "_")):
                continue
            if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").is_file()):
                self._import_and_register(str(path), "plugin-dir", lambda p=path: _import_path(p))

    def _timed(self, name: str, load: Callable[[], Any]) -> tuple[Any, float]:
        """Run ``load``, reporting ``name`` through ``on_slow`` if it is still running after
        SLOW_IMPORT_SECONDS; returns its result and the seconds it took."""
        started = time.perf_counter()
        timer = threading.Timer(SLOW_IMPORT_SECONDS, self._on_slow, (name, SLOW_IMPORT_SECONDS))
        timer.daemon = True
        timer.start()
        try:
            return load(), time.perf_counter() - started
        finally:
            timer.cancel()

    def _import_and_register(self, name: str, source: str, load: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            plugin, seconds = self._timed(name, lambda: bounded(name, "import", load, self.timeout))
        except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt-free plugins only
            if isinstance(exc, KeyboardInterrupt):
                raise
            status = PluginStatus(name=name, source=source, ok=False, seconds=time.perf_counter() - started)
            self._fail(status, exc)
            self.registry.plugins.append(status)
            return
        self.register(plugin, name, source).seconds += seconds

    # -- collection ------------------------------------------------------------------------------
    def _call(self, hook: Any, plugin: object, name: str, boxed: bool) -> Any:
        """One hook of one plugin; a third-party plugin's call is time-boxed."""
        if not boxed:
            return _call_one(hook, plugin)
        return bounded(name, f"hook {hook.name}", lambda: _call_one(hook, plugin), self.timeout)

    def _collect(self, plugin: object, status: PluginStatus, boxed: bool = False) -> None:
        """Call this plugin's hooks only, so one plugin's failure is attributed to it alone."""
        for table in HOOK_TABLES:
            entries = self._call(getattr(self._pm.hook, HOOK_PREFIX + table), plugin, status.name, boxed)
            if entries is not None:
                self._add(table, entries, status)

    def _add(self, table: str, entries: Any, status: PluginStatus) -> None:
        """Register what one hook returned: node classes, conditioner classes (each with its node),
        or a dict of named callables."""
        if table == "nodes":
            for cls in list(entries):
                self.registry.add_node(cls, status.name)
                status.nodes.append(cls.type_name)
            return
        if table == "conditioners" and not isinstance(entries, dict):
            entries = {getattr(cls, "type_name", repr(cls)): cls for cls in entries}
        if not isinstance(entries, dict):
            raise PluginError(f"hook {HOOK_PREFIX}{table} must return a dict, got {type(entries).__name__}")
        for key, value in entries.items():
            if table == "conditioners":
                from .conditioners import conditioner_node

                try:
                    node = conditioner_node(value)
                except TypeError as exc:
                    raise PluginError(f"conditioner {key!r}: {exc}") from exc
                if node.type_name != key:
                    raise PluginError(f"conditioner registered as {key!r} has type_name {node.type_name!r}")
                self.registry.add_node(node, status.name)
                status.nodes.append(key)
            self.registry.add_callable(table, key, value, status.name)
            status.entries(table).append(key)

    def _derive(self) -> None:
        """Add the derived nodes that the registry's current contents call for."""
        for impl in self._pm.hook.ldmgraph_derived_nodes.get_hookimpls():
            call = lambda impl=impl: impl.function(registry=self.registry)  # noqa: E731
            boxed = impl.plugin_name not in self.registry.builtins
            try:
                derived = bounded(impl.plugin_name, "hook ldmgraph_derived_nodes", call, self.timeout) if boxed else call()
            except PluginHungError as exc:  # that plugin is dropped from here on, not the one registering
                self._pm.unregister(impl.plugin)
                for status in self.registry.plugins:
                    if status.name == impl.plugin_name:
                        self._fail(status, exc)
                continue
            for cls in derived or []:
                kind, name = getattr(cls, "derived_from", ("", ""))
                owner = self.registry.owner(kind, name) or impl.plugin_name
                self.registry.add_node(cls, owner)
                for status in self.registry.plugins:
                    if status.name == owner and cls.type_name not in status.nodes:
                        status.nodes.append(cls.type_name)

    @staticmethod
    def _fail(status: PluginStatus, exc: BaseException) -> None:
        status.ok = False
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        status.error = f"{type(exc).__name__}: {exc}{where}"


def _report_slow(name: str, seconds: float) -> None:
    print(f"ldmgraph: plugin {name} is still importing after {seconds:.0f} s", file=sys.stderr, flush=True)


def _entry_points(group: str) -> tuple[list[Any], list[Any]]:
    """The group's entry points: ldmgraph's own (its built-in modules, in declared order) and the
    other packages' (by name)."""
    own, others = [], []
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        (own if dist is not None and dist.name == PROJECT else others).append(ep)
    return own, sorted(others, key=lambda e: e.name)


def _check_hook_names(plugin: object, name: str) -> None:
    """Refuse a plugin with a hook implementation whose name is no hook (a misspelling would
    otherwise load as "ok" and register nothing)."""
    known = {n for n in dir(HookSpecs) if n.startswith(HOOK_PREFIX)}
    marker = PROJECT + "_impl"
    for attr in dir(plugin):
        value = getattr(plugin, attr, None)
        if callable(value) and hasattr(value, marker) and attr not in known:
            import difflib

            close = difflib.get_close_matches(attr, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the hooks are {', '.join(sorted(known))}"
            raise PluginError(f"plugin {name} implements {attr!r}, which is not an ldmgraph hook{hint}")


def _call_one(hook: Any, plugin: object) -> Any:
    """Call one hook on one plugin only (None when the plugin does not implement it)."""
    impls = [impl for impl in hook.get_hookimpls() if impl.plugin is plugin]
    if not impls:
        return None
    return impls[0].function()


def _import_path(path: Path) -> ModuleType:
    """Import a plugin file or package folder under a private module name."""
    module_name = f"ldmgraph_plugin_dir_{abs(hash(str(path.resolve())))}_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    location = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(
        module_name, location, submodule_search_locations=[str(path)] if path.is_dir() else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_registry(plugin_dirs: Iterable[str | os.PathLike[str]] = ()) -> Registry:
    """Convenience: a registry with the built-ins, entry-point plugins and the given plugin folders."""
    return PluginManager(plugin_dirs=plugin_dirs).registry
