"""``--set NAME=VALUE`` as a person types it, turned into what validation checks.

- ``NAME`` is a declared parameter, or ``NODE.INPUT``: any literal input of any node (also in an
  imported ComfyUI graph, whose node ids are ComfyUI's: ``--set 3.steps=30``). A node or input that
  does not exist is refused with the closest names ("did you mean").
- ``VALUE`` is read as JSON when it parses, else as text; but a text input (STRING, or a choice
  among names) takes the text as typed, so ``--set prompt=42`` is the prompt "42" and
  ``--set prompt=true`` the word "true".
- A file named on the command line may be anywhere: the command line is the user's own. An input
  image (``LoadImage.image``, ...) outside the input folder is copied into the run's private
  folder of carried inputs (searched before the input folder, removed afterwards, and embedded in
  the saved PNG like any input); a model file outside the model folders adds its folder to this
  run's model folders. Workflow files and HTTP requests get none of this: their names stay
  confined to their folders.

Torch-free; used by ``ldmgraph run`` and ``ldmgraph validate``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .graph import codes
from .graph.context import Environment
from .graph.errors import Problem, ValidationError

TEXT_SOCKETS = ("STRING", "ENUM")
MODEL_NODE_SUFFIX = "Loader"  # CheckpointLoader, VAELoader, ControlNetLoader, TextEncoderLoader, LoraLoader...


@dataclass
class Override:
    """One ``--set``: the name as typed, the text after ``=``, and its JSON reading (else the text)."""

    name: str
    text: str
    value: Any


def read_overrides(items: Sequence[str]) -> list[Override]:
    """``["steps=20", "prompt=a cat"]`` -> overrides, the value read as JSON when it parses."""
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.append(Override(name, text, value))
    return out


def closest(word: str, names: Sequence[str]) -> str:
    """`` (did you mean 'steps'?)`` for a misspelt name, or ``""``."""
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


@contextmanager
def applied_overrides(document: Any, items: Sequence[str], registry: Any,
                      env: Environment) -> Iterator[tuple[Any, dict[str, Any], Environment]]:
    """The document with ``NODE.INPUT`` overrides written in, the declared parameters' overrides, and
    the environment (with the user's own files reachable); a private folder made for copied inputs
    is removed on exit."""
    made: list[Path] = []
    try:
        yield _apply(document, read_overrides(items), registry, env, made)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def _apply(document: Any, overrides: list[Override], registry: Any, env: Environment,
           made: list[Path]) -> tuple[Any, dict[str, Any], Environment]:
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), dict):
        return document, {o.name: o.value for o in overrides}, env  # validation reports the document
    document = copy.deepcopy(document)
    nodes, declared = document["nodes"], document.get("parameters") or {}
    params: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in overrides:
        if item.name in declared or "." not in item.name:
            targets = [(t.get("node"), t.get("input")) for t in (declared.get(item.name) or {}).get("targets", [])
                       if isinstance(t, dict)]
            value, env = _typed(item, targets, nodes, registry, env, made)
            params[item.name] = value
            continue
        node_id, _, input_name = item.name.rpartition(".")
        problem = _node_input_problem(item, node_id, input_name, nodes, registry)
        if problem is not None:
            problems.append(problem)
            continue
        value, env = _typed(item, [(node_id, input_name)], nodes, registry, env, made)
        nodes[node_id] = {**nodes[node_id], "inputs": {**(nodes[node_id].get("inputs") or {}), input_name: value}}
    if problems:
        raise ValidationError(problems)
    return document, params, env


def _node_input_problem(item: Override, node_id: str, input_name: str, nodes: dict[str, Any],
                        registry: Any) -> Problem | None:
    """Why ``--set NODE.INPUT=...`` cannot apply, or None."""
    entry = nodes.get(node_id)
    if not isinstance(entry, dict):
        return Problem(None, None, codes.BAD_PARAMETER,
                       f"--set {item.name}=...: the workflow has no node {node_id!r}{closest(node_id, list(nodes))} "
                       f"and declares no parameter {item.name!r}; node ids: {', '.join(nodes)}")
    cls = registry.node(entry.get("type")) if isinstance(entry.get("type"), str) else None
    if cls is None:
        return None  # validation reports the unknown node type
    if input_name not in cls.spec.inputs:
        return Problem(node_id, input_name, codes.UNKNOWN_INPUT,
                       f"--set {item.name}=...: {cls.spec.type_name} has no input {input_name!r}"
                       f"{closest(input_name, list(cls.spec.inputs))}; its inputs are: {', '.join(cls.spec.inputs)}")
    current = (entry.get("inputs") or {}).get(input_name)
    if isinstance(current, dict) and "node" in current:
        return Problem(node_id, input_name, codes.BAD_PARAMETER,
                       f"--set {item.name}=...: input {input_name!r} of node {node_id!r} is linked from node "
                       f"{current['node']!r}; set that node's value instead")
    return None


def _typed(item: Override, targets: list[tuple[Any, Any]], nodes: dict[str, Any], registry: Any,
           env: Environment, made: list[Path]) -> tuple[Any, Environment]:
    """The override's value for its target inputs: text for text inputs, the user's files reachable."""
    value = item.value
    for node_id, input_name in targets:
        entry = nodes.get(node_id) if isinstance(node_id, str) else None
        cls = registry.node(entry.get("type")) if isinstance(entry, dict) and isinstance(entry.get("type"), str) else None
        spec = cls.spec.inputs.get(input_name) if cls is not None else None
        if spec is None:
            continue
        if spec.socket.name in TEXT_SOCKETS and not isinstance(value, str):
            value = item.text  # `--set prompt=42`: the prompt "42"
        if isinstance(value, str):
            value, env = _users_file(value, cls, input_name, env, made)
    return value, env


def _users_file(value: str, cls: Any, input_name: str, env: Environment, made: list[Path]) -> tuple[str, Environment]:
    """A path the user typed to an existing file outside the folders: reachable for this run only."""
    is_input_file = input_name in getattr(cls, "input_file_inputs", ())
    is_model = cls.spec.type_name.endswith(MODEL_NODE_SUFFIX)
    if not (is_input_file or is_model) or not _looks_like_a_path(value):
        return value, env
    if is_input_file and not os.path.isabs(value) and (Path(env.input_dir) / value).exists():
        return value, env  # a name in the input folder, as in a workflow file
    path = Path(value).expanduser()
    if is_input_file and path.is_file() and _inside(path, env.input_dir):
        return path.resolve().relative_to(Path(env.input_dir).resolve()).as_posix(), env
    if is_input_file and path.is_file():
        folder = env.carried_inputs
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="ldmgraph-cli-inputs-"))
            made.append(folder)
            env = replace(env, carried_inputs=folder)
        digest = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:12]
        name = f"{digest}-{path.name}"
        shutil.copyfile(path, folder / name)
        return name, env
    if is_model and (path.is_file() or (path / "model_index.json").is_file()):
        if not any(_inside(path, folder) for folder in env.model_dirs):
            env = replace(env, model_dirs=(path.resolve().parent, *env.model_dirs))
            return path.name, env
        for folder in env.model_dirs:
            if _inside(path, folder):
                return path.resolve().relative_to(Path(folder).resolve()).as_posix(), env
    return value, env


def _looks_like_a_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", "./", "../")) or (os.sep in value and Path(value).exists())


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(Path(folder).resolve())
    except (ValueError, OSError):
        return False
    return True
