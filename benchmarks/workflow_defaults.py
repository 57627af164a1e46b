"""Do the saved workflows deliver what their own defaults ask for? The judge reads each one's images.

    python benchmarks/workflow_defaults.py                 # seeds 1-16, 128 two-object captions
    python benchmarks/workflow_defaults.py --seeds 4 --pairs 32 --only txt2img   # quicker

Each workflow in workflows/ runs through the Executor exactly as saved (its own prompt, sampler,
steps, cfg, denoise and inputs), only the seed changed, and the saved PNG is read back by the
procedural judge (ldmgraph/train/data/judge.py), which reads colour, shape and position:

- txt2img, img2img, hires_fix: the objects the prompt names ("a red circle on the left and ...").
- inpaint: the shape the prompt names, inside the masked centre box.
- superres: what the judge reads in the high-resolution original of the low-resolution input
  (workflows/inputs/make_inputs.py), read in the output.
- area_composition: each area's prompt, read inside that area (its own crop, where positions are
  the area's own), and no other shape in that area.

A seed counts only if every object's colour, shape and position is read right and the judge finds
no other shape on the image (a purple background, a seam or a stray blob is a shape to the judge:
any high-chroma region of at least ten pixels). A workflow's figure is the fraction of seeds that
count. The two-object figures are those of ``ldmgraph evaluate`` (captions naming two held-out
colour-shape-position combinations at opposite positions, dpmpp_2m/karras, 20 steps, cfg 4).

Last line: ``txt2img=<f> img2img=<f> inpaint=<f> superres=<f> hires_fix=<f> area_composition=<f>
two_object_color=<f> two_object_shape=<f> two_object_position=<f>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ldmgraph.train.data.judge import Reading, read_image  # noqa: E402
from ldmgraph.train.data.vocab import COLOURS, POSITION_PHRASES, SHAPES, Combo  # noqa: E402

WORKFLOWS = ROOT / "workflows"
NAMES = ("txt2img", "img2img", "inpaint", "superres", "hires_fix", "area_composition")
CENTRE_BOX = (16, 16, 48, 48)  # the hole of workflows/inputs/mask_centre.png (x0, y0, x1, y1)
_PHRASE = re.compile(
    rf"(?:a|an) (?:small |large )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(re.escape(p) for p in POSITION_PHRASES.values())})"
)


def combos_of(prompt: str) -> list[Combo]:
    """The (colour, shape, position) objects a prompt in the training captions' grammar names."""
    position_of = {phrase: word for word, phrase in POSITION_PHRASES.items()}
    return [(c, s, position_of[p]) for c, s, p in _PHRASE.findall(prompt)]


def text_of(doc: dict[str, Any], node_id: str) -> str:
    if node_id not in doc["nodes"]:  # built from components: the text is where the prompt parameter goes
        target = doc["parameters"]["prompt" if node_id == "positive" else "negative_prompt"]["targets"][0]
        return str(doc["nodes"][target["node"]]["inputs"][target["input"]])
    return str(doc["nodes"][node_id]["inputs"]["text"])


def areas(doc: dict[str, Any]) -> list[tuple[str, tuple[int, int, int, int], str]]:
    """(node, pixel box x0 y0 x1 y1, prompt) of each ConditioningSetArea fed by a prompt that names objects."""
    out = []
    for node_id, node in doc["nodes"].items():
        if node["type"] != "ConditioningSetArea":
            continue
        inputs = node["inputs"]
        source = doc["nodes"][inputs["conditioning"]["node"]]
        prompt = str(source["inputs"].get("text", "")) if source["type"] == "TextEncode" else ""
        if combos_of(prompt):
            x, y = inputs.get("x", 0), inputs.get("y", 0)
            out.append((node_id, (x, y, x + inputs.get("width", 64), y + inputs.get("height", 64)), prompt))
    return out


def reads(readings: list[Reading], wanted: list[Combo]) -> bool:
    """Every wanted object is read (in any order) and there is no other shape."""
    return len(readings) == len(wanted) and sorted(r.combo for r in readings) == sorted(wanted)


def superres_truth() -> list[Combo]:
    """What the judge reads in the original that the super-resolution input was made from."""
    spec = importlib.util.spec_from_file_location("make_inputs", WORKFLOWS / "inputs" / "make_inputs.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    original = np.asarray(module.green_triangle(), np.float32) / 255
    return [r.combo for r in read_image(original)]


def judge(name: str, doc: dict[str, Any], image: np.ndarray) -> tuple[bool, str]:
    """(does this image deliver what the workflow asks, what the judge read)."""
    if name == "area_composition":
        ok, seen = True, []
        for node, (x0, y0, x1, y1), prompt in areas(doc):
            got = read_image(image[y0:y1, x0:x1])
            ok &= reads(got, combos_of(prompt))
            seen.append(f"{node}: {[r.combo for r in got]}")
        return ok, "; ".join(seen)
    got = read_image(image)
    if name == "inpaint":
        wanted = combos_of(text_of(doc, "positive"))
        x0, y0, x1, y1 = CENTRE_BOX
        inside = [r for r in got if x0 <= r.cx < x1 and y0 <= r.cy < y1]
        return reads(inside, wanted), str([r.combo for r in inside])
    wanted = superres_truth() if name == "superres" else combos_of(text_of(doc, "positive"))
    return reads(got, wanted), str([r.combo for r in got])


def run_workflow(executor: Any, doc: dict[str, Any], seed: int) -> np.ndarray:
    from PIL import Image

    result = executor.run(doc, overrides={"seed": seed})
    with Image.open(result.files[-1]) as png:
        image = np.asarray(png.convert("RGB"), np.float32) / 255
    for path in result.files:
        path.unlink()
    return image


def workflow_scores(names: list[str], seeds: list[int], save: Path | None, models: Path) -> dict[str, float]:
    from ldmgraph.graph.context import Environment
    from ldmgraph.graph.executor import Executor
    from ldmgraph.plugins import load_registry
    from ldmgraph.train.common import save_grid

    out = Path(tempfile.mkdtemp(prefix="ldmgraph-defaults-"))
    env = Environment(input_dir=WORKFLOWS / "inputs", output_dir=out, model_dirs=(models,))
    executor = Executor(load_registry(), env)
    scores = {}
    for name in names:
        doc = json.loads((WORKFLOWS / f"{name}.json").read_text())
        hits, images = [], []
        for seed in seeds:
            image = run_workflow(executor, doc, seed)
            ok, seen = judge(name, doc, image)
            hits.append(ok)
            images.append(image)
            print(f"{name} seed {seed}: {'ok ' if ok else 'BAD'} {seen}", file=sys.stderr, flush=True)
        scores[name] = float(np.mean(hits))
        print(f"{name}: {scores[name]:.3f}", file=sys.stderr, flush=True)
        if save is not None:
            save_grid(np.stack(images), save / f"{name}.png", columns=8 if images[0].shape[1] == 64 else 4)
    out.rmdir()
    return scores


def two_object_scores(pairs: int, models: Path) -> dict[str, float]:
    """``ldmgraph evaluate``'s two-object figures for the text-to-image model in ``models``."""
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.evaluate import two_object_figures
    from ldmgraph.train.export import BUNDLED_NAMES

    return two_object_figures(load_checkpoint(models / BUNDLED_NAMES["ldm"]), pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16, help="seeds 1..N per workflow")
    parser.add_argument("--pairs", type=int, default=128, help="two-object captions (ldmgraph evaluate: 128)")
    parser.add_argument("--only", nargs="*", choices=NAMES, default=list(NAMES), help="workflows to run")
    parser.add_argument("--save", type=Path, default=None, help="save each workflow's images as a grid here")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder of the bundled files to score (default: the shipped ones), e.g. a candidate")
    args = parser.parse_args()
    from ldmgraph.train.export import assets_dir

    models = args.models or assets_dir()

    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    scores = workflow_scores(args.only, list(range(1, args.seeds + 1)), args.save, models)
    two = two_object_scores(args.pairs, models) if args.pairs else {}
    figures = {name: scores.get(name, float("nan")) for name in NAMES}
    figures.update({f"two_object_{'color' if k == 'colour' else k}": two.get(k, float("nan"))
                    for k in ("colour", "shape", "position")})
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
