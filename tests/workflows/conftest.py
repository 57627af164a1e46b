"""Fixtures for the saved-workflow tests: a model folder and an executor on the repository's workflows.

The bundled models (ldmgraph/assets/models) are used when present; each one that is missing is
replaced, under the same name, by a tiny random model in the bundled format (tests/nodes), so the
saved workflows run unchanged either way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))

from ldmgraph_tiny_models import BUNDLED_NAMES, write_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
BUNDLED = REPO / "ldmgraph" / "assets" / "models"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding a tiny stand-in for every bundled model that is not shipped yet."""
    folder = tmp_path_factory.mktemp("models")
    for kind, name in BUNDLED_NAMES.items():
        if not (BUNDLED / name).is_file():
            write_tiny_checkpoint(folder / name, kind)
    return folder


@pytest.fixture(scope="session")
def registry():
    from ldmgraph.plugins import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def model_cache():
    """One model cache for the whole session, so each checkpoint is read once (2 shared CPU cores)."""
    from ldmgraph.models.cache import ModelCache

    return ModelCache()


@pytest.fixture
def make_executor(registry, models_dir: Path, model_cache, tmp_path: Path):
    """Build an executor on the workflows' input folder, writing into a fresh output folder.

    Each executor has its own output cache (so node events start from scratch) but shares the
    session's model cache (`fresh_models=True` gives it an empty one of its own).
    """
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.nodes.common import MODEL_CACHE_KEY

    def make(
        input_dir: Path = WORKFLOWS / "inputs", output_dir: Path | None = None, fresh_models: bool = False
    ) -> Executor:
        env = Environment(
            input_dir=input_dir, output_dir=output_dir or tmp_path / "out", model_dirs=(models_dir, BUNDLED)
        )
        executor = Executor(registry, env)
        if not fresh_models:
            executor.resources[MODEL_CACHE_KEY] = model_cache
        return executor

    return make


@pytest.fixture
def one_thread():
    """CPU results depend on torch's thread count (sums split by thread): the run in this process and
    the re-run in a fresh one both use one thread, whatever earlier tests left behind."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
