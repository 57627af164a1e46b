"""Clause tokens: one pooled MiniLM vector per clause of the caption, appended to its context.

They are what a model needs to bind attributes to objects in "a red circle on the left and a blue
square on the right": each clause token carries one object's colour, shape and place together. The
checks: the tokens are exactly the clauses' own pooled encodings, the pool and a training batch carry
them, and a model trained with them exports, loads and runs through a saved workflow with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_training import ae_run, jitter_unet, saved_txt2img_images, tiny_pool, tiny_unet

from ldmgraph.models.text_encoders import encode_minilm, shared_minilm, split_clauses
from ldmgraph.train.ldm import LDMConfig, make_batch, train_ldm

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["", "a red circle on the left", "a blue square at the top",
            "a green triangle on the right and a small yellow circle at the bottom",
            "a red square on the left, a blue circle on the right and a green triangle at the top"]


def test_prompts_split_into_clauses_at_and_and_commas() -> None:
    assert split_clauses(CAPTIONS[3], 4) == ["a green triangle on the right", "a small yellow circle at the bottom"]
    assert split_clauses(CAPTIONS[4], 4) == ["a red square on the left", "a blue circle on the right",
                                             "a green triangle at the top"]
    assert split_clauses(CAPTIONS[4], 2) == ["a red square on the left",
                                             "a blue circle on the right and a green triangle at the top"]
    assert split_clauses("", 4) == [] and split_clauses("a sandy band; AND more", 4) == ["a sandy band", "more"]


def test_clause_tokens_are_each_clauses_own_pooled_encoding() -> None:
    plain = encode_minilm(CAPTIONS)
    tokens = encode_minilm(CAPTIONS, clause_tokens=3)
    assert plain.shape == (5, 32, 384) and tokens.shape == (5, 35, 384)
    assert torch.equal(tokens[:, :32], plain)  # the caption's own context is unchanged
    alone = {text: shared_minilm().encode([text]).pooled[0] for text in
             ["", "a green triangle on the right", "a small yellow circle at the bottom", "a red circle on the left"]}
    torch.testing.assert_close(tokens[3, 32], alone["a green triangle on the right"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[3, 33], alone["a small yellow circle at the bottom"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[3, 34], alone[""], rtol=0, atol=1e-5)  # an empty slot
    torch.testing.assert_close(tokens[1, 32], alone["a red circle on the left"], rtol=0, atol=1e-5)
    for slot in range(32, 35):  # the empty caption of classifier-free guidance: every slot empty
        torch.testing.assert_close(tokens[0, slot], alone[""], rtol=0, atol=1e-5)


def test_the_pool_and_a_batch_carry_the_clause_tokens(tmp_path: Path) -> None:
    from ldmgraph.train.pool import clause_contexts

    save_file({"contexts": encode_minilm(CAPTIONS)}, str(tmp_path / "contexts.safetensors"),
              metadata={"captions": json.dumps(CAPTIONS)})
    tokens = clause_contexts(tmp_path, CAPTIONS, 2, progress=False)
    assert tokens.shape == (5, 2, 384) and (tmp_path / "clauses2.safetensors").is_file()
    torch.testing.assert_close(tokens, encode_minilm(CAPTIONS, clause_tokens=2)[:, 32:], rtol=0, atol=1e-5)
    stamp = (tmp_path / "clauses2.safetensors").stat().st_mtime_ns
    assert torch.equal(clause_contexts(tmp_path, CAPTIONS, 2, progress=False), tokens)  # read back, not encoded again
    assert (tmp_path / "clauses2.safetensors").stat().st_mtime_ns == stamp

    pool = {**tiny_pool(), "contexts": encode_minilm(CAPTIONS), "captions": CAPTIONS}
    cfg = LDMConfig(kind="ldm", steps=1, batch_size=4, unet=tiny_unet("ldm"), scale_factor=0.5, clause_tokens=2,
                    caption_dropout=0.0)
    with pytest.raises(ValueError, match="--clause-tokens"):
        make_batch(cfg, pool, 0)
    pool["clause_contexts"] = tokens
    batch = make_batch(cfg, pool, 0)
    captions = pool["caption_index"][torch.randint(0, 12, (4,), generator=_batch_generator())]
    assert batch["context"].shape == (4, 34, 384)
    assert torch.equal(batch["context"][:, 32:], tokens[captions])


def _batch_generator() -> torch.Generator:
    from ldmgraph.train.common import step_generator

    return step_generator(0, 0, stream=2)


def test_a_clause_token_model_exports_loads_and_runs_through_a_saved_workflow(tmp_path: Path) -> None:
    from ldmgraph.models.checkpoint import load_checkpoint
    from ldmgraph.train.export import export_bundled

    ae_run(tmp_path / "ae", 1)
    pool = {**tiny_pool(), "contexts": encode_minilm(CAPTIONS), "captions": CAPTIONS,
            "clause_contexts": encode_minilm(CAPTIONS, clause_tokens=2)[:, 32:]}
    cfg = LDMConfig(kind="ldm", steps=2, batch_size=3, unet=tiny_unet("ldm"), scale_factor=0.5, clause_tokens=2,
                    checkpoint_every=1)
    train_ldm(cfg, pool, tmp_path / "run", progress=False)
    models = tmp_path / "models"
    path = export_bundled("ldm", tmp_path / "run", tmp_path / "ae", 0.5, models / "clauses.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ldmgraph"])
    assert meta["clause_tokens"] == 2 and meta["text_encoder"] == "minilm-l6-v2"

    encoder = load_checkpoint(path).text_encoder
    assert encoder.clause_tokens == 2
    torch.testing.assert_close(encoder.encode([CAPTIONS[3]]).context, encode_minilm([CAPTIONS[3]], 2),
                               rtol=0, atol=1e-6)

    # the saved workflow feeds the U-Net the 34-token context: the same weights under metadata without
    # clause_tokens draw another image (random U-Net weights, so that the text reaches the image at all)
    with safe_open(str(path), "pt") as f:
        noisy = jitter_unet({k: f.get_tensor(k) for k in f.keys()})
    save_file(noisy, str(models / "clauses.safetensors"), metadata={"ldmgraph": json.dumps(meta)})
    plain = {k: v for k, v in meta.items() if k != "clause_tokens"}
    save_file(noisy, str(models / "plain.safetensors"), metadata={"ldmgraph": json.dumps(plain)})
    images = saved_txt2img_images(tmp_path, models, ["clauses", "plain"])
    assert images["clauses"].shape == (1, 64, 64, 3)
    assert not torch.equal(images["clauses"], images["plain"])


@pytest.mark.parametrize("argv, message", [
    (["ldm", "--clause-tokens", "17"], "0..16"),
    (["superres", "--clause-tokens", "4"], "text-to-image or inpainting"),
    (["ldm", "--clause-tokens", "4", "--text-encoder", "transformer"], "MiniLM encoder only"),
])
def test_cli_refuses_clause_tokens_where_they_cannot_go(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         argv: list[str], message: str) -> None:
    from ldmgraph.cli import main

    code = main(["train", *argv, "--ae", str(tmp_path), "--pool", str(tmp_path / "pool"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "pool").exists() and not (tmp_path / "run").exists()


def test_clause_only_contexts_are_the_clause_tokens_alone() -> None:
    from ldmgraph.models.text_encoders import with_clause_tokens

    only = with_clause_tokens(shared_minilm(), 3, clause_only=True).encode(CAPTIONS).context
    assert only.shape == (5, 3, 384)
    assert torch.equal(only, encode_minilm(CAPTIONS, clause_tokens=3)[:, 32:])
    pool = {**tiny_pool(), "contexts": encode_minilm(CAPTIONS), "captions": CAPTIONS,
            "clause_contexts": only}
    cfg = LDMConfig(kind="ldm", steps=1, batch_size=4, unet=tiny_unet("ldm"), scale_factor=0.5, clause_tokens=3,
                    clause_only=True, caption_dropout=0.0)
    batch = make_batch(cfg, pool, 0)
    captions = pool["caption_index"][torch.randint(0, 12, (4,), generator=_batch_generator())]
    assert torch.equal(batch["context"], only[captions])


def test_a_controlnet_for_a_clause_token_model_trains_on_the_contexts_that_model_reads(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "nodes"))
    from ldmgraph_tiny_models import write_tiny_checkpoint
    from safetensors.torch import load_file

    from ldmgraph.train.controlnet import base_contexts

    base = write_tiny_checkpoint(tmp_path / "txt2img.safetensors", "txt2img")
    with safe_open(str(base), "pt") as f:
        meta, tensors = json.loads(f.metadata()["ldmgraph"]), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(base), metadata={"ldmgraph": json.dumps({**meta, "clause_tokens": 3, "clause_only": True})})
    pool = tmp_path / "cpool"
    pool.mkdir()
    save_file({"contexts": encode_minilm(CAPTIONS)}, str(pool / "control_pool.safetensors"),
              metadata={"captions": json.dumps(CAPTIONS)})
    contexts = base_contexts(base, pool)
    assert contexts.shape == (5, 3, 384)
    torch.testing.assert_close(contexts, encode_minilm(CAPTIONS, clause_tokens=3)[:, 32:], rtol=0, atol=1e-6)
    assert load_file(str(pool / "control_pool.safetensors"))["contexts"].shape == (5, 32, 384)  # the pool as built
