"""ldmgraph's framework layer: socket types, the node contract, workflows, validation, execution.

Knows nothing of torch; see docs/INTERFACES.md for the contracts other layers code against.
"""

from . import codes, files, sockets
from .context import CancelToken, Environment, NodeContext
from .errors import (
    Cancelled,
    ExecutionError,
    LdmGraphError,
    PluginError,
    Problem,
    UnsafePathError,
    ValidationError,
)
from .node import InputField, InputSpec, Node, NodeInputs, NodeOutputs, NodeSpec, OutputField, OutputSpec
from .registry import PluginStatus, Registry
from .workflow import FORMAT, Link, Workflow, parse_workflow, workflow_json_schema

__all__ = [
    "FORMAT",
    "CancelToken",
    "Cancelled",
    "Environment",
    "ExecutionError",
    "InputField",
    "InputSpec",
    "LdmGraphError",
    "Link",
    "Node",
    "NodeContext",
    "NodeInputs",
    "NodeOutputs",
    "NodeSpec",
    "OutputField",
    "OutputSpec",
    "PluginError",
    "PluginStatus",
    "Problem",
    "Registry",
    "UnsafePathError",
    "ValidationError",
    "Workflow",
    "codes",
    "files",
    "parse_workflow",
    "sockets",
    "workflow_json_schema",
]
