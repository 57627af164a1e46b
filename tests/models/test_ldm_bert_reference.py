"""The paper's BERT text model agrees with diffusers' LDMBertModel on the same random weights (given in
the original x-transformers layout), and its tokenizer agrees token for token with transformers'
pure-Python BertTokenizer under the bert-base-uncased rules (lower-casing, accent stripping, WordPiece)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import ldm_bert_keys, to_ldm_bert, write

from ldmgraph.models.checkpoint import load_text_encoder
from ldmgraph.models.text_encoders import bert_tokenizer, minilm_folder

TEXTS = [
    "A painting of a squirrel eating a burger",
    "Café crème brûlée, naïve façade; ÜBER-déjà vu!!",
    "unaffable hyperparameterisation of 1234567 tokens... (really) [maybe] {yes}",
    "中文 字符 and émojis 🙂 mixed",
    "",
    " ".join(["long"] * 100),  # truncated to 77 with [SEP] last
]


@pytest.mark.reference
def test_ldm_bert_agrees_with_diffusers_ldm_bert_model(tmp_path: Path) -> None:
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    depth, dim, inner = 3, 64, 128  # 2 heads of 64 channels, feed-forward 4 x dim
    sd = ldm_bert_keys(dim=dim, depth=depth, inner=inner, seed=11)
    encoder = load_text_encoder(write(tmp_path / "te.safetensors", sd))
    config = LDMBertConfig(vocab_size=30522, max_position_embeddings=77, encoder_layers=depth, encoder_ffn_dim=4 * dim,
                           encoder_attention_heads=inner // 64, head_dim=64, d_model=dim, dropout=0.0)
    reference = LDMBertModel(config).eval()
    reference.load_state_dict(to_ldm_bert(sd, depth), strict=True)
    ids = encoder.tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids)[0]
    ours = encoder.encode(TEXTS).context
    assert ours.shape == expected.shape == (len(TEXTS), 77, dim)
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.reference
def test_bert_tokenizer_agrees_with_the_reference_wordpiece_token_for_token() -> None:
    from transformers import BertTokenizer  # the pure-Python reference implementation

    vocab = minilm_folder() / "vocab.txt"
    assert len(vocab.read_text(encoding="utf-8").splitlines()) == 30522  # bert-base-uncased's vocabulary size
    reference = BertTokenizer(str(vocab), do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True)
    ours = bert_tokenizer()
    for text in TEXTS:
        want = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        got = ours(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert got == want, text
        assert got[0] == 101 and 102 in got  # [CLS] ... [SEP], then [PAD] = 0
    assert ours.tokenize("Café brûlée") == ["cafe", "br", "##ule", "##e"]
    assert ours.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the"]) == [0, 100, 101, 102, 1996]
