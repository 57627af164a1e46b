"""Fixtures for the framework tests: a registry with the built-in image/primitive nodes and the
tiny test nodes, and an executor writing into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from graph_helpers import make_registry

from ldmgraph.graph import Environment, Registry
from ldmgraph.graph.executor import Executor


@pytest.fixture(scope="session")
def registry() -> Registry:
    return make_registry()


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    (tmp_path / "input").mkdir()
    return Environment(input_dir=tmp_path / "input", output_dir=tmp_path / "output")


@pytest.fixture
def executor(registry: Registry, env: Environment) -> Executor:
    return Executor(registry, env)
