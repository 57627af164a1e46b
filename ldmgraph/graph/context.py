"""What a running node may touch: progress, cancellation, folders, the registry, shared resources.

No globals: everything a node needs beyond its inputs comes through its :class:`NodeContext`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import Cancelled

if TYPE_CHECKING:
    from .registry import Registry

T = TypeVar("T")


@dataclass(frozen=True)
class Environment:
    """The folders and device of a run; shared by validation (file checks) and execution.

    Defaults chosen by the CLI: ``input_dir`` = ``inputs/`` beside the workflow file if it exists,
    else ``./input``; ``output_dir`` = ``./output``; ``model_dirs`` = ``./models`` then the bundled
    ``ldmgraph/assets/models``; ``device`` None lets the model layer choose.
    """

    input_dir: Path = field(default_factory=lambda: Path("input"))
    output_dir: Path = field(default_factory=lambda: Path("output"))
    model_dirs: tuple[Path, ...] = ()
    device: str | None = None
    memory_budget: int | None = None  # bytes a run may allocate; None: the machine's available memory, 0: no limit
    disk_budget: int | None = None  # bytes a run may write; None: DEFAULT_DISK_BUDGET (1 GiB), 0: no limit
    max_image_pixels: int = 64_000_000  # largest input image (width x height) decoded, checked from its header
    carried_inputs: Path | None = None  # input files carried by a PNG being re-run, searched before input_dir
    temp_dir: Path | None = None  # where previews (PreviewImage) go; None: a private temporary folder
    png_text: tuple[tuple[str, str], ...] = ()  # extra PNG text chunks for saved images (ComfyUI's prompt, workflow)


class CancelToken:
    """A thread-safe flag: a front end calls :meth:`cancel`, the run stops at the next check."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the run to stop (between nodes, or at the next ``ctx.check_cancelled()``)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("the run was cancelled")


class RunState:
    """Per-run mutable state shared by the contexts of one run (files written, drawn values)."""

    __slots__ = ("workflow", "parameters", "files", "resolved_inputs")

    def __init__(self, workflow: dict[str, Any] | None, parameters: dict[str, Any]) -> None:
        self.workflow = workflow
        self.parameters = parameters
        self.files: list[Path] = []
        self.resolved_inputs: dict[str, dict[str, Any]] = {}

    def document(self) -> dict[str, Any]:
        """The resolved workflow document (built on first use by subclasses)."""
        if self.workflow is None:
            self.workflow = {}
        return self.workflow


class NodeContext:
    """Handed to ``Node.run``: everything a node may use besides its inputs."""

    __slots__ = ("node_id", "node_type", "env", "registry", "_resources", "_token", "_progress", "_run",
                 "files", "_preview_every")

    def __init__(
        self,
        node_id: str,
        node_type: str,
        env: Environment,
        registry: Registry | None,
        resources: dict[Any, Any],
        token: CancelToken,
        progress: Callable[[str, int, int, Any], None] | None,
        run: RunState,
        preview_every: int = 0,
    ) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.env = env
        self.registry = registry
        self._resources = resources
        self._token = token
        self._progress = progress
        self._run = run
        self.files: list[Path] = []
        self._preview_every = preview_every if progress is not None else 0

    # -- folders and device -------------------------------------------------------------------
    @property
    def input_dir(self) -> Path:
        """Folder that file-name inputs (LoadImage) are resolved in (never escaped)."""
        return self.env.input_dir

    @property
    def output_dir(self) -> Path:
        """Folder that output nodes write into."""
        return self.env.output_dir

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """Folders searched for checkpoints, in order."""
        return self.env.model_dirs

    @property
    def device(self) -> str | None:
        """Device override from the caller (``--device``), or None for the default."""
        return self.env.device

    # -- the run ------------------------------------------------------------------------------
    @property
    def workflow(self) -> dict[str, Any]:
        """The resolved workflow document (parameter values applied), for metadata."""
        return self._run.document()

    @property
    def parameters(self) -> dict[str, Any]:
        """The resolved parameter values (overrides and values drawn at run time), for metadata."""
        return self._run.parameters

    def progress(self, k: int, n: int, preview: Any = None) -> None:
        """Report progress k of n inside a long node (also a cancellation point).

        ``preview`` (an RGB ``uint8`` array ``[h, w, 3]``) travels in the progress event; draw one
        only when :meth:`wants_preview` says a consumer will use it.
        """
        self._token.check()
        if self._progress is not None:
            self._progress(self.node_id, k, n, preview)

    def wants_preview(self, k: int, n: int) -> bool:
        """Whether step k of n should carry a preview: the run was asked for previews every N steps
        and k is a multiple of N, or the last step. False (and nothing to compute) otherwise."""
        every = self._preview_every
        return every > 0 and (k >= n or k % every == 0)

    def check_cancelled(self) -> None:
        """Raise :class:`~ldmgraph.graph.errors.Cancelled` if the run was cancelled."""
        self._token.check()

    def resource(self, key: Any, factory: Callable[[], T]) -> T:
        """One shared object per executor session (e.g. the model cache), created on first use."""
        try:
            return self._resources[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._resources[key] = factory()
            return value

    def add_file(self, path: Path) -> None:
        """Record a file this node wrote; the run's result (and the CLI) list it."""
        self.files.append(Path(path))
        self._run.files.append(Path(path))

    def record_value(self, name: str, value: Any, *, inputs: dict[str, Any] | None = None) -> None:
        """Record a value drawn at run time (a random seed) so outputs can embed it.

        ``name`` goes into ``parameters``; ``inputs`` replaces this node's inputs in the resolved
        workflow, so the embedded workflow reproduces the result when run again.
        """
        self._run.parameters[name] = value
        if inputs:
            node = self._run.document().get("nodes", {}).get(self.node_id)
            if isinstance(node, dict):
                node.setdefault("inputs", {}).update(inputs)
            self._run.resolved_inputs.setdefault(self.node_id, {}).update(inputs)
