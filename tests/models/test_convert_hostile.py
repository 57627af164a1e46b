"""`ldmgraph convert` against hostile files: each is made here the way an attacker would make it, and each
must end with exit 2 and a named code, in bounded time and memory, writing nothing.

The pickles are written with Python's own Pickler and the real torch names (`torch._utils.
_rebuild_tensor_v2`, `torch.FloatStorage`), exactly the bytes torch.save writes for a tensor, with the
sizes, strides, storages, states and zip entries an attacker chooses.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmgraph.graph.errors import LdmGraphError
from ldmgraph.models.convert import convert_checkpoint
from ldmgraph.models.safe_unpickle import load_pickled_weights


@dataclass
class FakeStorage:
    key: str
    numel: int


@dataclass
class FakeTensor:
    storage: FakeStorage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    state: Any = None


class _Pickler(pickle.Pickler):
    """Writes FakeTensor / FakeStorage as torch.save writes tensors and storages."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, FakeTensor):
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args) if obj.state is None else (
                torch._utils._rebuild_tensor_v2, args, obj.state)
        return NotImplemented


def pickle_program(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_ckpt(path: Path, weights: dict[str, Any], storages: dict[str, bytes], *,
               program: bytes | None = None, deflate: bool = False) -> Path:
    compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=1 if deflate else None) as archive:
        archive.writestr("archive/data.pkl", program if program is not None else pickle_program({"state_dict": weights}))
        archive.writestr("archive/byteorder", sys.byteorder)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def write_bomb_entry(path: Path, name: str, size: int, weights_program: bytes) -> Path:
    """A zip whose entry `name` deflates `size` zero bytes (streamed: never held in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        if name != "archive/data.pkl":
            archive.writestr("archive/data.pkl", weights_program)
        archive.writestr("archive/byteorder", sys.byteorder)
        with archive.open(name, "w", force_zip64=True) as f:
            chunk = bytes(16 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return path


def run_convert(*args: str, cwd: Path) -> tuple[int, dict[str, Any], float, int]:
    """`ldmgraph convert ... --json` in a child: exit code, its JSON, seconds, and its peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "convert", *args, "--json"], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else {}, seconds, max(peak, before) // 1024


def assert_refused(tmp_path: Path, code: str, *args: str) -> dict[str, Any]:
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, seconds, peak_mib = run_convert(*args, cwd=tmp_path)
    assert rc == 2 and out.get("ok") is False and out.get("code") == code, out
    assert seconds < 60 and peak_mib < 1500, (seconds, peak_mib)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temp file
    return out


def test_a_size_of_two_to_the_63_with_stride_zero_is_bad_tensor(tmp_path: Path) -> None:
    s = FakeStorage("0", 1)
    ckpt = write_ckpt(tmp_path / "m.ckpt", {"w": FakeTensor(s, 0, (2**63,), (0,))}, {"0": bytes(4)})
    assert_refused(tmp_path, "bad_tensor", str(ckpt))


def test_a_stride_zero_expansion_is_never_written_out_as_gigabytes(tmp_path: Path) -> None:
    """400 bytes that would write 1 GiB (2^28 floats from one stored float), or 64 GiB with 64 of them."""
    s = FakeStorage("0", 1)
    weights = {f"w{i}": FakeTensor(s, 0, (2**28,), (0,)) for i in range(64)}
    ckpt = write_ckpt(tmp_path / "m.ckpt", weights, {"0": bytes(4)})
    out = assert_refused(tmp_path, "bad_tensor", str(ckpt))
    assert "stride-0" in out["error"]


def test_many_views_of_one_storage_are_an_amplification_refused(tmp_path: Path) -> None:
    s = FakeStorage("0", 1 << 20)  # 4 MiB stored, 64 full views would write 256 MiB
    weights = {f"w{i}": FakeTensor(s, 0, (1 << 20,), (1,)) for i in range(64)}
    ckpt = write_ckpt(tmp_path / "m.ckpt", weights, {"0": bytes(4 << 20)})
    assert_refused(tmp_path, "zip_bomb", str(ckpt))


@pytest.mark.parametrize("state", [{"storage": None}, {"materialize": 1}, (None, {"storage": None})])
def test_a_build_state_on_a_tensor_is_refused_by_name(tmp_path: Path, state: Any) -> None:
    s = FakeStorage("0", 4)
    ckpt = write_ckpt(tmp_path / "m.ckpt", {"w": FakeTensor(s, 0, (4,), (1,), state)}, {"0": bytes(16)})
    out = assert_refused(tmp_path, "pickle_refused", str(ckpt))
    assert "BUILD" in out["error"] and "tensor" in out["error"]


def test_a_deflated_storage_bomb_stops_before_inflating(tmp_path: Path) -> None:
    s = FakeStorage("0", 4)  # declares 16 bytes; the entry inflates to 512 MiB
    program = pickle_program({"state_dict": {"w": FakeTensor(s, 0, (4,), (1,))}})
    ckpt = write_bomb_entry(tmp_path / "m.ckpt", "archive/data/0", 512 << 20, program)
    assert ckpt.stat().st_size < 4 << 20
    assert_refused(tmp_path, "zip_bomb", str(ckpt))


def test_a_bomb_in_data_pkl_itself_stops_before_inflating(tmp_path: Path) -> None:
    ckpt = write_bomb_entry(tmp_path / "m.ckpt", "archive/data.pkl", 256 << 20, b"")
    assert_refused(tmp_path, "zip_bomb", str(ckpt))


def test_a_deeply_nested_config_is_too_deep_not_a_recursion_crash(tmp_path: Path) -> None:
    s = FakeStorage("0", 4)
    ckpt = write_ckpt(tmp_path / "m.ckpt", {"w": FakeTensor(s, 0, (4,), (1,))}, {"0": bytes(16)})
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    assert_refused(tmp_path, "too_deep", str(ckpt), "--config", str(deep))
    (tmp_path / "config.yaml").write_text("a:\n" + "".join("  " * i + "- \n" for i in range(1, 200)))
    deep.unlink()
    assert_refused(tmp_path, "too_deep", str(ckpt))


def test_an_output_where_no_regular_file_can_be_written_is_refused_up_front(tmp_path: Path) -> None:
    s = FakeStorage("0", 4)
    ckpt = write_ckpt(tmp_path / "m.ckpt", {"w": FakeTensor(s, 0, (4,), (1,))}, {"0": bytes(16)})
    assert_refused(tmp_path, "output_not_writable", str(ckpt), "-o", "/proc/x.safetensors")
    assert_refused(tmp_path, "output_not_writable", str(ckpt), "-o", str(tmp_path / "no" / "x.safetensors"))


def test_a_fifo_config_beside_the_checkpoint_does_not_hang(tmp_path: Path) -> None:
    s = FakeStorage("0", 4)
    ckpt = write_ckpt(tmp_path / "m.ckpt", {"w": FakeTensor(s, 0, (4,), (1,))}, {"0": bytes(16)})
    os.mkfifo(tmp_path / "config.yaml")
    assert_refused(tmp_path, "bad_model", str(ckpt))


def test_a_hostile_looking_but_honest_checkpoint_still_converts(tmp_path: Path) -> None:
    """The bounds do not refuse what torch.save writes: tied, transposed and sliced views of one weight."""
    base = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    torch.save({"state_dict": {"a": base, "b": base.t(), "c": base[2:4], "d": torch.zeros(0, 3)}}, tmp_path / "m.ckpt")
    rc, out, _, _ = run_convert(str(tmp_path / "m.ckpt"), cwd=tmp_path)
    assert rc == 0 and out["tensors"] == 4, out


# --- property-based fuzz: random geometry, states, opcode mutations and zip containers ------------------

_geometry = st.tuples(
    st.integers(0, 64),  # storage numel
    st.integers(-2, 2**64),  # offset
    st.lists(st.one_of(st.integers(0, 8), st.integers(-1, 2**64)), max_size=4),  # size
    st.lists(st.one_of(st.integers(0, 8), st.integers(-1, 2**64)), max_size=4),  # stride
    st.sampled_from([None, {"storage": None}, {"x": 1}, (None, {"size": 3})]),
)


def _declared_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/" in i.filename)


def _check_conversion(ckpt: Path, out: Path) -> None:
    try:
        convert_checkpoint(ckpt, out)
    except LdmGraphError:
        assert not out.exists()
        return
    assert out.stat().st_size <= 4 * _declared_bytes(ckpt) + (16 << 20) + 4096
    out.unlink()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=st.lists(_geometry, min_size=1, max_size=3))
def test_fuzz_convert_tensor_geometry_and_build_states(tmp_path_factory: Any, specs: list[Any]) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    weights, storages = {}, {}
    for i, (numel, offset, size, stride, state) in enumerate(specs):
        s = FakeStorage(str(i), numel)
        storages[s.key] = bytes(4 * numel)
        weights[f"w{i}"] = FakeTensor(s, offset, tuple(size), tuple(stride), state)
    ckpt = write_ckpt(folder / "m.ckpt", weights, storages)
    _check_conversion(ckpt, folder / "out.safetensors")


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_convert_pickle_opcodes_and_zip_containers(tmp_path_factory: Any, data: Any) -> None:
    """Byte mutations of a real torch.save program and of its zip container."""
    folder = tmp_path_factory.mktemp("fuzz")
    buffer = io.BytesIO()
    torch.save({"state_dict": {"a": torch.ones(3, 2), "b": torch.zeros(4).half()}}, buffer)
    raw = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        program = bytearray(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    target = data.draw(st.sampled_from(["program", "container"]))
    victim = program if target == "program" else raw
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(victim) - 1))
        victim[at] = data.draw(st.integers(0, 255))
    ckpt = folder / "m.ckpt"
    if target == "program":
        write_ckpt(ckpt, {}, {"0": bytes(24), "1": bytes(8)}, program=bytes(program))
    else:
        ckpt.write_bytes(bytes(raw))
    try:
        convert_checkpoint(ckpt, folder / "out.safetensors")
    except LdmGraphError:
        assert not (folder / "out.safetensors").exists()


def test_the_reader_still_reads_bit_for_bit(tmp_path: Path) -> None:
    weights = {"a": torch.randn(5, 3), "b": torch.randn(7).bfloat16()}
    torch.save(weights, tmp_path / "w.pt")
    read = load_pickled_weights(tmp_path / "w.pt")
    assert all(torch.equal(read[k], v) for k, v in weights.items())
