"""Plugins: pluggy hook specifications and the plugin manager that fills a :class:`Registry`.

Built-in nodes, samplers, schedules and conditioners register through the same hooks as
third-party plugins. Sources, in order: the built-in modules in :data:`BUILTIN_PLUGIN_MODULES`
(a missing one is skipped silently, so layers can be added before their code lands), the
entry-point group ``ldmgraph``, then an optional plugin folder (``--plugin-dir`` or the
environment variable ``LDMGRAPH_PLUGIN_DIR``: each ``*.py`` file or package folder in it is one
plugin). A plugin that fails to import or register is recorded with its error and the rest still
load. Two plugins registering the same name is an error that names both.

Writing a plugin::

    from ldmgraph.plugins import hookimpl

    @hookimpl
    def ldmgraph_nodes():
        return [MyNode]

    @hookimpl
    def ldmgraph_samplers():
        return {"my_sampler": "my_package.sampling:sample_my"}   # lazy: imported on first use
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from .graph.errors import PluginError
from .graph.node import Node
from .graph.registry import PluginStatus, Registry

PROJECT = "ldmgraph"
ENTRY_POINT_GROUP = "ldmgraph"
PLUGIN_DIR_ENV = "LDMGRAPH_PLUGIN_DIR"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Built-in plugin modules, registered by dotted name. Append yours; missing modules are skipped.
BUILTIN_PLUGIN_MODULES: list[str] = [
    "ldmgraph.nodes.image",
    "ldmgraph.nodes.primitives",
    "ldmgraph.diffusion.registry",
    "ldmgraph.nodes.loaders",
    "ldmgraph.nodes.conditioning",
    "ldmgraph.nodes.latent",
    "ldmgraph.nodes.sampling",
    "ldmgraph.nodes.image_ops",
    "ldmgraph.nodes.paper",
]


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
    def ldmgraph_conditioners(self) -> dict[str, Callable[..., Any] | str]:  # type: ignore[empty-body]
        """Text/image conditioners by name."""

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
    ) -> None:
        self.registry = Registry()
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(HookSpecs)
        for name in BUILTIN_PLUGIN_MODULES if builtins is None else builtins:
            self._load_builtin(name)
        if entry_points_group:
            self._load_entry_points(entry_points_group)
        dirs = [Path(d) for d in plugin_dirs]
        if use_env and os.environ.get(PLUGIN_DIR_ENV):
            dirs += [Path(p) for p in os.environ[PLUGIN_DIR_ENV].split(os.pathsep) if p]
        for folder in dirs:
            self._load_folder(folder)

    @property
    def statuses(self) -> list[PluginStatus]:
        """Every plugin seen, with whether it loaded and the error if not."""
        return self.registry.plugins

    def register(self, plugin: object, name: str, source: str = "api") -> PluginStatus:
        """Register an already-imported plugin object (module or instance with hook functions)."""
        status = PluginStatus(name=name, source=source, ok=True)
        self.registry.plugins.append(status)
        snapshot = self.registry.snapshot()
        try:
            self._pm.register(plugin, name=name)
            self._collect(plugin, status)
            self._derive()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
            self.registry.restore(snapshot)  # all or nothing: no half-registered plugin
            status.nodes.clear()
            for table in ("samplers", "schedules", "conditioners"):
                getattr(status, table).clear()
            self._fail(status, exc)
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
        return status

    # -- sources --------------------------------------------------------------------------------
    def _load_builtin(self, dotted: str) -> None:
        try:
            if importlib.util.find_spec(dotted) is None:
                return
        except (ImportError, ValueError):
            return  # the parent package does not exist yet
        self._import_and_register(dotted, "builtin", lambda: importlib.import_module(dotted))

    def _load_entry_points(self, group: str) -> None:
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            self._import_and_register(f"{ep.name} ({ep.value})", "entry-point", ep.load)

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

    def _import_and_register(self, name: str, source: str, load: Callable[[], Any]) -> None:
        try:
            plugin = load()
        except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt-free plugins only
            if isinstance(exc, KeyboardInterrupt):
                raise
            status = PluginStatus(name=name, source=source, ok=False)
            self._fail(status, exc)
            self.registry.plugins.append(status)
            return
        self.register(plugin, name, source)

    # -- collection ------------------------------------------------------------------------------
    def _collect(self, plugin: object, status: PluginStatus) -> None:
        """Call this plugin's hooks only, so one plugin's failure is attributed to it alone."""
        hooks = self._pm.hook
        nodes = _call_one(hooks.ldmgraph_nodes, plugin)
        tables = {t: _call_one(getattr(hooks, f"ldmgraph_{t}"), plugin) for t in ("samplers", "schedules",
                                                                                   "conditioners")}
        for cls in list(nodes or []):
            self.registry.add_node(cls, status.name)
            status.nodes.append(cls.type_name)
        for table, entries in tables.items():
            if entries is None:
                continue
            if not isinstance(entries, dict):
                raise PluginError(f"hook ldmgraph_{table} must return a dict, got {type(entries).__name__}")
            for key, value in entries.items():
                self.registry.add_callable(table, key, value, status.name)
                getattr(status, table).append(key)

    def _derive(self) -> None:
        """Add the derived nodes that the registry's current contents call for."""
        for impl in self._pm.hook.ldmgraph_derived_nodes.get_hookimpls():
            for cls in impl.function(registry=self.registry) or []:
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
