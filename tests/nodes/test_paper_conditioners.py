"""The paper's conditioning paths are conditioners registered through the `ldmgraph_conditioners`
hook (as a third party's would be), with the sockets saved workflows use; layouts take class names.

The class numbering is checked against the original layout data's rule (taming-transformers'
annotated-objects dataset: the allowed Open Images classes, less the ones merged for COCO
compatibility, numbered by sorted MID with /m/01s55n moved last)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ldmgraph.cli import main
from ldmgraph.models.layouts import (
    LAYOUT_CLASSES_FILE,
    MERGED_CLASSES,
    LayoutError,
    class_number,
    layout_class_names,
    layout_tokens,
    parse_layout,
)
from ldmgraph.plugins import PluginManager

REPO = Path(__file__).resolve().parents[2]
LAYOUT_WORKFLOW = REPO / "workflows" / "paper" / "layout.json"
BUNDLED = "ldmgraph-shapes-txt2img.safetensors"  # any checkpoint with a text encoder: validation only

# conditioner -> (route, its own inputs (saved workflows set these), outputs)
PAPER_CONDITIONERS = {
    "ClassConditioning": ("crossattn", {"model", "class_name"}, {"positive", "negative"}),
    "UnconditionalConditioning": ("crossattn", set(), {"conditioning"}),
    "PaperInpaintConditioning": ("concat", {"vae", "image", "mask"}, {"positive", "negative", "latent"}),
    "SegmentationConditioning": ("concat", {"model", "segmentation"}, {"positive", "negative", "latent"}),
    "LDSRConditioning": ("concat", {"model", "image"}, {"positive", "negative", "latent"}),
    "LayoutConditioning": ("crossattn", {"text_encoder", "layout"}, {"positive", "negative"}),
}


def test_paper_conditioning_registers_through_the_conditioner_hook() -> None:
    registry = PluginManager(use_env=False).registry
    for name, (route, inputs, outputs) in PAPER_CONDITIONERS.items():
        assert registry.owner("conditioner", name) == "ldmgraph.nodes.paper_conditioning", name
        node = registry.nodes[name]
        assert node.route == route, name
        sides = {"positive", "negative"} & outputs  # optional: a side without them starts from one empty entry
        fields = node.Inputs.model_fields
        assert set(fields) == inputs | sides and not any(fields[s].is_required() for s in sides), name
        assert set(node.Outputs.model_fields) == outputs, name


def test_layout_classes_are_numbered_as_the_original_dataset() -> None:
    rows = [line.split("\t") for line in LAYOUT_CLASSES_FILE.read_text().splitlines() if not line.startswith("#")]
    mids = [mid for _, mid, _ in rows]
    assert [int(n) for n, _, _ in rows] == list(range(340))
    assert mids == [*sorted(m for m in mids if m != "/m/01s55n"), "/m/01s55n"]
    assert len(set(layout_class_names())) == 340 and not set(MERGED_CLASSES) & set(layout_class_names())
    assert class_number("Person") == layout_class_names().index("Person")
    # the original merged these into their target class for COCO compatibility
    assert class_number("woman") == class_number("MAN") == class_number("Person")
    assert class_number("Wall clock") == class_number("clock")


def test_layout_names_give_the_tokens_of_their_numbers() -> None:
    person, dog = class_number("Person"), class_number("Dog")
    by_name = parse_layout('[["Person", 0.1, 0.5, 0.4, 0.45], [" dog ", 0.55, 0.1, 0.4, 0.4]]')
    by_number = parse_layout(f"[[{person}, 0.1, 0.5, 0.4, 0.45], [{dog}, 0.55, 0.1, 0.4, 0.4]]")
    assert by_name == by_number
    tokens = layout_tokens([o.as_tuple() for o in by_name])
    assert tokens[0] == person and tokens[3] == dog and len(tokens) == 92


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        ('[["Persn", 0.1, 0.1, 0.2, 0.2]]', "object 1: 'Persn' is not a class of the layout model; close matches: 'Person'"),
        ('[["Dog", 0.1, 0.1, 0.2, 0.2], ["Bycicle", 0.5, 0.5, 0.2, 0.2]]', "object 2: 'Bycicle'"),
        ('[["Dog", 0.9, 0.1, 0.2, 0.2]]', "not inside the image"),
        ('[["Dog", 0.1, 0.1]]', "must be [class, x, y, width, height]"),
        ("[[1.5, 0.1, 0.1, 0.2, 0.2]]", "neither a class name nor a class number"),
    ],
)
def test_bad_layouts_are_named_precisely(layout: str, fragment: str) -> None:
    with pytest.raises(LayoutError) as error:
        parse_layout(layout)
    assert fragment in str(error.value)


def _layout_workflow(tmp_path: Path, layout: str) -> Path:
    doc = json.loads(LAYOUT_WORKFLOW.read_text())
    doc["nodes"]["ckpt"]["inputs"]["ckpt_name"] = BUNDLED
    doc["nodes"]["layout"]["inputs"]["layout"] = layout
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(doc))
    return path


def test_an_unknown_class_name_fails_validation_naming_node_input_and_close_matches(
    tmp_path: Path, capsys: Any
) -> None:
    path = _layout_workflow(tmp_path, '[["Person", 0.1, 0.5, 0.4, 0.45], ["Hourse", 0.55, 0.1, 0.4, 0.4]]')
    assert main(["validate", str(path), "--json"]) != 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["node_id"], p["input"], p["code"]) for p in problems] == [("layout", "layout", "not_in_choices")]
    message = problems[0]["message"]
    assert "LayoutConditioning" in message and "'Hourse'" in message and "'Horse'" in message and "'House'" in message


def test_validating_a_layout_by_names_does_not_import_torch(tmp_path: Path) -> None:
    path = _layout_workflow(tmp_path, '[["Person", 0.1, 0.5, 0.4, 0.45]]')
    code = (
        "import sys; from ldmgraph.cli import main; "
        f"rc = main(['validate', {str(path)!r}]); sys.exit(rc or ('torch' in sys.modules) * 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
