"""Prompt weights `(word:1.2)`, `(word)`, `[word]`, nesting and `\\(` escapes, against ComfyUI's rule in closed form.

ComfyUI's reading of the brackets (comfy/sd1_clip.py, checked there): a group multiplies the weight by
1.1, `:w` after a group's last colon sets it to w outright, `\\(` is a literal bracket. Its rule for a
token of weight w != 1: z' = (z - z_empty) * w + z_empty, z_empty the encoding of the empty prompt at
that position. The references below run transformers' CLIPTextModel and BertModel on the same
weights and ids and apply that formula by hand; ours go through TextEncode in the executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldmgraph.graph.context import Environment
from ldmgraph.graph.executor import Executor
from ldmgraph.interop.comfyui import to_workflow
from ldmgraph.models.prompt_weights import Piece, parse_prompt, parse_weights, weighted_clauses
from ldmgraph.models.text_encoders import split_clauses
from ldmgraph.models.tokenizer import BOS_ID, EOS_ID, default_clip_tokenizer
from ldmgraph.plugins import load_registry
from ldmgraph.train.export import BUNDLED_NAMES, assets_dir

TOL = 1e-5


# --- parsing: ComfyUI's facts ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("a (red:1.3) circle", [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
    ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.5), (" c", 1.1)]),  # an explicit weight is absolute
    ("((b:0.5))", [("b", 0.5)]),
    ("(a b:.25)", [("a b", 0.25)]),
    ("\\(red\\) and \\[x\\]", [("(red) and [x]", 1.0)]),
    ("(\\(red\\):1.2)", [("(red)", 1.2)]),
    ("a (b", [("a (b", 1.0)]),  # an opener without its closer is text
    ("a) b]", [("a) b]", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # what follows the colon is not a number: text
    ("(:1.2)", [(":1.2", 1.1)]),  # a colon first is text (ComfyUI's rfind > 0)
    ("", []),
])
def test_prompt_weight_parsing_follows_comfyui(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=0, rel=0)


@pytest.mark.parametrize(("text", "expected"), [
    ("[red] (blue)", [("[red] ", 1.0), ("blue", 1.1)]),
    ("\\[red\\] \\(x\\)", [("\\[red\\] (x)", 1.0)]),  # ComfyUI escapes only round brackets
    ("[(a])", [("[", 1.0), ("a]", 1.1)]),
])
def test_prompt_weight_parsing_without_square_brackets_as_comfyui(text, expected):
    assert parse_weights(text, brackets=False) == expected


def test_prompt_weight_embedding_references_are_pieces():
    pieces = parse_prompt("a (embedding:style.pt:1.2), embedding:other in the centre")
    assert pieces == [Piece("a "), Piece("embedding:style.pt", 1.2, "style.pt"), Piece(", "),
                      Piece("embedding:other", 1.0, "other"), Piece(" in the centre")]
    assert parse_prompt("myembedding:x,embedding:y") == [Piece("myembedding:x,"), Piece("embedding:y", 1.0, "y")]


@pytest.mark.parametrize("text", ["a red circle on the left and a blue square, a pink triangle; the top",
                                  "  one  and two and three and four and five and six ", "single"])
def test_prompt_weight_clauses_split_as_the_plain_text(text):
    clauses = weighted_clauses([Piece(text)], 4)
    assert ["".join(p.text for p in c) for c in clauses] == split_clauses(text, 4)


# --- CLIP (a tiny SD1 checkpoint) ------------------------------------------------------------------------


def run_text_encode(models: tuple[Path, ...], ckpt: str, text: str, **extra: Any) -> Any:
    doc = {"format": "ldmgraph/1", "nodes": {
        "ckpt": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt}},
        "positive": {"type": "TextEncode", "inputs": {
            "text_encoder": {"node": "ckpt", "output": "text_encoder"}, "text": text, **extra}},
    }}
    env = Environment(input_dir=models[0], output_dir=models[0] / "out", model_dirs=models)
    return Executor(load_registry(), env).run(doc, outputs=["positive"]).outputs["positive"]["conditioning"][0]


def clip_window(ids: list[int]) -> list[int]:
    row = [BOS_ID, *ids, EOS_ID]
    return row + [EOS_ID] * (77 - len(row))  # SD1 pads with EOS


@torch.no_grad()
def clip_reference(model: Any, windows: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
    """transformers CLIPTextModel per window, then ComfyUI's rule by hand, token by token."""
    z = model(input_ids=torch.tensor(windows)).last_hidden_state
    empty = model(input_ids=torch.tensor([clip_window([])])).last_hidden_state[0]
    out = z.clone()
    for i, row in enumerate(weights):
        for j, w in enumerate(row):
            if w != 1.0:
                out[i, j] = (z[i, j] - empty[j]) * w + empty[j]
    return out.reshape(1, -1, z.shape[-1])


@pytest.mark.reference
def test_prompt_weight_clip_matches_comfyui_closed_form(sd1_file, tiny_clip):
    tok = default_clip_tokenizer()
    a, red, circle = tok.ids("a"), tok.ids("red"), tok.ids("circle on the left")
    ours = run_text_encode((sd1_file.parent,), sd1_file.name, "a ((red)) [circle on the left]").context
    weights = [1.0] + [1.0] * len(a) + [1.1 * 1.1] * len(red) + [1 / 1.1] * len(circle)
    expected = clip_reference(tiny_clip, [clip_window(a + red + circle)], [weights + [1.0] * (77 - len(weights))])
    assert ours.shape == expected.shape == (1, 77, 128)
    assert (ours - expected).abs().max().item() < TOL
    plain = run_text_encode((sd1_file.parent,), sd1_file.name, "a red circle on the left").context
    assert (plain - ours).abs().max().item() > 1e-3  # the weights changed something


@pytest.mark.reference
def test_prompt_weight_clip_long_prompt_keeps_its_75_token_windows(sd1_file, tiny_clip):
    tok = default_clip_tokenizer()
    words = " ".join(f"word{i}" for i in range(40))  # > 75 tokens: two windows
    ids_head, ids_tail = tok.ids(words), tok.ids("castle")
    ours = run_text_encode((sd1_file.parent,), sd1_file.name, f"{words} (castle:1.4)").context
    ids = ids_head + ids_tail
    weights = [1.0] * len(ids_head) + [1.4] * len(ids_tail)
    assert len(ids) > 75
    windows = [clip_window(ids[:75]), clip_window(ids[75:])]
    rows = [[1.0, *weights[:75], 1.0], [1.0, *weights[75:]] + [1.0] * (76 - len(weights[75:]))]
    expected = clip_reference(tiny_clip, windows, rows)
    assert ours.shape == expected.shape == (1, 154, 128)
    assert (ours - expected).abs().max().item() < TOL


@pytest.mark.reference
def test_prompt_weight_in_an_imported_comfyui_graph(sd1_file, tiny_clip):
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd1_file.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a (red:1.3) circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a [red] circle"}},
    }
    doc = to_workflow(api)
    env = Environment(input_dir=sd1_file.parent, output_dir=sd1_file.parent / "out", model_dirs=(sd1_file.parent,))
    result = Executor(load_registry(), env).run(doc, outputs=["2", "3"])
    ours = result.outputs["2"]["conditioning"][0].context
    # ComfyUI reads square brackets as text: the imported prompt is the plain text "a [red] circle"
    literal = clip_reference(tiny_clip, [clip_window(default_clip_tokenizer().ids("a [red] circle"))], [[1.0] * 77])
    assert (result.outputs["3"]["conditioning"][0].context - literal).abs().max().item() < TOL
    tok = default_clip_tokenizer()
    a, red, circle = tok.ids("a"), tok.ids("red"), tok.ids("circle")
    weights = [1.0] * (1 + len(a)) + [1.3] * len(red) + [1.0] * (76 - len(a) - len(red))
    expected = clip_reference(tiny_clip, [clip_window(a + red + circle)], [weights])
    assert (ours - expected).abs().max().item() < TOL


def test_prompt_weight_unweighted_prompt_is_the_plain_encoding_bit_for_bit(sd1_file):
    with_escapes = run_text_encode((sd1_file.parent,), sd1_file.name, "a (red:1.0) circle").context
    plain = run_text_encode((sd1_file.parent,), sd1_file.name, "a red circle").context
    assert torch.equal(with_escapes, plain)


# --- the bundled MiniLM encoder (BERT-tokenised, clause tokens) -------------------------------------


@pytest.fixture(scope="module")
def bert() -> Any:
    from transformers import BertModel, BertTokenizerFast

    from ldmgraph.models.text_encoders import minilm_folder

    folder = str(minilm_folder())
    return BertModel.from_pretrained(folder, local_files_only=True).eval(), BertTokenizerFast.from_pretrained(
        folder, local_files_only=True)


@torch.no_grad()
def bert_weighted(bert: Any, parts: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' BertModel on [CLS] parts [SEP] [PAD].. (32 tokens), ComfyUI's rule per token by hand,
    then the attention-mask mean (sentence-transformers' pooling) of the weighted states."""
    model, tokenizer = bert
    ids, weights = [tokenizer.cls_token_id], [1.0]
    for text, w in parts:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, weights = ids + piece, weights + [w] * len(piece)
    ids, weights = ids + [tokenizer.sep_token_id], weights + [1.0]
    mask = [1] * len(ids) + [0] * (32 - len(ids))
    ids, weights = ids + [0] * (32 - len(ids)), weights + [1.0] * (32 - len(weights))
    z = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask])).last_hidden_state[0]
    empty_batch = tokenizer([""], padding="max_length", max_length=32, return_tensors="pt")
    empty = model(**empty_batch).last_hidden_state[0]
    out = z.clone()
    for j, w in enumerate(weights):
        if w != 1.0:
            out[j] = (z[j] - empty[j]) * w + empty[j]
    m = torch.tensor(mask, dtype=out.dtype)[:, None]
    return out, (out * m).sum(0) / m.sum()


@pytest.mark.reference
def test_prompt_weight_bundled_minilm_clause_tokens_match_closed_form(bert):
    prompt = "a (red:1.4) circle on the left and a [[blue square]] at the top"
    ours = run_text_encode((assets_dir(),), BUNDLED_NAMES["ldm"], prompt).context
    _, first = bert_weighted(bert, [("a ", 1.0), ("red", 1.4), (" circle on the left", 1.0)])
    _, second = bert_weighted(bert, [("a ", 1.0), ("blue square", 1 / 1.1 / 1.1), (" at the top", 1.0)])
    _, empty = bert_weighted(bert, [])
    expected = torch.stack([first, second, empty, empty])[None]
    assert ours.shape == (1, 4, 384)  # the shipped model reads four clause tokens only
    assert (ours - expected).abs().max().item() < TOL


@pytest.mark.reference
def test_prompt_weight_minilm_per_word_context_matches_closed_form(bert):
    from ldmgraph.models.text_encoders import shared_minilm

    ours = shared_minilm().encode_prompt("a (large:1.3) green (triangle)")
    context, pooled = bert_weighted(bert, [("a ", 1.0), ("large", 1.3), (" green ", 1.0), ("triangle", 1.1)])
    assert (ours.context[0] - context).abs().max().item() < TOL
    assert (ours.pooled[0] - pooled).abs().max().item() < TOL
