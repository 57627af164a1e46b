"""The registry of node types, samplers, schedules and conditioners that one plugin manager built.

It is plain data (no globals): :class:`ldmgraph.plugins.PluginManager` fills one, the executor and
validation read it. Samplers, schedules and conditioners may be callables or lazy ``"module:attr"``
strings, imported on first use so that listing and validating never import torch.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import LdmGraphError, PluginError
from .node import Node

# One table per plugin hook: the hook ``ldmgraph_<table>`` fills the table ``<table>``.
HOOK_TABLES = ("nodes", "samplers", "schedules", "conditioners")
TABLES = HOOK_TABLES[1:]  # the named-callable tables (nodes are classes, with their own checks)
KINDS = {"nodes": "node type", "samplers": "sampler", "schedules": "schedule", "conditioners": "conditioner"}


@dataclass
class PluginStatus:
    """One plugin as ``ldmgraph plugins`` shows it: where it came from, whether it loaded, and why not,
    what it registered in each table, and how long its import and registration took."""

    name: str
    source: str  # "builtin" | "entry-point" | "plugin-dir" | "api"
    ok: bool
    error: str | None = None
    nodes: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    conditioners: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def entries(self, table: str) -> list[str]:
        """The names this plugin registered in ``table``."""
        return getattr(self, table)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``ldmgraph plugins --json``."""
        return dict(self.__dict__)


class Registry:
    """One table per hook (node types by name; samplers, schedules, conditioners by name), plus
    which plugin owns each entry and which plugins are built in."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {table: {} for table in HOOK_TABLES}
        self.plugins: list[PluginStatus] = []
        self.builtins: set[str] = set()  # owners that are ldmgraph's own modules
        self.version = 0  # bumped on every change, so caches of validation results can tell
        self._owners: dict[tuple[str, str], str] = {}

    @property
    def nodes(self) -> dict[str, type[Node]]:
        return self.tables["nodes"]

    @property
    def samplers(self) -> dict[str, Callable[..., Any] | str]:
        return self.tables["samplers"]

    @property
    def schedules(self) -> dict[str, Callable[..., Any] | str]:
        return self.tables["schedules"]

    @property
    def conditioners(self) -> dict[str, Any]:
        return self.tables["conditioners"]

    def snapshot(self) -> tuple[dict[Any, Any], ...]:
        """Copies of the tables, so that a plugin failing halfway can be rolled back."""
        return (*(dict(self.tables[t]) for t in HOOK_TABLES), dict(self._owners))

    def restore(self, snapshot: tuple[dict[Any, Any], ...]) -> None:
        """Undo every registration made since ``snapshot``."""
        *tables, owners = (dict(t) for t in snapshot)
        self.tables = dict(zip(HOOK_TABLES, tables, strict=True))
        self._owners = owners
        self.version += 1

    def add_node(self, cls: type[Node], owner: str) -> None:
        """Register a node type; a name registered by two plugins is an error naming both."""
        if not (isinstance(cls, type) and issubclass(cls, Node) and getattr(cls, "spec", None)):
            raise PluginError(f"plugin {owner!r} registered {cls!r}, which is not a Node subclass with a type_name")
        self._claim(KINDS["nodes"], cls.type_name, owner, same=self.nodes.get(cls.type_name) is cls)
        self.nodes[cls.type_name] = cls
        self.version += 1

    def add_callable(self, table: str, name: str, value: Callable[..., Any] | str, owner: str) -> None:
        """Register a sampler / schedule / conditioner (a callable or a ``"module:attr"`` string)."""
        if table not in TABLES:
            raise ValueError(f"unknown registry table {table!r}")
        if not isinstance(name, str) or not (callable(value) or (isinstance(value, str) and ":" in value)):
            raise PluginError(f"plugin {owner!r}: {table} entry {name!r} must be a callable or 'module:attr'")
        entries = self.tables[table]
        self._claim(KINDS[table], name, owner, same=entries.get(name) == value)
        entries[name] = value
        self.version += 1

    def _claim(self, kind: str, name: str, owner: str, same: bool) -> None:
        previous = self._owners.get((kind, name))
        if previous is not None and previous != owner and previous in self.builtins:
            raise PluginError(
                f"{kind} {name!r} is built into ldmgraph ({previous}); plugin {owner!r} cannot register "
                "it again: give the plugin's one another name"
            )
        if previous is not None and previous != owner and not same:
            raise PluginError(
                f"{kind} {name!r} is registered by two plugins: {previous!r} and {owner!r}; "
                "uninstall or rename one of them"
            )
        self._owners[(kind, name)] = owner

    def owner(self, kind: str, name: str) -> str | None:
        """Which plugin registered ``name`` (kind: "node type", "sampler", "schedule", "conditioner")."""
        return self._owners.get((kind, name))

    def choices(self, table: str) -> list[str]:
        """Names in a table, for enumeration inputs declared with ``choices_from``."""
        if table == "nodes":
            return sorted(self.nodes)
        if table not in TABLES:
            raise ValueError(f"unknown registry table {table!r}; use one of {', '.join(TABLES)}")
        return list(self.tables[table])

    def resolve(self, table: str, name: str) -> Callable[..., Any]:
        """The callable registered as ``name``, importing a lazy ``"module:attr"`` on first use."""
        entries = self.tables[table]
        if name not in entries:
            close = difflib.get_close_matches(name, list(entries), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise LdmGraphError(f"no {table[:-1]} named {name!r} is registered{hint}")
        value = entries[name]
        if isinstance(value, str):
            module_name, _, attr = value.partition(":")
            try:
                value = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise LdmGraphError(f"{table[:-1]} {name!r}: cannot import {entries[name]!r}: {exc}") from exc
            entries[name] = value
        return value  # type: ignore[no-any-return]

    def node(self, type_name: str) -> type[Node] | None:
        """The node class registered as ``type_name``, or None."""
        return self.nodes.get(type_name)

    def closest_node_types(self, type_name: str, n: int = 3) -> list[str]:
        """Known node type names closest to a misspelt one (case-insensitive)."""
        lowered = {name.lower(): name for name in self.nodes}
        matches = difflib.get_close_matches(type_name.lower(), list(lowered), n=n, cutoff=0.5)
        return [lowered[m] for m in matches]
