"""`ldmgraph batch` against hostile tables and output folders, through the CLI in a child process: each
ends with exit 2 and a named code, in bounded time and memory, before any row runs and writing nothing
(no manifest line, no image, no write through a planted link). Plus a property-based fuzz of tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import INPUTS, TXT2IMG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEEP = "[" * 2000 + "1" + "]" * 2000


def run_batch(*args: Any, cwd: Path, timeout: float = 120) -> tuple[int, str, float, int]:
    """`ldmgraph batch ...` in a child: exit code, stderr, seconds, peak RSS (MiB) of the child."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "batch", *map(str, args), "--no-progress"],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stderr, time.monotonic() - start, peak


def refused(tmp_path: Path, code: str, *args: Any, out: Path | None = None) -> str:
    out = out or tmp_path / "out"
    rc, err, seconds, peak = run_batch(TXT2IMG, *args, "--output-dir", out, cwd=tmp_path)
    assert rc == 2 and f"[{code}]" in err and "nothing ran" in err, err[-2000:]
    assert seconds < 90 and peak < 1500, (seconds, peak)
    return err


def test_deep_nesting_in_a_sweep_a_jsonl_line_or_a_csv_cell_is_too_deep(tmp_path: Path) -> None:
    refused(tmp_path, "too_deep", "--sweep", f"cfg={DEEP}")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"})[:-1] + f', "cfg": {DEEP}}}\n')
    refused(tmp_path, "too_deep", "--params", tmp_path / "p.jsonl")
    (tmp_path / "p.csv").write_text(f'prompt,cfg\na,"{DEEP}"\n')
    refused(tmp_path, "too_deep", "--params", tmp_path / "p.csv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_the_table_is_not_a_file(tmp_path: Path, device: str) -> None:
    refused(tmp_path, "not_a_file", "--params", device)


def test_a_fifo_as_the_table_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.csv")
    refused(tmp_path, "not_a_file", "--params", tmp_path / "p.csv")


def test_a_sweep_product_of_400_million_rows_is_refused_without_building_it(tmp_path: Path) -> None:
    values = ",".join(map(str, range(1, 20_001)))
    err = refused(tmp_path, "over_budget", "--sweep", f"seed={values}", "--sweep", f"steps={values}")
    assert "400000000 rows" in err and "--max-rows" in err


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_before_any_row_runs(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    manifest = out / "manifest.jsonl"
    if kind == "folder":
        manifest.mkdir()
    elif kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(victim)
    (tmp_path / "p.csv").write_text("prompt,steps\na red circle,1\n")
    err = refused(tmp_path, "output_not_writable", "--params", tmp_path / "p.csv", out=out)
    assert {"folder": "a folder", "fifo": "a FIFO", "symlink": "a symbolic link"}[kind] in err
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]  # no image was made


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_large_table_whose_last_row_is_invalid_is_refused_naming_it(tmp_path: Path, suffix: str) -> None:
    """200,000 rows stream through the check (about 50,000 rows/s here, see benchmarks/batch_validation.py)."""
    n = 200_000
    table = tmp_path / f"p{suffix}"
    with table.open("w") as f:
        if suffix == ".csv":
            f.write("prompt,seed\n" + "".join(f"a red circle {i},{i}\n" for i in range(n)) + "a bad row,-5\n")
        else:
            f.write("".join(f'{{"prompt": "a red circle {i}", "seed": {i}}}\n' for i in range(n)))
            f.write('{"prompt": "a bad row", "seed": -5}\n')
    err = refused(tmp_path, "out_of_bounds", "--params", table)
    assert f"row {n + 1}, column 'seed'" in err


# --- fuzz: random tables, cells and sweeps through the batch's reading and checking (in-process) -------

_cell = st.one_of(st.text(max_size=12), st.integers(-5, 5).map(str), st.floats(allow_nan=True).map(str),
                  st.sampled_from(["shapes.png", "[1,2]", "{", "\"", "true", "1e400", DEEP[1990:2010]]))


@pytest.fixture(scope="module")
def fuzz_setup() -> Any:
    from batch_helpers import blend_workflow

    from ldmgraph.batch.cli import _socket_name
    from ldmgraph.batch.params import text_parameters
    from ldmgraph.graph.context import Environment
    from ldmgraph.plugins import PluginManager

    registry = PluginManager().registry
    doc = blend_workflow()
    text = text_parameters(doc, lambda t, i: _socket_name(registry, t, i))
    return doc, registry, Environment(input_dir=INPUTS), text


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["csv", "jsonl", "sweep"]), header=st.lists(
    st.sampled_from(["image", "strength", "prefix", "bogus", ""]), min_size=1, max_size=3),
    rows=st.lists(st.lists(_cell, min_size=0, max_size=4), max_size=4))
def test_fuzz_batch_tables_never_crash(tmp_path_factory: Any, fuzz_setup: Any, kind: str, header: list[str],
                                       rows: list[list[str]]) -> None:
    """Every table is either refused with BatchInputError (row and column named) or yields rows that plan
    as the CLI plans them: no other exception, and never more rows than --max-rows."""
    from ldmgraph.batch.params import BatchInputError, open_rows
    from ldmgraph.batch.plan import check_rows, plan_lazily

    doc, registry, env, text = fuzz_setup
    folder = tmp_path_factory.mktemp("fuzz")
    path, sweeps = None, []
    if kind == "csv":
        path = folder / "p.csv"
        lines = [",".join(header)] + [",".join(json.dumps(c) if "," in c else c for c in r) for r in rows]
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    elif kind == "jsonl":
        path = folder / "p.jsonl"
        lines = [json.dumps(dict(zip(header, r, strict=False))) for r in rows] + ["{", "[]"][: len(rows) % 3]
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    else:
        sweeps = [f"{name}={','.join(r)}" for name, r in zip(header, rows or [[]], strict=False)]
    try:
        source = open_rows(path, sweeps, list(doc["parameters"]), text, max_rows=20)
        check_rows(doc, source, registry, env, total=source.total)
    except BatchInputError as exc:
        assert exc.problems and all(isinstance(p, str) and len(p) < 5000 for p in exc.problems)
        return
    planned = list(plan_lazily(doc, source, registry, env))
    assert len(planned) == source.total <= 20
