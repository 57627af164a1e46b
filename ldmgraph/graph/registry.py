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

TABLES = ("samplers", "schedules", "conditioners")


@dataclass
class PluginStatus:
    """One plugin as ``ldmgraph plugins`` shows it: where it came from, whether it loaded, and why not."""

    name: str
    source: str  # "builtin" | "entry-point" | "plugin-dir"
    ok: bool
    error: str | None = None
    nodes: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    conditioners: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``ldmgraph plugins --json``."""
        return dict(self.__dict__)


class Registry:
    """Node types by name, and the named callables (samplers, schedules, conditioners)."""

    def __init__(self) -> None:
        self.nodes: dict[str, type[Node]] = {}
        self.samplers: dict[str, Callable[..., Any] | str] = {}
        self.schedules: dict[str, Callable[..., Any] | str] = {}
        self.conditioners: dict[str, Callable[..., Any] | str] = {}
        self.plugins: list[PluginStatus] = []
        self.version = 0  # bumped on every change, so caches of validation results can tell
        self._owners: dict[tuple[str, str], str] = {}

    def snapshot(self) -> tuple[dict[Any, Any], ...]:
        """Copies of the tables, so that a plugin failing halfway can be rolled back."""
        return (dict(self.nodes), dict(self.samplers), dict(self.schedules), dict(self.conditioners),
                dict(self._owners))

    def restore(self, snapshot: tuple[dict[Any, Any], ...]) -> None:
        """Undo every registration made since ``snapshot``."""
        nodes, samplers, schedules, conditioners, owners = (dict(t) for t in snapshot)
        self.nodes, self.samplers, self.schedules, self.conditioners = nodes, samplers, schedules, conditioners
        self._owners = owners
        self.version += 1

    def add_node(self, cls: type[Node], owner: str) -> None:
        """Register a node type; a name registered by two plugins is an error naming both."""
        if not (isinstance(cls, type) and issubclass(cls, Node) and getattr(cls, "spec", None)):
            raise PluginError(f"plugin {owner!r} registered {cls!r}, which is not a Node subclass with a type_name")
        self._claim("node type", cls.type_name, owner, same=self.nodes.get(cls.type_name) is cls)
        self.nodes[cls.type_name] = cls
        self.version += 1

    def add_callable(self, table: str, name: str, value: Callable[..., Any] | str, owner: str) -> None:
        """Register a sampler / schedule / conditioner (a callable or a ``"module:attr"`` string)."""
        if table not in TABLES:
            raise ValueError(f"unknown registry table {table!r}")
        if not isinstance(name, str) or not (callable(value) or (isinstance(value, str) and ":" in value)):
            raise PluginError(f"plugin {owner!r}: {table} entry {name!r} must be a callable or 'module:attr'")
        entries: dict[str, Any] = getattr(self, table)
        self._claim(table[:-1], name, owner, same=entries.get(name) == value)
        entries[name] = value
        self.version += 1

    def _claim(self, kind: str, name: str, owner: str, same: bool) -> None:
        previous = self._owners.get((kind, name))
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
        return list(getattr(self, table))

    def resolve(self, table: str, name: str) -> Callable[..., Any]:
        """The callable registered as ``name``, importing a lazy ``"module:attr"`` on first use."""
        entries: dict[str, Any] = getattr(self, table)
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
