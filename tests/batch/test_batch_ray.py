"""The Ray backend on a local 2-CPU cluster: same bytes as the local backend, one model load per
worker, and a worker killed mid-batch costs a retry, not a row."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import PROMPTS, TXT2IMG, manifest_lines, prompt_csv
from PIL import Image

from ldmgraph.batch import RayBackend, RayWorkerPool, read_rows, run_batch
from ldmgraph.batch.plan import plan_rows
from ldmgraph.cli import BUNDLED_MODELS, main
from ldmgraph.graph.context import Environment
from ldmgraph.plugins import PluginManager

pytestmark = pytest.mark.slow
SEEDS = "seed=" + ",".join(str(s) for s in range(1, 11))


@pytest.fixture
def one_thread() -> Any:
    """The local backend with one torch thread, as each 1-CPU Ray actor runs (CPU results depend on it)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _batch_json(capsys: pytest.CaptureFixture[str], *args: Any) -> dict[str, Any]:
    code = main(["batch", *map(str, args), "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def test_forty_rows_on_ray_equal_the_local_backend_with_one_load_per_worker(
        ray_cluster: Any, one_thread: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = prompt_csv(tmp_path / "prompts.csv", PROMPTS, steps=2)
    common = (TXT2IMG, "--params", table, "--sweep", SEEDS)
    on_ray = _batch_json(capsys, *common, "--backend", "ray", "--workers", "2", "--output-dir", tmp_path / "ray")
    local = _batch_json(capsys, *common, "--threads", "1", "--output-dir", tmp_path / "local")
    assert on_ray["rows"] == local["rows"] == 40 and on_ray["succeeded"] == local["succeeded"] == 40

    ray_files = sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    assert ray_files == sorted(p.name for p in (tmp_path / "local").glob("*.png"))
    assert ray_files == [f"row{n:05d}_txt2img_00001_.png" for n in range(1, 41)]
    different = [n for n in ray_files if (tmp_path / "ray" / n).read_bytes() != (tmp_path / "local" / n).read_bytes()]
    assert different == []

    # Each worker loaded the models once: as many loads as the local backend made for all 40 rows
    # (the checkpoint and its text encoder), however many rows it ran.
    (local_loads,) = local["model_loads"].values()
    assert local_loads == 2
    assert sorted(on_ray["model_loads"].values()) == [local_loads, local_loads]
    records = manifest_lines(tmp_path / "ray")
    assert sorted(r["row"] for r in records) == list(range(1, 41))
    per_worker = Counter(r["worker"] for r in records)
    assert len(per_worker) == 2 and min(per_worker.values()) >= 5

    row = records[17]  # the PNG carries its row's resolved parameters
    with Image.open(io.BytesIO((tmp_path / "ray" / row["outputs"][0]).read_bytes())) as image:
        embedded = json.loads(image.text["ldmgraph:parameters"])
    assert {k: embedded[k] for k in ("prompt", "seed", "steps")} == row["params"]


class _KillOneWorkerMidBatch(RayBackend):
    """Kills the busiest actor after the second row comes back."""

    killed: str = ""

    def run(self, doc: Any, rows: Any) -> Any:
        import ray

        for index, outcome in enumerate(super().run(doc, rows)):
            if index == 1:
                victim = max(self.pool.slots, key=lambda slot: slot.inflight)
                assert victim.inflight > 0
                self.killed = victim.name
                ray.kill(victim.actor)
            yield outcome


def test_a_worker_killed_mid_batch_costs_a_retry_not_a_row(ray_cluster: Any, tmp_path: Path) -> None:
    doc = json.loads(TXT2IMG.read_text(encoding="utf-8"))
    env = Environment(input_dir=tmp_path, output_dir=tmp_path / "out", model_dirs=(BUNDLED_MODELS,))
    declared = list(doc["parameters"])
    rows = read_rows(prompt_csv(tmp_path / "p.csv", PROMPTS[:2], steps=2), ["seed=1,2,3,4"], declared,
                     {"prompt"})
    planned = plan_rows(doc, rows, PluginManager().registry, env)
    # Workers write straight into the (shared) output folder here; the 40-row test sends bytes back.
    backend = _KillOneWorkerMidBatch(RayWorkerPool(env, workers=2, write_dir=env.output_dir))
    try:
        summary = run_batch(doc, planned, backend, env.output_dir, progress=False)
        stats = {s["name"]: s for s in backend.pool.worker_stats()}
    finally:
        backend.close()
    assert summary.ok == 8 and summary.failed == 0
    assert not stats[backend.killed]["alive"]
    records = manifest_lines(env.output_dir)
    assert sorted(r["row"] for r in records) == list(range(1, 9))  # every row, each once
    retried = [r for r in records if r["attempts"] == 2]
    assert retried and summary.retried == len(retried)
    for record in retried:
        assert "died" in record["retried"][0] and record["worker"].startswith("w")
        assert not record["worker"].startswith(backend.killed + "@")
    pngs = sorted(p.name for p in env.output_dir.glob("*.png"))
    assert pngs == [f"row{n:05d}_txt2img_00001_.png" for n in range(1, 9)]
