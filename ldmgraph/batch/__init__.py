"""Batches: one run of a saved workflow per row of a parameter table, locally or on a Ray cluster.

- :mod:`.params`: reading CSV / JSONL tables and ``--sweep`` lists into rows;
- :mod:`.plan`: validating every row before any runs; keys for resume and checkpoint grouping;
- :mod:`.runner`: :class:`RowRunner`, a long-lived executor that runs one row at a time;
- :mod:`.ray_pool`: :class:`RayWorkerPool`, long-lived Ray actors each holding a ``RowRunner``;
- :mod:`.driver`: backends, outputs, the manifest; :mod:`.cli`: ``ldmgraph batch``.

Nothing here imports torch or Ray at import time.
"""

from .driver import BatchSummary, LocalBackend, RayBackend, run_batch
from .params import BatchInputError, Row, read_rows
from .plan import PlannedRow, plan_rows
from .ray_pool import RayWorkerPool, RowFailed
from .runner import RowOutput, RowRunner

__all__ = ["BatchInputError", "BatchSummary", "LocalBackend", "PlannedRow", "RayBackend", "RayWorkerPool",
           "Row", "RowFailed", "RowOutput", "RowRunner", "plan_rows", "read_rows", "run_batch"]
