"""Text encoders against transformers run directly on the same weights, in every file layout we read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import clip_model, clip_openclip_keys, write

from ldmgraph.models.checkpoint import load_text_encoder
from ldmgraph.models.text_encoders import ClipTextEncoder, encode_minilm, minilm_folder, shared_minilm
from ldmgraph.models.tokenizer import BOS_ID, EOS_ID, clip_bpe_path

PROMPTS = ["a photo of a cat", "(masterpiece:1.2), a castle at night, café, 東京", ""]
TOL = 1e-4


@pytest.fixture(scope="module")
def simple_tokenizer() -> Any:
    path = clip_bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer_te", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_ids(tok: Any, text: str, pad: int) -> torch.Tensor:
    """[1, 77] ids the way the original SD code builds them (here from OpenAI's reference BPE)."""
    ids = [BOS_ID, *tok.encode(text)[:75], EOS_ID]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


@torch.no_grad()
def reference_context(model: Any, ids: torch.Tensor, skip: int) -> torch.Tensor:
    """transformers CLIPTextModel: layer (L - skip + 1)'s output through the final layer norm."""
    out = model(input_ids=ids, output_hidden_states=True)
    return model.final_layer_norm(out.hidden_states[-skip])


def save_diffusers_text_encoder(folder: Path, model: Any, *, text_model_level: bool, pad: str | None) -> Path:
    """A diffusers-layout `text_encoder/` (config.json + model.safetensors) and optional `tokenizer/`."""
    te = folder / "text_encoder"
    te.mkdir(parents=True)
    (te / "config.json").write_text(model.config.to_json_string())
    prefix = "text_model." if text_model_level else ""
    write(te / "model.safetensors", {prefix + k: v for k, v in model.state_dict().items()})
    if pad is not None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    return folder


def assert_agrees(encoder: ClipTextEncoder, model: Any, tok: Any, pad: int) -> None:
    """Every clip skip value, every prompt: context within TOL of transformers on the same ids."""
    ids = torch.cat([reference_ids(tok, text, pad) for text in PROMPTS])
    for skip in range(1, model.config.num_hidden_layers + 1):
        ours = encoder.encode(PROMPTS, clip_skip=skip).context
        ref = reference_context(model, ids, skip)
        assert ours.shape == ref.shape == (len(PROMPTS), 77, model.config.hidden_size)
        assert (ours - ref).abs().max().item() <= TOL, skip


@pytest.mark.reference
def test_sd1_single_file_agrees_with_transformers(
    sd1_file: Path, tiny_clip: Any, simple_tokenizer: Any
) -> None:
    encoder = load_text_encoder(sd1_file)
    assert encoder.kind == "clip-l" and encoder.default_clip_skip == 1 and encoder.pad_id == EOS_ID
    assert_agrees(encoder, tiny_clip, simple_tokenizer, pad=EOS_ID)
    pooled = encoder.encode(["a photo of a cat"]).pooled
    with torch.no_grad():
        ref = tiny_clip(input_ids=reference_ids(simple_tokenizer, "a photo of a cat", EOS_ID)).pooler_output
    assert (pooled - ref).abs().max().item() <= TOL


@pytest.mark.reference
@pytest.mark.parametrize(
    "hidden, heads, layers, act, text_model_level, pad",
    [
        (96, 3, 2, "quick_gelu", True, "<|endoftext|>"),  # diffusers' SD1 folders: text_model.* keys
        (64, 4, 4, "gelu", False, "!"),  # transformers 5 save_pretrained form; SD2-style pad "!" = id 0
    ],
)
def test_diffusers_text_encoder_folder_agrees(
    tmp_path: Path,
    simple_tokenizer: Any,
    hidden: int,
    heads: int,
    layers: int,
    act: str,
    text_model_level: bool,
    pad: str,
) -> None:
    model = clip_model(hidden=hidden, heads=heads, layers=layers, act=act, seed=hidden)
    folder = save_diffusers_text_encoder(tmp_path / "pipe", model, text_model_level=text_model_level, pad=pad)
    encoder = load_text_encoder(folder)
    pad_id = 0 if pad == "!" else EOS_ID
    assert encoder.pad_id == pad_id and encoder.default_clip_skip == 1
    assert_agrees(encoder, model, simple_tokenizer, pad=pad_id)


@pytest.mark.reference
def test_sd2_openclip_layout_agrees(tmp_path: Path, simple_tokenizer: Any) -> None:
    """OpenCLIP keys (fused in_proj) map onto CLIPTextModel; SD2 pads with 0 and defaults to the penultimate layer."""
    model = clip_model(hidden=128, layers=3, act="gelu", seed=7)
    path = write(tmp_path / "sd2-te.safetensors", clip_openclip_keys(model))
    encoder = load_text_encoder(path)
    assert encoder.kind == "openclip-h" and encoder.pad_id == 0 and encoder.default_clip_skip == 2
    assert_agrees(encoder, model, simple_tokenizer, pad=0)
    ids = reference_ids(simple_tokenizer, PROMPTS[0], 0)
    default = encoder.encode([PROMPTS[0]]).context
    assert (default - reference_context(model, ids, 2)).abs().max().item() <= TOL


@pytest.mark.reference
def test_long_prompt_is_encoded_in_windows(sd1_file: Path, tiny_clip: Any, simple_tokenizer: Any) -> None:
    encoder = load_text_encoder(sd1_file)
    text = ", ".join(f"detail {i}" for i in range(40))  # 40 * 3 - 1 = 119 tokens
    ids = simple_tokenizer.encode(text)
    assert 75 < len(ids) <= 150
    out = encoder.encode([text, "short"]).context
    assert out.shape == (2, 154, 128)
    for w, piece in enumerate((ids[:75], ids[75:])):
        window = [BOS_ID, *piece, EOS_ID]
        window = torch.tensor([window + [EOS_ID] * (77 - len(window))])
        ref = reference_context(tiny_clip, window, 1)[0]
        assert (out[0, 77 * w : 77 * (w + 1)] - ref).abs().max().item() <= TOL
    empty = reference_context(tiny_clip, reference_ids(simple_tokenizer, "", EOS_ID), 1)[0]
    assert (out[1, 77:] - empty).abs().max().item() <= TOL  # the short row is padded with an empty window


def test_clip_skip_out_of_range_is_clear(sd1_file: Path) -> None:
    encoder = load_text_encoder(sd1_file)
    with pytest.raises(ValueError, match=r"clip_skip=4 .* use 1 \(last layer\) \.\. 3"):
        encoder.encode(["x"], clip_skip=4)


def test_sd1_checkpoint_text_encoder_from_load_checkpoint(sd1_file: Path) -> None:
    from ldmgraph.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(sd1_file)
    assert ckpt.info.text_encoder["kind"] == "clip-l"
    a = ckpt.text_encoder.encode(["a red cube"]).context
    b = load_text_encoder(sd1_file).encode(["a red cube"]).context
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def minilm() -> Any:
    return shared_minilm()  # the same object encode_minilm uses


MINILM_TEXTS = ["a red circle above a blue square", "", "two small green triangles " * 20,
                "Café naïve — “quotes” 日本語 🙂 don't-stop 3.14", "  MIXED case\tTabs\n", "x" * 300]


@pytest.mark.reference
def test_minilm_matches_bert_model_run_directly(minilm: Any) -> None:
    """ldmgraph's own BERT (no transformers import at run time) gives transformers' BertModel's
    numbers exactly, at every layer, from the same tokens."""
    from transformers import BertModel, BertTokenizerFast

    folder = str(minilm_folder())
    tok = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(MINILM_TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    ours = minilm.encode(MINILM_TEXTS)
    assert ours.context.shape == (6, 32, 384) and ours.context.dtype == torch.float32
    assert torch.equal(ours.context, ref.last_hidden_state)
    assert torch.equal(minilm.encode(MINILM_TEXTS, clip_skip=3).context, ref.hidden_states[-3])
    assert ours.pooled is not None and ours.pooled.shape == (6, 384)


@pytest.mark.reference
@pytest.mark.parametrize("length", [32, 77])
def test_minilm_tokens_match_bert_tokenizer_fast(minilm: Any, length: int) -> None:
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(minilm_folder()), local_files_only=True)
    ref = tok(MINILM_TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ours = minilm.tokenizer(MINILM_TEXTS, length)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])


def test_minilm_is_deterministic_and_batch_independent(minilm: Any) -> None:
    a = minilm.encode(["a yellow star", "a purple ring"]).context
    b = minilm.encode(["a purple ring"]).context
    assert torch.equal(minilm.encode(["a yellow star", "a purple ring"]).context, a)
    assert (a[1] - b[0]).abs().max().item() <= 1e-5
    assert encode_minilm(["a yellow star"]).shape == (1, 32, 384)


def reference_ldm_bert(sd: dict[str, torch.Tensor], ids: torch.Tensor, head_dim: int = 64) -> torch.Tensor:
    """The paper's pre-norm encoder written out in plain tensor maths from its description (no modules)."""
    import torch.nn.functional as F

    p = "cond_stage_model.transformer."
    x = sd[p + "token_emb.weight"][ids] + sd[p + "pos_emb.emb.weight"][: ids.shape[1]]
    depth = len({k.split(".")[4] for k in sd if ".attn_layers.layers." in k}) // 2
    for i in range(depth):
        a, f = f"{p}attn_layers.layers.{2 * i}.", f"{p}attn_layers.layers.{2 * i + 1}."
        h = F.layer_norm(x, x.shape[-1:], sd[a + "0.weight"], sd[a + "0.bias"])
        q, k, v = (h @ sd[f"{a}1.{n}.weight"].T for n in ("to_q", "to_k", "to_v"))
        b, t, inner = q.shape
        q, k, v = (m.view(b, t, inner // head_dim, head_dim).transpose(1, 2) for m in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(b, t, inner)
        x = x + attn @ sd[a + "1.to_out.weight"].T + sd[a + "1.to_out.bias"]
        h = F.layer_norm(x, x.shape[-1:], sd[f + "0.weight"], sd[f + "0.bias"])
        h = F.gelu(h @ sd[f + "1.net.0.0.weight"].T + sd[f + "1.net.0.0.bias"])
        x = x + h @ sd[f + "1.net.2.weight"].T + sd[f + "1.net.2.bias"]
    return F.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])


@pytest.mark.reference
def test_ldm_paper_bert_encoder_agrees_with_plain_maths(tmp_path: Path) -> None:
    from model_helpers import ldm_bert_keys

    sd = ldm_bert_keys()
    path = write(tmp_path / "ldm-txt2img-te.safetensors", sd)
    encoder = load_text_encoder(path)
    assert encoder.kind == "ldm-bert" and encoder.context_dim == 64 and encoder.num_layers == 2
    texts = ["a photo of a cat", "A painting of a squirrel eating a burger"]
    ids = encoder.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert ids[0, :7].tolist() == [
        101,
        1037,
        6302,
        1997,
        1037,
        4937,
        102,
    ]  # bert-base-uncased ids, then [PAD]=0
    assert ids[0, 7:].eq(0).all()
    ours = encoder.encode(texts).context
    assert ours.shape == (2, 77, 64)
    assert (ours - reference_ldm_bert(sd, ids)).abs().max().item() <= TOL


@pytest.mark.reference
def test_sd1_file_resaved_without_text_model_level(
    tmp_path: Path, tiny_clip: Any, simple_tokenizer: Any
) -> None:
    """Files re-saved from transformers 5 lack the `text_model.` level; they load the same."""
    keys = {f"cond_stage_model.transformer.{k}": v for k, v in tiny_clip.state_dict().items()}
    encoder = load_text_encoder(write(tmp_path / "resaved.safetensors", keys))
    assert encoder.kind == "clip-l"
    ids = reference_ids(simple_tokenizer, PROMPTS[1], EOS_ID)
    assert (
        encoder.encode([PROMPTS[1]]).context - reference_context(tiny_clip, ids, 1)
    ).abs().max().item() <= TOL


def test_building_on_meta_skips_init_there_and_only_there() -> None:
    """Modules built for loading do no random init (on the meta device it costs time and imports
    torch._dynamo); a module built on the CPU meanwhile, or afterwards, is initialised as usual."""
    from torch import nn

    from ldmgraph.models.checkpoint import build_on_meta

    normal = nn.init.normal_

    def factory() -> nn.Module:
        torch.manual_seed(0)
        cpu = nn.Embedding(8, 4, device="cpu")  # inside the build, on a real device
        assert cpu.weight.std().item() > 0.5  # N(0, 1) rows, not left empty
        return nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))

    module = build_on_meta(factory)
    assert all(p.is_meta for p in module.parameters())
    assert nn.init.normal_ is normal
    torch.manual_seed(0)
    assert torch.equal(nn.Embedding(8, 4).weight, torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
