"""Fuzzing: thousands of malformed workflow documents all end in our ValidationError.

Each generated document is a valid workflow broken by at least one mutation that makes it
invalid for sure (wrong shapes and types, huge numbers, unicode and lone surrogates, deep nesting,
cycles, links to nowhere, unportable file names, linked file names that are not there), or raw
text/bytes. Each goes through the validation API as a Python object (where ints of any length and
lone surrogates arrive as they are) and as bytes through the same loader as `ldmgraph run`; a sample
goes through the CLI itself. Every example has a time limit, so a hang fails the test. Seeded
(``derandomize``): every run tries the same 2,000+ documents, and a failure reproduces.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graph_helpers import make_registry, write_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmgraph.cli import main
from ldmgraph.graph import Environment, ValidationError
from ldmgraph.graph.loading import load_workflow_bytes
from ldmgraph.graph.validate import validate_workflow

REGISTRY = make_registry()
KNOWN_IDS = ("c", "a", "s")
FOLDER = Path(tempfile.mkdtemp(prefix="ldmgraph-fuzz-"))
write_png(FOLDER / "input" / "photo.png")
ENV = Environment(input_dir=FOLDER / "input", output_dir=FOLDER / "output")
SECONDS_PER_EXAMPLE = 10
FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a validation that does not end."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"validation did not end within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**200), max_value=2**200) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
non_int = json_values.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)))
non_dict = json_values.filter(lambda v: not isinstance(v, dict))
non_str = json_values.filter(lambda v: not isinstance(v, str))
new_id = st.text(min_size=1, max_size=12).filter(lambda s: s not in KNOWN_IDS)


def base() -> dict[str, Any]:
    return {"format": "ldmgraph/1", "nodes": {
        "c": {"type": "TConst", "inputs": {"value": 3}},
        "a": {"type": "TAdd", "inputs": {"a": {"node": "c", "output": "value"}, "b": 1}},
        "s": {"type": "TSink", "inputs": {"x": {"node": "a", "output": "value"}}},
    }}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


with_surrogate = st.builds(lambda a, c, b: a + c + b, st.text(max_size=5),
                           st.sampled_from(["\ud800", "\udfff", "\udcff"]), st.text(max_size=5))
bad_prefix = st.one_of(
    st.sampled_from(["", ".", "..", "~", "~/x", ".hidden", "a//b", "sub/", "/abs", "../up", "CON", "x" * 201]),
    st.builds(lambda a, c, b: "p" + a + c + b, st.text(max_size=5),
              st.sampled_from(list('<>:"|?*\\\n\t\x00\x7f')), st.text(max_size=5)),
    with_surrogate,
)
missing_name = st.text(max_size=20).filter(lambda t: os.path.normpath(t.strip("/") or ".") != "photo.png")


class Doc:
    """A generated document with a short repr: hypothesis prints failing examples, and a document
    nested 400 deep would overflow its printer."""

    def __init__(self, value: Any, kind: int) -> None:
        self.value, self.kind = value, kind

    def __repr__(self) -> str:
        try:
            text = repr(self.value)
        except (RecursionError, ValueError):
            text = "<too deep or too long to print>"
        return f"Doc(kind={self.kind}, {text[:400]})"


@st.composite
def mutated(draw: st.DrawFn) -> Doc:
    doc = base()
    nodes = doc["nodes"]
    kind = draw(st.integers(0, 22))
    if kind == 0:
        doc["format"] = draw(json_values.filter(lambda v: v != "ldmgraph/1"))
    elif kind == 1:
        doc["nodes"] = draw(non_dict)
    elif kind == 2:
        nodes[draw(st.sampled_from(KNOWN_IDS))] = draw(non_dict)
    elif kind == 3:
        nodes["c"]["type"] = draw(non_str)
    elif kind == 4:
        nodes["c"]["type"] = draw(st.text(max_size=30).filter(lambda t: t not in REGISTRY.nodes))
    elif kind == 5:
        nodes["c"]["inputs"]["value"] = draw(non_int | st.integers(min_value=1001) | st.integers(max_value=-1001))
    elif kind == 6:
        nodes["a"]["inputs"]["a"] = {"node": draw(new_id), "output": "value"}
    elif kind == 7:
        nodes["a"]["inputs"]["a"] = {"node": "c", "output": draw(st.text(max_size=10).filter(lambda t: t != "value"))}
    elif kind == 8:
        nodes["c"]["inputs"][draw(st.text(max_size=10).filter(lambda t: t != "value"))] = draw(json_values)
    elif kind == 9:
        nodes["c"]["inputs"] = {"value": {"node": "s", "output": "value"}}  # cycle through the sink
        nodes["c"]["type"] = "TAdd"
        nodes["c"]["inputs"] = {"a": {"node": "a", "output": "value"}}
    elif kind == 10:
        nodes["s"]["type"] = "TAdd"  # no output node left
        nodes["s"]["inputs"] = {"a": nodes["s"]["inputs"]["x"]}
    elif kind == 11:
        doc["parameters"] = {draw(st.text(max_size=10)): draw(json_values.filter(
            lambda v: not isinstance(v, dict) or "targets" not in v))}
    elif kind == 12:
        nodes["c"]["inputs"]["value"] = nested(draw(st.integers(1, 3000)))
    elif kind == 13:
        nodes[draw(new_id)] = {"type": draw(st.text(max_size=20).filter(lambda t: t not in REGISTRY.nodes)),
                               "inputs": draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))}
    elif kind == 14:
        nodes["s"]["inputs"]["x"] = {"node": "a", "output": "value", draw(st.text(max_size=5)): 1}
    elif kind == 15:
        nodes["a"]["inputs"]["b"] = draw(st.sampled_from([10**400, -(10**400), 2**64, -(2**63) - 1, "∞", "1e999", 2.5]))
    elif kind == 16:  # a lone surrogate in a node id, an input name, a type or a prompt
        bad = draw(with_surrogate)
        where = draw(st.integers(0, 3))
        if where == 0:
            nodes[bad] = {"type": "TText", "inputs": {}}
        elif where == 1:
            nodes["c"]["inputs"][bad] = 1
        elif where == 2:
            nodes["c"]["type"] = bad
        else:
            nodes["t"] = {"type": "TText", "inputs": {"value": bad}}
    elif kind == 17:  # metadata (or a literal) nested past the bound
        deep: Any = draw(json_scalars)
        for _ in range(draw(st.integers(65, 400))):
            deep = {"k": deep} if draw(st.booleans()) else [deep]
        doc["metadata"] = {"notes": deep}
    elif kind == 18:  # an int too long to print, anywhere (only the API can carry one)
        huge = draw(st.integers(4400, 20000).map(lambda digits: 10**digits)) * draw(st.sampled_from([1, -1]))
        spot = draw(st.integers(0, 2))
        if spot == 0:
            nodes["c"]["inputs"]["value"] = huge
        elif spot == 1:
            doc["metadata"] = {"n": [huge]}
        else:
            nodes["a"]["pos"] = [huge, 0]
    elif kind == 19:  # an unportable or escaping file-name prefix
        nodes["save"] = {"type": "SaveImage", "inputs": {"images": {"node": "load", "output": "image"},
                                                         "filename_prefix": draw(bad_prefix)}}
        nodes["load"] = {"type": "LoadImage", "inputs": {"image": "photo.png"}}
    elif kind == 20:  # a file name linked from a String node: not there, or not a file
        nodes["name"] = {"type": "String", "inputs": {"value": draw(missing_name)}}
        nodes["load"] = {"type": "LoadImage", "inputs": {"image": {"node": "name", "output": "value"}}}
        nodes["save"] = {"type": "SaveImage", "inputs": {"images": {"node": "load", "output": "image"}}}
    elif kind == 21:  # a literal no JSON file can hold, through the API
        nodes["c"]["inputs"]["value"] = draw(st.sampled_from([b"3", {3}, 3j, float("nan"), object(), (1, 2)]))
    else:  # a prompt-like input of the wrong type or a file name literal that is not there
        nodes["load"] = {"type": "LoadImage", "inputs": {"image": draw(missing_name | non_str)}}
        nodes["save"] = {"type": "SaveImage", "inputs": {"images": {"node": "load", "output": "image"}}}
    # unicode decoration that must not matter for the verdict
    if draw(st.booleans()) and isinstance(doc.get("nodes"), dict):
        doc.setdefault("metadata", {})["note"] = draw(st.text(max_size=10))
    return Doc(doc, kind)


raw_documents = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


def to_bytes(doc: Any, ascii_only: bool) -> bytes:
    """The document as a file would hold it, or bytes that are not a workflow when it cannot be one."""
    try:
        return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except (RecursionError, ValueError, TypeError):
        return b"[" * 5000


def assert_refused(attempt: Any, what: str) -> None:
    try:
        with time_limit(SECONDS_PER_EXAMPLE):
            attempt()
    except ValidationError as exc:
        assert exc.problems and all(p.code and p.message for p in exc.problems)
        json.dumps(exc.to_dict())  # the problems print as JSON (no lone surrogate leaks into them)
        str(exc).encode("utf-8")
    else:
        raise AssertionError(f"accepted a malformed document: {what[:300]}")


@FUZZ
@given(mutated(), st.booleans())
def test_malformed_documents_end_in_validation_error(generated: Doc, ascii_only: bool) -> None:
    doc = generated.value
    assert_refused(lambda: validate_workflow(doc, REGISTRY, ENV), repr(generated))
    data = to_bytes(doc, ascii_only)
    assert_refused(lambda: validate_workflow(load_workflow_bytes(data, "fuzz").document, REGISTRY, ENV), repr(data[:300]))
    assert not ENV.output_dir.exists()


@settings(FUZZ, max_examples=300)
@given(raw_documents)
def test_malformed_bytes_end_in_validation_error(data: bytes) -> None:
    assert_refused(lambda: validate_workflow(load_workflow_bytes(data, "fuzz").document, REGISTRY, ENV), repr(data[:300]))


def cli_sample(doc: Any, ascii_only: bool, command: str) -> tuple[int, str]:
    path = FOLDER / "fuzz.json"
    path.write_bytes(to_bytes(doc, ascii_only))
    out, err = io.StringIO(), io.StringIO()
    with time_limit(SECONDS_PER_EXAMPLE), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([command, str(path), "--json", "--input-dir", str(ENV.input_dir),
                     "--output-dir", str(ENV.output_dir)])
    return code, out.getvalue()


@settings(FUZZ, max_examples=60)
@given(mutated(), st.booleans(), st.sampled_from(["validate", "run"]))
def test_sample_through_the_cli_exits_2_with_json_problems(generated: Doc, ascii_only: bool, command: str) -> None:
    code, out = cli_sample(generated.value, ascii_only, command)
    assert code == 2, out
    report = json.loads(out)
    assert report["ok"] is False and report["problems"]
    assert not ENV.output_dir.exists()


@settings(FUZZ, max_examples=3)
@given(mutated())
def test_sample_through_the_cli_process_ends(generated: Doc) -> None:
    """In a process of its own, as a user runs it: exit 2, no traceback, no hang."""
    path = FOLDER / "fuzz_process.json"
    path.write_bytes(to_bytes(generated.value, True))
    done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "run", str(path), "--output-dir",
                           str(ENV.output_dir)], capture_output=True, text=True, timeout=60, cwd=FOLDER)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
