"""The conditioning ablation's report over seeds, through its command line (``--report-only``) on
synthetic per-seed results: the pooled t-interval and Welch's interval against values worked by hand,
the verdicts ("not distinguishable at this budget" for an overlapping pair, the better variant named
for a separated one) and the last line's fields."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977934  # ... with 4 (Welch's df for two samples of 3 with equal variances)
NAMES = ("xattn_frozen", "xattn_joint", "vector_only", "xattn_lowres_only")


def ablation() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conditioning_ablation", ROOT / "benchmarks" / "conditioning_ablation.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_record(two: float, final_samples: int = 256) -> dict[str, Any]:
    """One seed's record as the study writes it: milestone scores at 500 and 1500, the final set at 1500."""
    scores = {"one_colour": 0.9, "one_shape": 0.8, "one_position": 0.95, "one_mean": two + 0.2,
              "two_colour": two, "two_shape": two, "two_position": two, "two_mean": two}
    return {"trained_to": 1500, "timed_steps": 1500, "train_cpu_seconds": 900.0, "sample_step_cpu_ms": 60.0,
            "params_trained": 1_714_308, "params_inference": 24_427_524,
            "scores": {"500": {**scores, "two_mean": two - 0.1}, "1500": scores},
            "final": {"step": 1500, "samples": final_samples, "scores": scores}}


def report(tmp_path: Path, capsys: pytest.CaptureFixture[str], per_seed: dict[str, list[float]]
           ) -> tuple[str, dict[str, str], Path]:
    """Write ``results.json`` for these per-seed final scores, run ``--report-only``; (page, last-line fields, docs)."""
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    variants = {n: {"seeds": {str(k): run_record(v) for k, v in enumerate(values)}} for n, values in per_seed.items()}
    (out / "results.json").write_text(json.dumps({"variants": variants}))
    seeds = max(len(v) for v in per_seed.values())
    rc = ablation().main(["--report-only", "--seeds", str(seeds), "--steps", "1500", "--eval-every", "1000",
                          "--out", str(out), "--docs", str(docs)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return (docs / "README.md").read_text(), dict(field.split("=") for field in last.split()), docs


def test_ablation_report_separated_best_and_overlapping_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page, last, docs = report(tmp_path, capsys, {
        "xattn_frozen": [0.80, 0.82, 0.81],       # mean 0.81, s 0.01
        "xattn_joint": [0.55, 0.60, 0.50],        # mean 0.55, s 0.05
        "vector_only": [0.40, 0.42, 0.41],        # mean 0.41, s 0.01
        "xattn_lowres_only": [0.52, 0.58, 0.49],  # mean 0.53: within xattn_joint's spread
    })
    assert list(last) == [*NAMES, "best", "best_separated"]
    assert [float(last[n]) for n in NAMES] == [0.81, 0.55, 0.41, 0.53]
    assert last["best"] == "xattn_frozen" and last["best_separated"] == "yes"

    half = T_975_DF2 * 0.01 / math.sqrt(3)  # the t-interval over three seeds, by hand
    assert f"| 3 of 3 | 0.810 [{0.81 - half:.3f}, {0.81 + half:.3f}] |" in page
    welch = T_975_DF4 * math.sqrt(0.01**2 / 3 + 0.01**2 / 3)  # equal variances and sizes: df = 4
    assert f"| xattn_frozen - vector_only | +0.400 | [{0.4 - welch:+.3f}, {0.4 + welch:+.3f}] | xattn_frozen better |" in page
    overlapping = next(line for line in page.splitlines() if line.startswith("| xattn_joint - xattn_lowres_only |"))
    assert overlapping.startswith("| xattn_joint - xattn_lowres_only | +0.020 |")
    assert overlapping.endswith("| not distinguishable at this budget |")
    assert "| vector_only - xattn_lowres_only | -0.120 |" in page and "xattn_lowres_only better" in page
    assert "t-interval over seeds" in page and f"`{' '.join(f'{k}={v}' for k, v in last.items())}`" in page
    with Image.open(docs / "score_vs_steps.png") as img:
        assert img.size == (720, 440)


def test_ablation_report_best_not_separated_when_intervals_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page, last, _ = report(tmp_path, capsys, {
        "xattn_frozen": [0.60, 0.70, 0.50],
        "xattn_joint": [0.55, 0.60, 0.50],
        "vector_only": [0.40, 0.42, 0.41],
        "xattn_lowres_only": [0.30, 0.31, 0.32],
    })
    assert last["best"] == "xattn_frozen" and last["best_separated"] == "no"
    assert "| xattn_frozen - xattn_joint | +0.050 |" in page
    assert "not separated from every other variant at this budget" in page


def test_ablation_report_one_seed_separates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page, last, _ = report(tmp_path, capsys, {"xattn_frozen": [0.595], "xattn_joint": [0.554],
                                      "vector_only": [0.410], "xattn_lowres_only": [0.533]})
    assert last == {"xattn_frozen": "0.595", "xattn_joint": "0.554", "vector_only": "0.410",
                    "xattn_lowres_only": "0.533", "best": "xattn_frozen", "best_separated": "no"}
    verdicts = [line.rsplit("|", 2)[1].strip() for line in page.splitlines() if "| unbounded (1 seed) |" in line]
    assert len(verdicts) == 6 and set(verdicts) == {"not distinguishable at this budget"}


def test_ablation_report_continues_a_one_seed_study_from_before_seeds(tmp_path: Path) -> None:
    """results.json of the first study kept each variant's scores at its top; they are that study's seed."""
    out = tmp_path / "out"
    out.mkdir()
    legacy = {n: {k: v for k, v in run_record(two).items() if k != "final"}
              for n, two in zip(NAMES, (0.595, 0.554, 0.410, 0.533), strict=True)}
    (out / "results.json").write_text(json.dumps({"variants": legacy}))
    module = ablation()
    args = module.parse(["--report-only", "--final-samples", "0", "--out", str(out), "--docs", str(tmp_path / "d")])
    results = module.load_results(out / "results.json", 0)
    assert module.last_line(args, results, list(NAMES)) == (
        "xattn_frozen=0.595 xattn_joint=0.554 vector_only=0.410 xattn_lowres_only=0.533 best=xattn_frozen "
        "best_separated=no")
    # with the larger final set asked for, these runs are not finished: the page says what is missing
    args = module.parse(["--report-only", "--out", str(out), "--docs", str(tmp_path / "d")])
    assert "0 of 4 runs" in module.progress_text(args, results, list(NAMES))


@pytest.mark.parametrize("bad", [["--seeds", "0"], ["--final-samples", "-1"]])
def test_ablation_rejects_bad_seed_counts(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        ablation().parse(bad)


def test_two_processes_with_disjoint_variants_share_one_results_file(tmp_path: Path) -> None:
    """Two ``--only`` processes on one ``--out``: each save keeps the other's variants as they are on
    disk, even when the saving process read the file before the other one wrote."""
    module = ablation()
    path = tmp_path / "results.json"
    first = {"variants": {"xattn_frozen": {"seeds": {"0": run_record(0.6)}}}}
    second = {"variants": {"vector_only": {"seeds": {"0": run_record(0.4)}}}}  # read before the first saved
    module.save_results(path, first, ["xattn_frozen", "xattn_joint"])
    module.save_results(path, second, ["vector_only", "xattn_lowres_only"])
    first["variants"]["xattn_frozen"]["seeds"]["1"] = run_record(0.7)  # the first process goes on
    module.save_results(path, first, ["xattn_frozen", "xattn_joint"])
    on_disk = json.loads(path.read_text())["variants"]
    assert sorted(on_disk) == ["vector_only", "xattn_frozen"]
    assert sorted(on_disk["xattn_frozen"]["seeds"]) == ["0", "1"]
    assert on_disk["vector_only"]["seeds"]["0"]["final"]["scores"]["two_mean"] == 0.4
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file left beside it
