"""ComfyUI's data shapes, built from ldmgraph's own: prompts in, node errors and the node catalogue out.

What ComfyUI 0.3.x sends and expects (its ``server.py`` and ``execution.py``), restated:

* a prompt in the "API format" is ``{node_id: {"class_type", "inputs"}}`` where a link is
  ``[source_id, output_index]`` and a literal list is wrapped as ``{"__value__": [...]}``;
* a rejected prompt is answered 400 with ``{"error": {type, message, details, extra_info},
  "node_errors": {node_id: {"errors": [{type, message, details, extra_info}],
  "dependent_outputs": [...], "class_type"}}}``;
* ``/object_info`` describes each node as ``input`` (``required`` / ``optional`` / ``hidden``, each
  input a ``[TYPE]`` or ``[TYPE, options]`` list, ``[[choices], options]`` for a list widget),
  ``input_order``, ``output``, ``output_is_list``, ``output_name``, ``name``, ``display_name``,
  ``description``, ``python_module``, ``category`` and ``output_node``.

The catalogue holds two kinds of node. ComfyUI's classes that the importer maps are served under
their ComfyUI names, in ComfyUI's exact shape, from the same table the importer reads
(``ldmgraph.interop.comfyui_nodes``); a graph of them is queued through the importer. ldmgraph's
own node types are served in their own shape; one whose name is also a ComfyUI class there (such
as ``VAEDecode``, whose input is ``latent`` here and ``samples`` in ComfyUI) is served as
``ldmgraph.VAEDecode``, a name the server reads back as the native type.
"""

from __future__ import annotations

import json
from typing import Any

from ldmgraph.graph import codes
from ldmgraph.graph.errors import Problem, ValidationError
from ldmgraph.graph.loading import convert_comfyui
from ldmgraph.graph.node import InputSpec, Node
from ldmgraph.graph.registry import Registry
from ldmgraph.graph.workflow import FORMAT
from ldmgraph.interop.comfyui import api_to_workflow
from ldmgraph.interop.comfyui_nodes import (
    COMFYUI_NODES,
    PASS_THROUGH_SHAPES,
    SEED_INPUTS,
    ComfyInput,
    ComfyShape,
    Files,
    NodeMapping,
    native_mapping,
    native_name,
    served_name,
    taken_names,
)
from ldmgraph.interop.comfyui_nodes import editor_required as _is_required

CATEGORY_ROOT = "ldmgraph"
# Inputs that name a file: shown in the editor as a list of what the server has (ComfyUI's combos).
FILE_INPUTS: dict[tuple[str, str], str] = {
    ("LoadImage", "image"): "input",
    ("LoadMask", "image"): "input",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("VAELoader", "vae_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "checkpoints",
}
MULTILINE_INPUTS = {"text", "prompt"}
COMFY_CLASSES: dict[str, ComfyShape] = {
    **PASS_THROUGH_SHAPES,
    **{name: m.shape for name, m in COMFYUI_NODES.items() if m.shape is not None},
}
"""Every ComfyUI class the server describes and the importer accepts, with its shape."""


# -- prompts in -------------------------------------------------------------------------------------
def to_document(prompt: Any, registry: Registry) -> tuple[dict[str, Any], str]:
    """Turn a submitted ``prompt`` into an ``ldmgraph/1`` document; returns it and its kind.

    Accepted: an ``ldmgraph/1`` document; an API-format graph of ldmgraph's own node types (what
    the editor sends, since its node library is ours); an API-format or UI-format graph of
    ComfyUI's core nodes (through the importer). Raises ``ValidationError``.
    """
    if not isinstance(prompt, dict) or not prompt:
        raise _bad("'prompt' must be a non-empty JSON object: a graph {node_id: {class_type, inputs}} "
                   f"or an {FORMAT} document")
    if prompt.get("format") == FORMAT:
        return prompt, "ldmgraph"
    api_shaped = all(isinstance(v, dict) and "class_type" in v for v in prompt.values())
    if api_shaped and not _is_comfyui(prompt) and _is_native(prompt, registry):
        return native_to_document(prompt, registry), "ldmgraph-api"
    if api_shaped:
        return _mixed_to_document(prompt, registry), "comfyui"
    if isinstance(prompt.get("nodes"), list) and "links" in prompt:
        return convert_comfyui(prompt, "prompt"), "comfyui"
    raise _bad("'prompt' is neither an API-format graph ({node_id: {class_type, inputs}}) nor an "
               f"{FORMAT} document")


def _mixed_to_document(prompt: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """A graph of ComfyUI's classes, maybe with ldmgraph's own node types among them (the editor lists
    both), through the importer: ComfyUI names mean ComfyUI's classes, the others map to themselves."""
    classes: dict[str, NodeMapping] = {}
    for node in prompt.values():
        kind = str(node.get("class_type"))
        cls = registry.node(native_name(kind)) if kind not in COMFY_CLASSES else None
        if cls is not None:
            classes[kind] = native_mapping(cls.spec)
    try:
        return api_to_workflow(prompt, {**classes, **COMFYUI_NODES})
    except ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed graph is a 400, never a 500
        raise _bad(f"prompt: cannot convert the ComfyUI graph: {type(exc).__name__}: {exc}") from exc


def _is_comfyui(prompt: dict[str, Any]) -> bool:
    """True when every node is a served ComfyUI class with ComfyUI's input names: the catalogue
    describes those names as ComfyUI's nodes, so such a graph means what it means in ComfyUI."""
    for node in prompt.values():
        shape = COMFY_CLASSES.get(str(node.get("class_type")))
        inputs = node.get("inputs")
        if shape is None or not isinstance(inputs, dict):
            return False
        names = {i.name for i in shape.inputs} | {"upload"}
        if any(k not in names for k in inputs):
            return False
    return True


def _is_native(prompt: dict[str, Any], registry: Registry) -> bool:
    """True when every node is an ldmgraph type and every input name is one it declares."""
    for node in prompt.values():
        cls = registry.node(native_name(str(node.get("class_type"))))
        inputs = node.get("inputs")
        if cls is None or not isinstance(inputs, dict) or any(k not in cls.spec.inputs for k in inputs):
            return False
    return True


def native_to_document(prompt: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """An API-format graph of ldmgraph node types -> ``ldmgraph/1`` (links by output index -> name)."""
    nodes: dict[str, Any] = {}
    problems: list[Problem] = []
    for node_id, node in prompt.items():
        inputs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if _is_link(value):
                source = prompt.get(str(value[0]))
                source_cls = (registry.node(native_name(str(source.get("class_type"))))
                              if isinstance(source, dict) else None)
                names = list(source_cls.spec.outputs) if source_cls is not None else []
                if source_cls is None or not 0 <= value[1] < len(names):
                    problems.append(Problem(str(node_id), name, codes.DANGLING_LINK,
                                            f"link to output {value[1]} of node {value[0]!r}, which does not exist"))
                    continue
                inputs[name] = {"node": str(value[0]), "output": names[value[1]]}
            elif isinstance(value, dict) and set(value) == {"__value__"}:
                inputs[name] = value["__value__"]
            else:
                inputs[name] = value
        entry: dict[str, Any] = {"type": native_name(node["class_type"]), "inputs": inputs}
        title = (node.get("_meta") or {}).get("title") if isinstance(node.get("_meta"), dict) else None
        if isinstance(title, str) and title:
            entry["title"] = title
        nodes[str(node_id)] = entry
    if problems:
        raise ValidationError(problems)
    return {"format": FORMAT, "nodes": nodes}


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int)
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def plain_json(value: Any) -> bool:
    """True when ``value`` is strict JSON: no NaN or Infinity (Python's parser accepts them, JSON does not)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def _bad(message: str) -> ValidationError:
    return ValidationError([Problem(None, None, codes.BAD_DOCUMENT, message)])


# -- errors out -------------------------------------------------------------------------------------
def error_body(error: ValidationError, prompt: Any) -> dict[str, Any]:
    """ComfyUI's 400 body for a rejected prompt: a summary plus ``node_errors`` by node id."""
    node_errors: dict[str, Any] = {}
    general: list[Problem] = []
    types = class_types(prompt)
    for problem in error.problems:
        if problem.node_id is None:
            general.append(problem)
            continue
        class_type = types.get(problem.node_id)
        entry = node_errors.setdefault(problem.node_id, {"errors": [], "dependent_outputs": [],
                                                         "class_type": class_type})
        entry["errors"].append(_error_item(problem))
    if general:
        first = general[0]
        summary = {"type": first.code, "message": first.message,
                   "details": "; ".join(p.message for p in general[1:]), "extra_info": {}}
    else:
        summary = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                   "details": "; ".join(str(p) for p in error.problems[:20]), "extra_info": {}}
    return {"error": summary, "node_errors": node_errors}


def class_types(prompt: Any) -> dict[str, str]:
    """Node id -> type name in any accepted prompt shape (for error reports)."""
    if not isinstance(prompt, dict):
        return {}
    if isinstance(prompt.get("nodes"), dict):
        items = prompt["nodes"].items()
        return {str(k): str(v.get("type")) for k, v in items if isinstance(v, dict)}
    if isinstance(prompt.get("nodes"), list):
        return {str(n.get("id")): str(n.get("type")) for n in prompt["nodes"] if isinstance(n, dict)}
    return {str(k): str(v.get("class_type")) for k, v in prompt.items() if isinstance(v, dict)}


def _error_item(problem: Problem) -> dict[str, Any]:
    extra = {"input_name": problem.input} if problem.input is not None else {}
    return {"type": problem.code, "message": problem.message,
            "details": f"{problem.input}: {problem.message}" if problem.input else problem.message,
            "extra_info": extra}


def request_error(kind: str, message: str) -> dict[str, Any]:
    """ComfyUI's shape for a request that is wrong before any node is looked at."""
    return {"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}}


# -- the node catalogue -----------------------------------------------------------------------------
def object_info(registry: Registry, files: dict[str, list[str]]) -> dict[str, Any]:
    """The catalogue in ComfyUI's ``/object_info`` format: ldmgraph's node types and the ComfyUI
    classes the importer maps; ``files`` lists the choices of file inputs by folder."""
    info = {served_name(name): node_info(cls, registry, files) for name, cls in registry.nodes.items()}
    for name, mapping in COMFYUI_NODES.items():
        if mapping.shape is not None and registry.node(mapping.our_type) is not None:
            info[name] = comfy_node_info(name, mapping.shape, mapping, registry, files)
    if registry.node("TextEncode") is not None:  # CLIPSetLastLayer folds into TextEncode's clip_skip
        for name, shape in PASS_THROUGH_SHAPES.items():
            info[name] = comfy_node_info(name, shape, None, registry, files)
    return dict(sorted(info.items()))


def comfy_node_info(name: str, shape: ComfyShape, mapping: NodeMapping | None, registry: Registry,
                    files: dict[str, list[str]]) -> dict[str, Any]:
    """One ComfyUI class as ComfyUI 0.3.64 describes it, its choices cut to what ldmgraph honours."""
    ours = registry.node(mapping.our_type) if mapping is not None else None
    inputs: dict[str, dict[str, Any]] = {"required": {}}
    for item in shape.inputs:
        section = inputs.setdefault("optional", {}) if item.optional else inputs["required"]
        section[item.name] = _comfy_input(item, mapping, ours, registry, files)
    if shape.hidden:
        inputs["hidden"] = dict(shape.hidden)
    count = len(shape.outputs)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {section: list(items) for section, items in inputs.items()},
        "output": list(shape.outputs),
        "output_is_list": [False] * count,
        "output_name": list(shape.output_names or shape.outputs),
        "name": name,
        "display_name": name if shape.display_name == "" else shape.display_name,
        "description": shape.description,
        "python_module": shape.python_module,
        "category": shape.category,
        "output_node": shape.output_node,
    }
    if shape.schema_v3:
        info.update(output_tooltips=[None] * count, deprecated=shape.deprecated, experimental=False,
                    api_node=False)
    elif shape.output_tooltips and ours is not None:
        listed = count if shape.output_tooltips is True else int(shape.output_tooltips)
        descriptions = [o.description for o in ours.spec.outputs.values()][:count]
        info["output_tooltips"] = (descriptions + [""] * listed)[:listed]
    if shape.deprecated:
        info["deprecated"] = True
    return info


def _comfy_input(item: ComfyInput, mapping: NodeMapping | None, ours: type[Node] | None, registry: Registry,
                 files: dict[str, list[str]]) -> list[Any]:
    kind: Any = item.type
    if isinstance(kind, Files):
        kind = list(files.get(kind.folder, files.get("checkpoints", [])))
    elif isinstance(kind, tuple):
        kind = _honoured_choices(item, mapping, ours, registry)
    return [kind] if item.options is None else [kind, dict(item.options)]


def _honoured_choices(item: ComfyInput, mapping: NodeMapping | None, ours: type[Node] | None,
                      registry: Registry) -> list[Any]:
    """ComfyUI's choices, less those ldmgraph would refuse or not honour (served lists never lie)."""
    values = list(item.type) if isinstance(item.type, tuple) else []
    if item.honoured is not None:
        return [v for v in values if v in item.honoured]
    our_name = mapping.inputs.get(item.name) if mapping is not None else None
    spec = ours.spec.inputs.get(our_name) if ours is not None and our_name is not None else None
    allowed = spec.allowed_choices(registry) if spec is not None else None
    if allowed is None:
        return values
    convert = mapping.convert.get(item.name, lambda v: v) if mapping is not None else (lambda v: v)
    return [v for v in values if convert(v) in allowed]


def node_info(cls: type[Node], registry: Registry, files: dict[str, list[str]]) -> dict[str, Any]:
    """One ldmgraph node type in ComfyUI's format (under :func:`served_name`)."""
    spec = cls.spec
    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    for name, item in spec.inputs.items():
        target = required if _is_required(item) else optional
        target[name] = _input_info(spec.type_name, item, registry, files)
    owner = registry.owner("node type", spec.type_name) or "ldmgraph"
    first_line = (spec.description.strip().splitlines() or [""])[0]
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [o.socket.name for o in spec.outputs.values()],
        "output_is_list": [False] * len(spec.outputs),
        "output_name": list(spec.outputs),
        "output_tooltips": [o.description for o in spec.outputs.values()],
        "name": served_name(spec.type_name),
        "display_name": spec.type_name if spec.type_name not in taken_names() else f"{spec.type_name} (ldmgraph)",
        "description": spec.description or first_line,
        "python_module": "nodes" if owner.startswith("ldmgraph") else f"custom_nodes.{owner}",
        "category": f"{CATEGORY_ROOT}/{spec.category}",
        "output_node": spec.output_node,
        "deprecated": False,
        "experimental": False,
    }


def _input_info(node_type: str, item: InputSpec, registry: Registry, files: dict[str, list[str]]) -> list[Any]:
    options: dict[str, Any] = {}
    if item.description:
        options["tooltip"] = item.description
    if item.default is not None:
        options["default"] = item.default
    file_kind = FILE_INPUTS.get((node_type, item.name))
    if file_kind is not None:
        if file_kind == "input":
            options["image_upload"] = True
        return [list(files.get(file_kind, [])), options]
    choices = item.allowed_choices(registry)
    if choices is not None:
        return [choices, options]
    socket = item.socket.name
    if socket in ("INT", "FLOAT"):
        low = item.ge if item.ge is not None else getattr(item.socket, "min_value", None)
        high = item.le if item.le is not None else getattr(item.socket, "max_value", None)
        if low is not None:
            options["min"] = low
        if high is not None:
            options["max"] = high
        step = item.multiple_of or (1 if socket == "INT" else 0.01)
        options["step"] = step
        if socket == "FLOAT":
            options["round"] = step
        if socket == "INT" and item.name in SEED_INPUTS:
            options["control_after_generate"] = True
    elif socket == "STRING" and item.name in MULTILINE_INPUTS:
        options["multiline"] = True
    return [socket, options]
