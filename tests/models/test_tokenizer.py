"""The offline CLIP tokenizer against OpenAI's reference `simple_tokenizer.py` (loaded by file path)."""

from __future__ import annotations

import importlib.util
import random
import sys
from typing import Any

import pytest

from ldmgraph.models.tokenizer import BOS_ID, EOS_ID, ClipTokenizer, clip_bpe_path, default_clip_tokenizer

HAND_WRITTEN = [
    "a photo of a cat",
    "A PHOTO OF A CAT!!!",
    "",
    "   ",
    "masterpiece, best quality, (cat:1.2), [dog], ((very detailed)), {bad hands}",
    "(red hair:0.8) AND (blue eyes:1.3)",
    "portrait of a woman, by Greg Rutkowski & Alphonse Mucha, trending on artstation",
    "don't, won't, it's, we're, they've, I'm, you'll, he'd",
    "café, naïve, résumé, Straße, smörgåsbord",
    "東京の夜景, 猫, 고양이, кот, γάτα, قطة, बिल्ली",
    "emoji 🐱🚀✨ and 👩‍👩‍👧 family",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "mojibake: cafÃ© and â€œquotesâ€\x9d",
    "numbers 1234567890 3.14159 1e-5 50% $100 #1",
    "snake_case kebab-case CamelCase dot.separated path/to/file.png",
    "tabs\tand\nnewlines\r\nand   many    spaces",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "lora:name:0.7 <lora:detail:1> embedding:easynegative",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!!???...,,,;;;:::---___",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ",
    "ﬁ ligature, ½ fraction, ² superscript, Ⅻ roman",
    "zero\u200bwidth\u200dspace and soft\u00adhyphen",
    "a photograph of an astronaut riding a horse on mars, highly detailed, 8k, octane render",
]

WORDS = (
    "a an the photo painting portrait of cat dog astronaut horse castle forest at night sunset "
    "highly detailed 8k unreal engine cinematic lighting by artist trending watercolor oil sketch "
    "neon cyberpunk steampunk fantasy landscape river mountain café über façade naïve 日本 城 🌸 "
    "don't it's (masterpiece:1.2) [blurry] {x|y} <lora:foo:0.5> 1girl 2boys 100% #hashtag @user"
).split()
PUNCT = [", ", " ", ". ", "; ", " - ", "! ", "? ", " / ", "", "  "]


def corpus(n: int = 240, seed: int = 0) -> list[str]:
    """Hand-written edge cases plus seeded random prompts, some far over 77 tokens."""
    rng = random.Random(seed)
    prompts = list(HAND_WRITTEN)
    while len(prompts) < n:
        length = rng.choice([1, 3, 8, 20, 60, 150])
        parts = []
        for _ in range(length):
            word = rng.choice(WORDS)
            if rng.random() < 0.1:
                word = word.upper()
            if rng.random() < 0.1:
                word = f"({word}:{rng.uniform(0.5, 1.5):.2f})"
            parts.append(word + rng.choice(PUNCT))
        prompts.append("".join(parts))
    return prompts


@pytest.fixture(scope="module")
def reference() -> Any:
    """OpenAI's SimpleTokenizer, imported from its file without importing the `clip` package."""
    path = clip_bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_known_ids() -> None:
    tok = default_clip_tokenizer()
    assert tok.with_specials("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert "clip" not in sys.modules or not hasattr(
        sys.modules["clip"], "load"
    )  # the clip package is not imported


@pytest.mark.reference
def test_ids_equal_openai_reference_on_corpus(reference: Any) -> None:
    tok = default_clip_tokenizer()
    prompts = corpus()
    assert len(prompts) >= 200
    ours = tok.batch_ids(prompts)
    mismatches = [
        (p, o, reference.encode(p)) for p, o in zip(prompts, ours, strict=True) if o != reference.encode(p)
    ]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"
    assert max(len(o) for o in ours) > 77  # the corpus has over-long prompts


@pytest.mark.reference
def test_truncated_form_equals_clip_tokenize_layout(reference: Any) -> None:
    """[BOS] ids [EOS], cut at 77 keeping EOS last: the layout of `clip.tokenize(truncate=True)`."""
    tok = default_clip_tokenizer()
    for text in corpus(60, seed=1):
        ids = [BOS_ID, *reference.encode(text), EOS_ID]
        if len(ids) > 77:
            ids = ids[:77]
            ids[-1] = EOS_ID
        assert tok.with_specials(text) == ids


def test_windows_split_long_prompts_in_75_token_pieces() -> None:
    tok = default_clip_tokenizer()
    text = " ".join(["cat"] * 160)  # "cat" is one token
    windows = tok.tokenize_chunks(text)
    assert [len(w) for w in windows] == [77, 77, 77]
    assert all(w[0] == BOS_ID for w in windows)
    assert windows[0][76] == EOS_ID and windows[1][76] == EOS_ID
    assert windows[2][:12] == [BOS_ID, *[2368] * 10, EOS_ID]  # 160 - 150 = 10 tokens left
    assert windows[2][12:] == [EOS_ID] * 65
    assert tok.tokenize_chunks("", pad_id=0) == [[BOS_ID, EOS_ID] + [0] * 75]


def test_derived_folder_is_reused(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("LDMGRAPH_CACHE", str(tmp_path))
    from ldmgraph.models.tokenizer import clip_tokenizer_folder

    first = clip_tokenizer_folder()
    assert first.parent == tmp_path and (first / "vocab.json").is_file()
    stamp = (first / "merges.txt").stat().st_mtime_ns
    assert clip_tokenizer_folder() == first and (first / "merges.txt").stat().st_mtime_ns == stamp
    assert len(ClipTokenizer(first)._tok) == 49408
