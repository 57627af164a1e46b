"""Memory estimates at validation: what each node will allocate, summed against a budget.

Nodes that allocate declare ``Node.estimate(inputs, env) -> Estimate``; a linked input receives
what the upstream node's estimate said about that output (a :class:`Shape` for images, masks and
latents; the model layer's summary for models), so sizes propagate through the graph: a
``RepeatLatentBatch`` of 64 after a batch of 8 makes a batch of 512 for every node below it.

The run's peak is taken as the sum of the values the nodes keep (outputs stay in the executor's
cache while the run lasts) plus the largest working memory of any one node. A workflow whose
estimate exceeds the budget is refused with ``over_budget``, naming the node that needs the most.
Nodes also return warnings here (a prompt outside a model's vocabulary): they do not stop a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import codes
from .errors import Problem

if TYPE_CHECKING:
    from .context import Environment
    from .validate import CompiledWorkflow

GIB = 2**30
FLOAT32 = 4


@dataclass(frozen=True)
class Shape:
    """The size of an image, mask or latent batch: IMAGE is [batch, height, width, channels],
    MASK [batch, height, width] (channels 1), LATENT [batch, channels, height, width]."""

    batch: int
    channels: int
    height: int
    width: int
    itemsize: int = FLOAT32
    source: str | None = field(default=None, compare=False)
    """The input file the array is decoded from unchanged (set by the file loaders), so a node whose
    valid range depends on the pixels (a segmentation map's class numbers) can check them before running."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self.batch * self.channels * self.height * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the array."""
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Estimate:
    """What a node allocates: ``keeps`` bytes of outputs (held while the run lasts) and ``works``
    bytes of temporary memory at its peak; ``outputs`` describes its outputs for the nodes
    downstream; ``warnings`` are ``(input name or None, message)`` pairs; ``what`` says in a few
    words where the figure comes from (shown in the ``over_budget`` message)."""

    keeps: int = 0
    works: int = 0
    outputs: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[tuple[str | None, str], ...] = ()
    what: str = ""
    problems: tuple[tuple[str | None, str, str], ...] = ()
    """``(input name or None, code, message)``: errors seen only from what flows in (a LoRA made for
    another architecture than the model linked to it); they refuse the workflow like any problem."""
    writes: int = 0
    """Bytes the node writes to disk (saved images), summed against the disk budget (``--disk-budget``)."""
    files: int = 0
    """Files the node writes; each also embeds the workflow (counted once per file)."""


DEFAULT_DISK_BUDGET = GIB
"""What one run may write when ``--disk-budget`` is not given: ample for any real workflow, and a
refusal for one crafted to fill a disk (5,000 SaveImage nodes each embedding a large workflow)."""


def png_bytes(shape: Shape, env: Environment) -> int:
    """An upper bound of what saving ``shape`` as PNGs writes: 8-bit pixels, uncompressed (PNG never
    grows them by more than a few bytes per row), plus the text chunks each file embeds."""
    metadata = sum(len(k) + len(v) for k, v in getattr(env, "png_text", ()))
    per_image = shape.height * (shape.width * min(shape.channels, 4) + 1) + 1024 + metadata
    return shape.batch * per_image


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation on this machine (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": GIB, "gb": 10**9, "gib": GIB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"16G"``, ``"512MiB"``, ``"2.5gb"``, ``"1000000"`` -> bytes (K/M/G/T alone are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 16G, 512M or 0 (no limit)")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: float) -> str:
    """Bytes in a short readable form (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def estimate_workflow(compiled: CompiledWorkflow, env: Environment) -> tuple[list[Problem], list[Problem]]:
    """Walk the nodes a run needs in order: ``(problems, warnings)``; the problems are the nodes' own
    (``Estimate.problems``), else ``over_budget``."""
    facts: dict[tuple[str, str], Any] = {}
    warnings: list[Problem] = []
    problems: list[Problem] = []
    kept, largest, worst = 0, 0, (0, "", "")
    written, writers, document_bytes = 0, [], None
    for node_id in compiled.order:
        node = compiled.nodes[node_id]
        inputs = dict(node.literals)
        for name, source, output in node.links:
            inputs[name] = facts.get((source, output))
        try:
            found = node.cls.estimate(inputs, env)
        except Exception as exc:  # noqa: BLE001 - a plugin's estimate must not crash validation
            warnings.append(Problem(node_id, None, codes.CHECK_FAILED,
                                    f"could not estimate its memory: {type(exc).__name__}: {exc}"))
            continue
        if found is None:
            continue
        passed_in = {v.source for v in inputs.values() if isinstance(v, Shape) and v.source}
        for name, value in found.outputs.items():
            if isinstance(value, Shape) and value.source in passed_in:  # a new array: no longer the file's pixels
                value = replace(value, source=None)
            facts[(node_id, name)] = value
        warnings += [Problem(node_id, name, codes.MODEL_LIMITS, message) for name, message in found.warnings]
        problems += [Problem(node_id, name, code, message) for name, code, message in found.problems]
        if found.writes > 0 or found.files > 0:
            if document_bytes is None:
                document_bytes = len(json.dumps(compiled.resolved_document(), default=str))
            writes = max(0, found.writes) + max(0, found.files) * document_bytes
            written += writes
            writers.append((writes, node_id))
        kept += max(0, found.keeps)
        largest = max(largest, max(0, found.works))
        if found.keeps + found.works > worst[0]:
            worst = (found.keeps + found.works, node_id, found.what)
    if problems:
        return problems, warnings
    found_problems = _disk_problems(env, written, writers)
    total = kept + largest
    budget = env.memory_budget if env.memory_budget is not None else available_memory()
    if not budget or total <= budget:
        return found_problems, warnings
    node_id, what = worst[1], worst[2]
    node_type = compiled.nodes[node_id].spec.type_name
    source = "--memory-budget" if env.memory_budget is not None else "this machine's available memory"
    detail = f" ({what})" if what else ""
    message = (f"the workflow needs about {human(total)}, more than the budget of {human(budget)} ({source}); "
               f"node {node_id!r} ({node_type}) alone needs about {human(worst[0])}{detail}: make images "
               "smaller, batches or repeats fewer, or raise --memory-budget")
    return [Problem(node_id, None, codes.OVER_BUDGET, message), *found_problems], warnings


def _disk_problems(env: Environment, written: int, writers: list[tuple[int, str]]) -> list[Problem]:
    """``over_budget`` when the nodes would write more than the disk budget, naming the biggest writers."""
    disk = env.disk_budget if getattr(env, "disk_budget", None) is not None else DEFAULT_DISK_BUDGET
    if not disk or written <= disk:
        return []
    ranked = sorted(writers, reverse=True)
    names = ", ".join(repr(n) for _, n in ranked[:5]) + (f" and {len(ranked) - 5} more" if len(ranked) > 5 else "")
    return [Problem(ranked[0][1], None, codes.OVER_BUDGET,
                    f"the workflow would write about {human(written)} to disk, more than the disk budget of "
                    f"{human(disk)} (--disk-budget); the nodes writing most: {names}: save fewer or smaller "
                    "images, or raise --disk-budget")]

