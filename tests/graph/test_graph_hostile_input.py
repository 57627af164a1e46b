"""What a careless or hostile user meets: special files, odd names, bad text, deep nesting, huge
numbers, unwritable folders, signals. Each case: a named error and exit 2 before anything runs
where validation can know it, exit 1 naming node, file and cause otherwise; nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from graph_helpers import WORKFLOWS, link, workflow, write_png

from ldmgraph.cli import main
from ldmgraph.graph import Environment, codes
from ldmgraph.graph.errors import ExecutionError, FileTooLargeError, ValidationError
from ldmgraph.graph.executor import Executor
from ldmgraph.graph.files import read_regular_file
from ldmgraph.graph.validate import validate_workflow
from ldmgraph.graph.workflow import parse_workflow
from ldmgraph.plugins import PluginManager


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def json_codes(out: str) -> set[str]:
    return {p["code"] for p in json.loads(out)["problems"]}


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def save_graph(prefix: Any = "shot", image: Any = "photo.png", **extra: Any) -> dict[str, Any]:
    return workflow({
        "load": {"type": "LoadImage", "inputs": {"image": image}},
        "save": {"type": "SaveImage", "inputs": {"images": link("load", "image"), "filename_prefix": prefix}},
    }, **extra)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A project folder: inputs/photo.png beside where workflow files go; cwd for the CLI."""
    write_png(tmp_path / "inputs" / "photo.png")
    return tmp_path


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# -- only regular files, read with a bound ------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "run"])
def test_dev_zero_as_workflow_is_not_a_file_exit_2(capsys, command, tmp_path) -> None:
    code, out, _ = run_cli(capsys, command, "/dev/zero", "--json", "--output-dir", tmp_path / "out")
    assert code == 2 and json_codes(out) == {codes.NOT_A_FILE}
    assert "character device" in out and not (tmp_path / "out").exists()


def test_import_of_dev_zero_is_a_clear_error(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "import", "/dev/zero", "-o", tmp_path / "x.json")
    assert code == 1 and "/dev/zero is a character device, not a regular file" in err
    assert not (tmp_path / "x.json").exists()


def test_fifo_as_workflow_is_refused_without_waiting_for_a_writer(tmp_path) -> None:
    fifo = tmp_path / "wf.json"
    os.mkfifo(fifo)
    for command in (["validate", str(fifo), "--json"], ["import", str(fifo)]):
        done = subprocess.run([sys.executable, "-m", "ldmgraph.cli", *command], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode in (1, 2) and "FIFO" in done.stdout + done.stderr


def test_special_files_as_input_images_are_not_a_file(capsys, folder) -> None:
    os.mkfifo(folder / "inputs" / "pipe.png")
    (folder / "inputs" / "dir.png").mkdir()
    os.symlink("/dev/zero", folder / "inputs" / "zero.png")  # a link out of the folder
    for name, code in (("pipe.png", codes.NOT_A_FILE), ("dir.png", codes.NOT_A_FILE),
                       ("zero.png", codes.UNSAFE_PATH)):
        wf = write_json(folder / "wf.json", save_graph(image=name))
        rc, out, _ = run_cli(capsys, "run", wf, "--json", "--output-dir", folder / "out")
        assert rc == 2 and json_codes(out) == {code}, (name, out)
    assert not (folder / "out").exists()


def test_files_past_the_bound_are_refused_without_reading_them(capsys, tmp_path) -> None:
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as handle:  # 300 MB of nothing: a sparse file costs no disk
        handle.truncate(300 * 1024**2)
    code, out, _ = run_cli(capsys, "validate", sparse, "--json")
    assert code == 2 and json_codes(out) == {codes.BAD_DOCUMENT} and "more than the limit" in out
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    with pytest.raises(FileTooLargeError):
        read_regular_file(small, limit=99)
    assert read_regular_file(small, limit=100) == b"x" * 100


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def test_png_workflow_is_read_from_its_text_without_decoding_pixels(capsys, folder) -> None:
    """A PNG that claims 30000x30000 pixels (3.6 GB decoded) with a workflow in a zTXt chunk."""
    ihdr = (30000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    doc = json.dumps(save_graph())
    text = b"ldmgraph:workflow\x00\x00" + zlib.compress(doc.encode())
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"zTXt", text)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + png_chunk(b"IEND", b""))
    (folder / "bomb.png").write_bytes(data)
    code, out, err = run_cli(capsys, "validate", folder / "bomb.png", "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "ldmgraph-png"


# -- what validation can know ------------------------------------------------------------------------
BAD_PREFIXES = {
    "": codes.BAD_FILE_NAME, "x" * 300: codes.BAD_FILE_NAME, ".": codes.BAD_FILE_NAME,
    "..": codes.UNSAFE_PATH, "~/x": codes.BAD_FILE_NAME, "a\nb": codes.BAD_FILE_NAME,
    ".hidden": codes.BAD_FILE_NAME, "sub/.hidden": codes.BAD_FILE_NAME, "a//b": codes.BAD_FILE_NAME,
    "sub/": codes.BAD_FILE_NAME, "name:2": codes.BAD_FILE_NAME, "c:x": codes.UNSAFE_PATH, "CON": codes.BAD_FILE_NAME,
    "/abs": codes.UNSAFE_PATH, "../up": codes.UNSAFE_PATH, "tab\there": codes.BAD_FILE_NAME,
}


@pytest.mark.parametrize("prefix", list(BAD_PREFIXES), ids=[repr(p)[:20] for p in BAD_PREFIXES])
def test_unportable_filename_prefixes_are_refused_at_validation(capsys, folder, prefix) -> None:
    wf = write_json(folder / "wf.json", save_graph(prefix=prefix))
    code, out, _ = run_cli(capsys, "run", wf, "--json", "--output-dir", folder / "out")
    problems = json.loads(out)["problems"]
    assert code == 2 and [(p["node_id"], p["code"]) for p in problems] == [("save", BAD_PREFIXES[prefix])]
    assert not (folder / "out").exists()


def test_portable_prefixes_with_subfolders_and_unicode_still_work(capsys, folder) -> None:
    wf = write_json(folder / "wf.json", save_graph(prefix="sub/día_1-x"))
    code, _, err = run_cli(capsys, "run", wf, "--output-dir", folder / "out", "--no-progress")
    assert code == 0, err
    assert [p.name for p in leftovers(folder / "out")] == ["día_1-x_00001_.png"]


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file", "prefix_under_a_file"])
def test_output_folder_that_cannot_hold_files_is_refused_at_validation(capsys, folder, where) -> None:
    (folder / "file").write_text("not a folder")
    output = {"is_a_file": folder / "file", "under_a_file": folder / "file" / "out"}.get(where, folder)
    prefix = "file/shot" if where == "prefix_under_a_file" else "shot"
    wf = write_json(folder / "wf.json", save_graph(prefix=prefix))
    code, out, _ = run_cli(capsys, "validate", wf, "--json", "--output-dir", output)
    assert code == 2 and json_codes(out) == {codes.OUTPUT_NOT_WRITABLE}
    assert str(folder / "file") in out
    assert (folder / "file").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_at_validation(capsys, folder) -> None:
    (folder / "ro").mkdir(mode=0o555)
    wf = write_json(folder / "wf.json", save_graph())
    code, out, _ = run_cli(capsys, "validate", wf, "--json", "--output-dir", folder / "ro" / "out")
    assert code == 2 and json_codes(out) == {codes.OUTPUT_NOT_WRITABLE}


def test_full_disk_names_node_file_and_cause_and_leaves_nothing(folder, monkeypatch, registry) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    executor = Executor(registry, Environment(input_dir=folder / "inputs", output_dir=folder / "out"))
    with pytest.raises(ExecutionError) as error:
        executor.run(save_graph())
    message = str(error.value)
    assert "'save' (SaveImage)" in message and "No space left on device" in message
    assert str(folder / "out" / "shot_") in message
    assert leftovers(folder / "out") == []


def test_lone_surrogates_in_node_ids_and_prompts_are_invalid_text(capsys, registry, folder) -> None:
    doc = save_graph()
    doc["nodes"]["t\ud800"] = {"type": "String", "inputs": {"value": "a red \udcff circle"}}
    with pytest.raises(ValidationError) as error:
        validate_workflow(doc, registry)
    assert error.value.codes == {codes.INVALID_TEXT} and len(error.value.problems) == 2
    # the same through a JSON file: the \\ud800 escape is valid JSON; the CLI's JSON output prints it
    (folder / "wf.json").write_text(json.dumps(doc, ensure_ascii=True), encoding="utf-8")
    code, out, _ = run_cli(capsys, "validate", folder / "wf.json", "--json")
    assert code == 2 and json_codes(out) == {codes.INVALID_TEXT}
    code, _, err = run_cli(capsys, "validate", folder / "wf.json")
    assert code == 2 and "\\ud800" in err


def test_lone_surrogate_in_a_set_value_is_invalid_text(capsys, folder) -> None:
    wf = write_json(folder / "wf.json", save_graph(parameters={
        "prefix": {"targets": [{"node": "save", "input": "filename_prefix"}]}}))
    code, out, _ = run_cli(capsys, "validate", wf, "--json", "--set", "prefix=a\udcffb")
    assert code == 2 and json_codes(out) == {codes.INVALID_TEXT}


def test_deep_metadata_is_too_deep_before_anything_runs(capsys, folder) -> None:
    deep: Any = "bottom"
    for _ in range(300):
        deep = {"d": deep}
    wf = write_json(folder / "wf.json", save_graph(metadata={"notes": deep}))
    code, out, _ = run_cli(capsys, "run", wf, "--json", "--output-dir", folder / "out")
    assert code == 2 and json_codes(out) == {codes.TOO_DEEP}
    assert not (folder / "out").exists()
    shallow = save_graph(metadata={"notes": {"a": [1, {"b": "ok"}]}})
    code, _, err = run_cli(capsys, "run", write_json(folder / "ok.json", shallow), "--output-dir", folder / "out")
    assert code == 0, err


@pytest.mark.parametrize("place", ["literal", "metadata", "pos"])
def test_int_literal_of_more_than_4300_digits_is_a_validation_error(registry, place) -> None:
    huge = 10**5000
    doc = workflow({"c": {"type": "TConst", "inputs": {"value": 1}}, "s": {"type": "TSink", "inputs": {"x": link("c")}}})
    if place == "literal":
        doc["nodes"]["c"]["inputs"]["value"] = huge
    elif place == "metadata":
        doc["metadata"] = {"n": [huge]}
    else:
        doc["nodes"]["c"]["pos"] = [huge, 0]
    with pytest.raises(ValidationError) as error:
        parse_workflow(doc)
    assert error.value.codes == {codes.BAD_DOCUMENT} and "digits" in str(error.value)


def test_huge_int_past_the_document_scan_still_reads_as_out_of_bounds(registry) -> None:
    """Below the scan's bound but far past INT's range: the message never prints the number."""
    doc = workflow({"c": {"type": "TConst", "inputs": {"value": 10**3000}},
                    "s": {"type": "TSink", "inputs": {"x": link("c")}}})
    with pytest.raises(ValidationError) as error:
        validate_workflow(doc, registry)
    assert error.value.codes == {codes.OUT_OF_BOUNDS} and "3,000 digits" in str(error.value)


# -- linked file names ---------------------------------------------------------------------------------
def linked_graph(image_source: str = "String", image: str = "photo.png", prefix: str = "linked") -> dict:
    return workflow({
        "name": {"type": image_source, "inputs": {"value": image}},
        "prefix": {"type": "String", "inputs": {"value": prefix}},
        "load": {"type": "LoadImage", "inputs": {"image": link("name")}},
        "save": {"type": "SaveImage", "inputs": {"images": link("load", "image"), "filename_prefix": link("prefix")}},
    })


def test_file_names_linked_from_string_nodes_run(capsys, folder) -> None:
    wf = write_json(folder / "wf.json", linked_graph())
    code, _, err = run_cli(capsys, "run", wf, "--output-dir", folder / "out", "--no-progress")
    assert code == 0, err
    assert [p.name for p in leftovers(folder / "out")] == ["linked_00001_.png"]


@pytest.mark.parametrize(("image", "prefix", "expected"), [
    ("absent.png", "ok", {("load", "image", codes.FILE_NOT_FOUND)}),
    ("../secret.png", "ok", {("load", "image", codes.UNSAFE_PATH)}),
    ("photo.png", ".hidden", {("save", "filename_prefix", codes.BAD_FILE_NAME)}),
])
def test_file_names_linked_from_string_nodes_are_checked_at_validation(capsys, folder, image, prefix, expected):
    wf = write_json(folder / "wf.json", linked_graph(image=image, prefix=prefix))
    code, out, _ = run_cli(capsys, "run", wf, "--json", "--output-dir", folder / "out")
    assert code == 2
    assert {(p["node_id"], p["input"], p["code"]) for p in json.loads(out)["problems"]} == expected
    assert not (folder / "out").exists()


def test_file_name_computed_at_run_time_is_checked_before_its_node_runs(folder, registry) -> None:
    """A name from a node that is not a constant is known only when it has run: checked then."""
    executor = Executor(registry, Environment(input_dir=folder / "inputs", output_dir=folder / "out"))
    with pytest.raises(ExecutionError) as error:
        executor.run(linked_graph(image_source="TText", image="absent.png"))
    assert error.value.node_id == "load" and "file_not_found" in str(error.value) and "absent.png" in str(error.value)
    assert not (folder / "out").exists()
    result = executor.run(linked_graph(image_source="TText"))
    assert [p.name for p in result.files] == ["linked_00001_.png"]


def test_linked_constant_values_are_checked_like_literals(registry) -> None:
    doc = workflow({"n": {"type": "Int", "inputs": {"value": 5000}},
                    "c": {"type": "TSlow", "inputs": {"steps": link("n")}},
                    "s": {"type": "TSink", "inputs": {"x": link("c")}}})
    with pytest.raises(ValidationError) as error:
        validate_workflow(doc, registry)
    assert [(p.node_id, p.input, p.code) for p in error.value.problems] == [("c", "steps", codes.OUT_OF_BOUNDS)]


# -- codes ---------------------------------------------------------------------------------------------
def test_out_of_range_set_value_is_out_of_bounds_exit_2(capsys, folder) -> None:
    shutil.copy(WORKFLOWS / "invert.json", folder / "invert.json")
    code, out, _ = run_cli(capsys, "validate", folder / "invert.json", "--json", "--set", "strength=7")
    assert code == 2 and json_codes(out) == {codes.OUT_OF_BOUNDS}


# -- signals, temporary folders, permissions ---------------------------------------------------------
SLOW_WRITE = """
import os, sys, time
def slow_fsync(fd):
    print("writing", file=sys.stderr, flush=True)
    time.sleep(60)
os.fsync = slow_fsync
from ldmgraph.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("sig", "exit_code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_during_a_png_write_cancels_names_the_node_and_leaves_nothing(folder, sig, exit_code, name) -> None:
    wf = write_json(folder / "wf.json", save_graph())
    out = folder / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "run", str(wf), "--output-dir", str(out),
                                "--no-progress"], cwd=folder, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    assert process.stderr.readline().strip() == "writing"  # inside the PNG write, temporary file open
    assert [p.name.startswith(".ldmgraph-") for p in leftovers(out)] == [True]
    process.send_signal(sig)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == exit_code
    assert f"interrupted by {name}" in rest and "'save' (SaveImage)" in rest
    assert leftovers(out) == []


def test_sigterm_json_report_names_the_node(folder) -> None:
    wf = write_json(folder / "wf.json", save_graph())
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "run", str(wf), "--json", "--output-dir",
                                str(folder / "out")], cwd=folder, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    assert process.stderr is not None
    # --json streams progress events as JSON lines on stderr before the write starts
    assert "writing" in iter(lambda: process.stderr.readline().strip(), "")
    process.terminate()
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 143
    report = json.loads(stdout)
    assert report["ok"] is False and report["signal"] == "SIGTERM" and report["node_id"] == "save"


def test_saved_files_follow_the_umask(folder) -> None:
    wf = write_json(folder / "wf.json", save_graph())
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = folder / f"out{umask:o}"
        probe = f"import os, sys\nos.umask({umask})\nfrom ldmgraph.cli import main\nsys.exit(main(sys.argv[1:]))"
        subprocess.run([sys.executable, "-c", probe, "run", str(wf), "--output-dir", str(out), "--no-progress"],
                       cwd=folder, check=True, capture_output=True, timeout=120)
        (png,) = leftovers(out)
        assert png.stat().st_mode & 0o777 == mode


def test_preview_images_go_to_a_private_folder_per_run_not_a_planted_link(folder, monkeypatch) -> None:
    import tempfile

    shared_tmp = folder / "tmp"
    victim = folder / "victim"
    shared_tmp.mkdir()
    victim.mkdir()
    os.symlink(victim, shared_tmp / "ldmgraph-preview")  # planted at the old fixed name
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    doc = workflow({"load": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
                    "show": {"type": "PreviewImage", "inputs": {"images": link("load", "image")}}})
    env = Environment(input_dir=folder / "inputs", output_dir=folder / "out")
    registry = PluginManager(builtins=["ldmgraph.nodes.image", "ldmgraph.nodes.image_ops"],
                             entry_points_group=None, use_env=False).registry
    first = Executor(registry, env).run(doc).files
    second = Executor(registry, env).run(doc).files
    assert len(first) == len(second) == 1 and first[0].parent != second[0].parent
    for path in (first[0], second[0]):
        assert path.parent.parent == shared_tmp and path.parent.name.startswith("ldmgraph-preview-")
        assert path.parent.stat().st_mode & 0o777 == 0o700 and not path.parent.is_symlink()
    assert list(victim.iterdir()) == []


def test_tokenizer_cache_fallback_is_a_private_folder(tmp_path, monkeypatch) -> None:
    import tempfile

    pytest.importorskip("ftfy")
    from ldmgraph.models import tokenizer

    shared_tmp = tmp_path / "tmp"
    victim = tmp_path / "victim"
    shared_tmp.mkdir()
    victim.mkdir()
    os.symlink(victim, shared_tmp / "ldmgraph-cache")  # planted at the old fixed name
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("LDMGRAPH_CACHE", str(tmp_path / "not-a-folder"))  # the cache cannot be written
    tokenizer._private_fallback.cache_clear()
    try:
        folder = tokenizer.clip_tokenizer_folder()
    finally:
        tokenizer._private_fallback.cache_clear()
    assert (folder / "merges.txt").is_file()
    assert folder.parent.parent == shared_tmp and folder.parent.name.startswith("ldmgraph-cache-")
    assert folder.parent.stat().st_mode & 0o777 == 0o700
    assert list(victim.iterdir()) == []
    shutil.rmtree(folder.parent)


def test_interrupted_run_between_nodes_names_the_node(folder) -> None:
    """SIGINT while a plain node runs (not a file write): exit 130 and the node named."""
    probe = """
import sys, time
import numpy as np
from ldmgraph.nodes import image
original = image.ImageInvert.run
def slow(self, inputs, ctx):
    print("inverting", file=sys.stderr, flush=True)
    time.sleep(60)
image.ImageInvert.run = slow
from ldmgraph.cli import main
sys.exit(main(sys.argv[1:]))
"""
    doc = workflow({"load": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
                    "inv": {"type": "ImageInvert", "inputs": {"image": link("load", "image")}},
                    "save": {"type": "SaveImage", "inputs": {"images": link("inv", "image")}}})
    wf = write_json(folder / "wf.json", doc)
    process = subprocess.Popen([sys.executable, "-c", probe, "run", str(wf), "--output-dir", str(folder / "out"),
                                "--no-progress"], cwd=folder, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None and process.stderr.readline().strip() == "inverting"
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130 and time.monotonic() - started < 30
    assert "'inv' (ImageInvert)" in rest
    assert leftovers(folder / "out") == []
