"""Executor behaviour a user notices: caching across runs, exact re-execution sets, events,
failures naming the node, cancellation, atomic outputs, byte-bounded cache, deep graphs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from graph_helpers import link, workflow, write_png

from ldmgraph.graph import Cancelled, CancelToken, ExecutionError
from ldmgraph.graph.cache import ByteLRU, estimate_nbytes
from ldmgraph.graph.executor import Executor


def diamond(c2: int = 2) -> dict:
    """c1 -> a1 -> s1;  c2 -> a2 -> s2;  (a1 + a2) -> s3;  plus an unused node."""
    return workflow({
        "c1": {"type": "TConst", "inputs": {"value": 1}},
        "c2": {"type": "TConst", "inputs": {"value": c2}},
        "a1": {"type": "TAdd", "inputs": {"a": link("c1"), "b": 10}},
        "a2": {"type": "TAdd", "inputs": {"a": link("c2"), "b": 20}},
        "both": {"type": "TAdd", "inputs": {"a": link("a1"), "b": link("a2")}},
        "s1": {"type": "TSink", "inputs": {"x": link("a1")}},
        "s2": {"type": "TSink", "inputs": {"x": link("a2")}},
        "s3": {"type": "TSink", "inputs": {"x": link("both")}},
        "unused": {"type": "TAdd", "inputs": {"a": link("c1"), "b": 5}},
    })


def started(executor: Executor, doc: dict, **kwargs) -> tuple[set[str], list]:
    events: list = []
    result = executor.run(doc, on_event=events.append, **kwargs)
    return {e.node_id for e in events if e.kind == "start"}, result


def test_second_run_executes_nothing_and_change_reruns_exactly_descendants(executor: Executor) -> None:
    ran, result = started(executor, diamond())
    assert ran == {"c1", "c2", "a1", "a2", "both", "s1", "s2", "s3"}  # "unused" feeds no output
    assert result.outputs["s3"]["value"] == (1 + 10) + (2 + 20)

    ran, result = started(executor, diamond())
    assert ran == set() and result.executed == []
    assert result.outputs["s3"]["value"] == 33

    ran, result = started(executor, diamond(c2=7))
    assert ran == {"c2", "a2", "both", "s2", "s3"}  # c2 and its descendants, nothing else
    assert result.outputs["s2"]["value"] == 27 and result.outputs["s3"]["value"] == 38

    ran, _ = started(executor, diamond())  # the old values are still cached
    assert ran == set()


def test_non_deterministic_nodes_always_run_with_their_descendants(executor: Executor) -> None:
    doc = workflow({
        "r": {"type": "TRandom", "inputs": {}},
        "c": {"type": "TConst", "inputs": {"value": 4}},
        "a": {"type": "TAdd", "inputs": {"a": link("r"), "b": link("c")}},
        "s": {"type": "TSink", "inputs": {"x": link("a")}},
        "s2": {"type": "TSink", "inputs": {"x": link("c")}},
    })
    started(executor, doc)
    ran, _ = started(executor, doc)
    assert ran == {"r", "a", "s"}


def test_events_report_progress_k_of_n_and_totals(executor: Executor) -> None:
    doc = workflow({"slow": {"type": "TSlow", "inputs": {"steps": 4}},
                    "s": {"type": "TSink", "inputs": {"x": link("slow")}}})
    events: list = []
    executor.run(doc, on_event=events.append)
    kinds = [(e.kind, e.node_id) for e in events if e.kind != "progress"]
    assert kinds == [("start", "slow"), ("done", "slow"), ("start", "s"), ("done", "s")]
    assert [(e.k, e.n) for e in events if e.kind == "progress"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(e.total == 2 for e in events)
    events.clear()
    executor.run(doc, on_event=events.append)
    assert [(e.kind, e.node_id) for e in events] == [("cached", "s")]


def test_failing_node_names_id_type_and_cause(executor: Executor) -> None:
    doc = workflow({"bad": {"type": "TFail", "inputs": {}}, "s": {"type": "TSink", "inputs": {"x": link("bad")}}})
    events: list = []
    with pytest.raises(ExecutionError) as info:
        executor.run(doc, on_event=events.append)
    assert info.value.node_id == "bad" and info.value.node_type == "TFail"
    assert isinstance(info.value.cause, ZeroDivisionError)
    assert "'bad' (TFail)" in str(info.value) and "deliberate failure" in str(info.value)
    assert [e.kind for e in events] == ["start", "error"]


def test_cancel_between_nodes(executor: Executor) -> None:
    token = CancelToken()
    doc = workflow({"c": {"type": "TConst", "inputs": {}}, "a": {"type": "TAdd", "inputs": {"a": link("c")}},
                    "s": {"type": "TSink", "inputs": {"x": link("a")}}})
    ran = []

    def on_event(event) -> None:
        if event.kind == "start":
            ran.append(event.node_id)
        if event.kind == "done" and event.node_id == "c":
            token.cancel()

    with pytest.raises(Cancelled):
        executor.run(doc, on_event=on_event, cancel=token)
    assert ran == ["c"]


def test_cancel_inside_a_long_node_through_its_context(executor: Executor) -> None:
    token = CancelToken()
    doc = workflow({"slow": {"type": "TSlow", "inputs": {"steps": 50}},
                    "s": {"type": "TSink", "inputs": {"x": link("slow")}}})
    seen = []

    def on_event(event) -> None:
        if event.kind == "progress":
            seen.append(event.k)
            if event.k == 3:
                token.cancel()

    with pytest.raises(Cancelled):
        executor.run(doc, on_event=on_event, cancel=token)
    assert seen == [1, 2, 3]  # stopped at the next check, not after 50 steps
    events: list = []
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        executor.run(workflow({"slow": {"type": "TSlow", "inputs": {"steps": 7}},
                               "s": {"type": "TSink", "inputs": {"x": link("slow")}}}),
                     on_event=events.append, cancel=token)
    assert events == []  # cancelled before the first node: nothing started


def test_failed_save_leaves_no_file(executor: Executor, env, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(env.input_dir / "a.png")
    doc = workflow({"l": {"type": "LoadImage", "inputs": {"image": "a.png"}},
                    "s": {"type": "SaveImage", "inputs": {"images": link("l", "image"), "filename_prefix": "x"}}})

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ExecutionError, match="disk full"):
        executor.run(doc)
    assert list(env.output_dir.iterdir()) == []  # not even a temporary file
    monkeypatch.undo()
    result = executor.run(doc)
    assert [p.name for p in result.files] == ["x_00001_.png"]


def test_cache_is_bounded_in_bytes() -> None:
    cache = ByteLRU(max_bytes=3500)  # three 1000-byte entries and their overhead
    for i in range(5):
        cache.put(bytes([i]), {"image": np.zeros(1000, np.uint8)})
        assert cache.nbytes <= 3500
    assert bytes([0]) not in cache and bytes([4]) in cache
    cache.get(bytes([2]))  # recently used: survives the next insertion
    cache.put(b"new", {"image": np.zeros(1000, np.uint8)})
    assert bytes([2]) in cache and bytes([3]) not in cache
    cache.put(b"huge", {"image": np.zeros(10_000, np.uint8)})
    assert b"huge" not in cache  # larger than the whole budget: not stored


def test_size_estimate_duck_types_tensors_without_torch() -> None:
    class FakeTensor:
        def numel(self) -> int:
            return 1000

        def element_size(self) -> int:
            return 4

    class Latent:
        def __init__(self) -> None:
            self.samples = FakeTensor()
            self.noise_mask = None

    assert estimate_nbytes(np.zeros((10, 10), np.float32)) == 400
    assert estimate_nbytes(FakeTensor()) == 4000
    assert 4000 < estimate_nbytes(Latent()) < 4300
    assert estimate_nbytes([np.zeros(100, np.uint8)] * 3) >= 300


def test_small_cache_still_gives_correct_results(registry, env) -> None:
    executor = Executor(registry, env, cache_bytes=200)  # room for about one entry
    assert executor.run(diamond()).outputs["s3"]["value"] == 33
    assert executor.run(diamond(c2=5)).outputs["s3"]["value"] == 36
    assert executor.run(diamond()).outputs["s3"]["value"] == 33


def test_10k_chain_under_default_recursion_limit(executor: Executor) -> None:
    assert sys.getrecursionlimit() <= 1000
    n = 10_000
    nodes = {"0": {"type": "TConst", "inputs": {"value": 0}}}
    for i in range(1, n - 1):
        nodes[str(i)] = {"type": "TAdd", "inputs": {"a": link(str(i - 1)), "b": 1}}
    nodes[str(n - 1)] = {"type": "TSink", "inputs": {"x": link(str(n - 2))}}
    result = executor.run(workflow(nodes))
    assert result.outputs[str(n - 1)]["value"] == n - 2
    assert len(result.executed) == n


def test_random_seed_is_recorded_and_reproducible(executor: Executor) -> None:
    doc = workflow({"seed": {"type": "Seed", "inputs": {"mode": "random"}},
                    "s": {"type": "TSink", "inputs": {"x": link("seed", "seed")}}},
                   parameters={"seed": {"targets": [{"node": "seed", "input": "seed"}]}})
    first = executor.run(doc)
    drawn = first.outputs["s"]["value"]
    assert first.parameters["seed"] == drawn
    resolved = first.workflow
    assert resolved["nodes"]["seed"]["inputs"] == {"mode": "fixed", "seed": drawn}
    assert executor.run(resolved).outputs["s"]["value"] == drawn
    again = executor.run(doc)  # random mode draws again (32 random bits: a repeat is a 1-in-4e9 event)
    assert again.executed == ["seed", "s"] and again.parameters["seed"] == again.outputs["s"]["value"]


def test_fixed_seed_is_cached(executor: Executor) -> None:
    doc = workflow({"seed": {"type": "Seed", "inputs": {"seed": 42}},
                    "s": {"type": "TSink", "inputs": {"x": link("seed", "seed")}}})
    assert executor.run(doc).outputs["s"]["value"] == 42
    assert executor.run(doc).executed == []


def test_string_link_into_enum_is_checked_when_run(executor: Executor) -> None:
    def doc(text: str) -> dict:
        return workflow({"t": {"type": "TText", "inputs": {"value": text}},
                         "p": {"type": "TPick", "inputs": {"sampler": link("t")}}})

    assert executor.run(doc("test_sampler")).outputs["p"]["value"] == "test_sampler"
    with pytest.raises(ExecutionError, match="not one of the choices"):
        executor.run(doc("nope"))


def test_requested_outputs_limit_what_runs(executor: Executor) -> None:
    ran, result = started(executor, diamond(), outputs=["s1"])
    assert ran == {"c1", "a1", "s1"} and list(result.outputs) == ["s1"]


def test_file_inputs_invalidate_when_the_file_changes(executor: Executor, env) -> None:
    path: Path = env.input_dir / "a.png"
    write_png(path, seed=1)
    doc = workflow({"l": {"type": "LoadImage", "inputs": {"image": "a.png"}},
                    "s": {"type": "SaveImage", "inputs": {"images": link("l", "image")}}})
    executor.run(doc)
    assert executor.run(doc).executed == []
    write_png(path, seed=2, size=(13, 8))  # new size and mtime
    assert executor.run(doc).executed == ["l", "s"]


def test_remembered_validation_still_sees_file_and_registry_changes(registry, env) -> None:
    from graph_helpers import make_registry

    from ldmgraph.graph import ValidationError

    reg = make_registry()
    executor = Executor(reg, env)
    write_png(env.input_dir / "a.png")
    doc = workflow({"l": {"type": "LoadImage", "inputs": {"image": "a.png"}},
                    "s": {"type": "SaveImage", "inputs": {"images": link("l", "image")}}})
    executor.run(doc)
    (env.input_dir / "a.png").unlink()
    with pytest.raises(ValidationError, match="not found"):
        executor.run(doc)
    write_png(env.input_dir / "a.png")
    executor.run(doc)
    del reg.nodes["SaveImage"]  # registry changed (version bumps on every registration)
    reg.version += 1
    with pytest.raises(ValidationError, match="unknown node type 'SaveImage'"):
        executor.run(doc)
