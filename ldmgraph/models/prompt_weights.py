"""Prompt weights and embedding references: `(word:1.2)`, `(word)`, `[word]`, `\\(`, `embedding:name`.

The syntax is ComfyUI's (and Automatic1111's) for emphasis:

- `(text)` multiplies the weight of `text` by 1.1; nesting multiplies again: `((text))` is 1.1 * 1.1.
- `(text:w)` sets the weight of `text` to the number `w` (absolute, not multiplied by the outer groups):
  the number is what follows the group's *last* colon, as ComfyUI reads it, so `(a (b:1.5) c)` is
  a and c at 1.1, b at 1.5; a colon followed by something that is not a plain decimal number is text.
- `[text]` divides the weight by 1.1 (Automatic1111's de-emphasis; ComfyUI itself reads square
  brackets as plain text).
- `\\(`, `\\)`, `\\[`, `\\]` are the literal characters; an opener without its closer (or a closer
  without its opener) is plain text too.
- `embedding:name` (the file `name`, `name.pt`, `name.safetensors`, ... of an `embeddings/` folder)
  puts that textual-inversion embedding's vectors in place of the reference; it can be weighted too.

What a weight means is the encoders' business (`ldmgraph.models.text_encoders`): with ComfyUI's rule,
each token of weight w != 1 has its output vector moved from the empty prompt's by the factor w,
z' = (z - z_empty) * w + z_empty, z_empty being the empty prompt's encoding at the same position.
Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

EMPHASIS = 1.1
EMBEDDING_PREFIX = "embedding:"
_OPENERS = {"(": ")", "[": "]"}
_CLOSERS = {")": "(", "]": "["}
_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")
_EMBEDDING = re.compile(r"(?<![^\s,;])" + re.escape(EMBEDDING_PREFIX) + r"([^\s,;()\[\]]+)")
"""`embedding:name` at the start of a word (as ComfyUI reads it: "myembedding:x" is text)."""


@dataclass(frozen=True)
class Piece:
    """A run of a parsed prompt with one weight: plain text, or a reference to an embedding by name."""

    text: str
    weight: float = 1.0
    embedding: str | None = None


def _lex(text: str, escapable: str = "()[]") -> list[tuple[str, bool]]:
    """The prompt's characters, each with whether it was escaped by a backslash."""
    chars: list[tuple[str, bool]] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapable:
            chars.append((text[i + 1], True))
            i += 2
        else:
            chars.append((text[i], False))
            i += 1
    return chars


def _matches(chars: list[tuple[str, bool]], openers: str) -> dict[int, int]:
    """Opener position -> its closer's position, for the brackets that close (innermost first)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for i, (c, escaped) in enumerate(chars):
        if escaped or (c in _OPENERS and c not in openers) or (c in _CLOSERS and _CLOSERS[c] not in openers):
            continue
        if c in _OPENERS:
            stack.append(i)
        elif c in _CLOSERS and stack and chars[stack[-1]][0] == _CLOSERS[c]:
            match[stack.pop()] = i
    return match


def _explicit_weight(chars: list[tuple[str, bool]], start: int, end: int) -> tuple[int, float] | None:
    """(colon position, number) when a group's content ends in `:number` after its last colon."""
    colon = next((i for i in range(end - 1, start - 1, -1) if chars[i][0] == ":"), None)
    if colon is None or colon == start:  # ComfyUI: a colon at the very start is text
        return None
    number = "".join(c for c, _ in chars[colon + 1 : end])
    if not _NUMBER.fullmatch(number):
        return None
    return colon, float(number)


def _weigh(chars: list[tuple[str, bool]], match: dict[int, int], start: int, end: int, weight: float,
           out: list[tuple[str, float]]) -> None:
    buffer: list[str] = []
    i = start
    while i < end:
        c, escaped = chars[i]
        if escaped or i not in match:
            buffer.append(c)
            i += 1
            continue
        if buffer:
            out.append(("".join(buffer), weight))
            buffer = []
        close = match[i]
        inner_end, inner = close, weight / EMPHASIS
        if c == "(":
            inner = weight * EMPHASIS
            explicit = _explicit_weight(chars, i + 1, close)
            if explicit is not None:
                inner_end, inner = explicit
        _weigh(chars, match, i + 1, inner_end, inner, out)
        i = close + 1
    if buffer:
        out.append(("".join(buffer), weight))


def parse_weights(text: str, brackets: bool = True) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, brackets and escapes resolved, neighbours of equal weight merged.
    ``brackets`` False reads square brackets as text, as ComfyUI does (only `(`, `)` and their escapes count).

    >>> parse_weights("a (red:1.3) circle")
    [('a ', 1.0), ('red', 1.3), (' circle', 1.0)]
    """
    chars = _lex(text, "()[]" if brackets else "()")
    runs: list[tuple[str, float]] = []
    _weigh(chars, _matches(chars, "([" if brackets else "("), 0, len(chars), 1.0, runs)
    merged: list[tuple[str, float]] = []
    for part, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        elif part:
            merged.append((part, weight))
    return merged


def parse_prompt(text: str, brackets: bool = True) -> list[Piece]:
    """The prompt as weighted text and embedding references, in order (``brackets``: see `parse_weights`)."""
    pieces: list[Piece] = []
    for part, weight in parse_weights(text, brackets):
        last = 0
        for m in _EMBEDDING.finditer(part):
            if m.start() > last:
                pieces.append(Piece(part[last : m.start()], weight))
            pieces.append(Piece(m.group(0), weight, embedding=m.group(1)))
            last = m.end()
        if last < len(part):
            pieces.append(Piece(part[last:], weight))
    return pieces


def is_plain(pieces: list[Piece]) -> bool:
    """No weight other than 1 and no embedding: the prompt encodes as its plain text."""
    return all(p.weight == 1.0 and p.embedding is None for p in pieces)


def plain_text(pieces: list[Piece]) -> str:
    """The text the pieces spell, escapes and brackets resolved (embedding references kept as written)."""
    return "".join(p.text for p in pieces)


def embedding_names(text: str) -> list[str]:
    """The embedding names a prompt refers to, in order, once each."""
    return list(dict.fromkeys(p.embedding for p in parse_prompt(text) if p.embedding is not None))


# --- what the encoders do with the pieces (torch imported by the callers) ---------------------------


def apply_weights(z: Tensor, empty: Tensor, weights: Tensor) -> Tensor:
    """ComfyUI's rule: each position of weight w != 1 becomes (z - empty) * w + empty, where `empty` is the
    empty prompt's encoding at the same position; positions of weight 1 keep z exactly.

    z [B, T, D], empty [T, D] or [B, T, D], weights [B, T]."""
    import torch

    w = weights.to(z)[..., None]
    return torch.where(w != 1.0, (z - empty) * w + empty, z)


def token_rows(pieces: list[Piece], ids_of: Callable[[str], list[int]],
               vectors_of: Callable[[str], Tensor] | None) -> tuple[list[int], list[float], dict[int, Tensor]]:
    """The prompt as token ids and per-token weights, each text piece tokenised on its own; an embedding
    takes one position per vector (placeholder id 0), its vectors returned by position."""
    ids: list[int] = []
    weights: list[float] = []
    vectors: dict[int, Tensor] = {}
    for piece in pieces:
        if piece.embedding is not None:
            if vectors_of is None:
                raise ValueError("textual-inversion embeddings need a CLIP text encoder")
            for row in vectors_of(piece.embedding):
                vectors[len(ids)] = row
                ids.append(0)
                weights.append(piece.weight)
        else:
            tokens = ids_of(piece.text)
            ids += tokens
            weights += [piece.weight] * len(tokens)
    return ids, weights, vectors


_CLAUSE_BREAK = re.compile(r"\s*(?:[,;]|\band\b)\s*", re.IGNORECASE)


def weighted_clauses(pieces: list[Piece], slots: int) -> list[list[Piece]]:
    """The clauses of a weighted prompt for a clause-token encoder, each as its weighted pieces: split at
    "and", commas and semicolons, past `slots` clauses the last slot takes the rest joined by " and ",
    exactly as `ldmgraph.models.text_encoders.split_clauses` splits the plain text."""
    text = plain_text(pieces)
    weight_at = [p.weight for p in pieces for _ in p.text]
    spans, start = [], 0
    for m in [*_CLAUSE_BREAK.finditer(text), None]:
        end = len(text) if m is None else m.start()
        lo, hi = start, end
        while lo < hi and text[lo].isspace():
            lo += 1
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        if hi > lo:
            spans.append((lo, hi))
        start = end if m is None else m.end()
    clauses = [_runs(text, weight_at, lo, hi) for lo, hi in spans]
    if len(clauses) > slots:
        rest: list[Piece] = []
        for clause in clauses[slots - 1 :]:
            rest += ([Piece(" and ")] if rest else []) + clause
        clauses = [*clauses[: slots - 1], rest]
    return clauses


def _runs(text: str, weight_at: list[float], lo: int, hi: int) -> list[Piece]:
    out: list[Piece] = []
    for i in range(lo, hi):
        if out and out[-1].weight == weight_at[i]:
            out[-1] = Piece(out[-1].text + text[i], weight_at[i])
        else:
            out.append(Piece(text[i], weight_at[i]))
    return out


_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def split_piece_breaks(pieces: list[Piece]) -> list[list[Piece]]:
    """The pieces between the word BREAK, each group to start a new 75-token window (as
    `ldmgraph.models.text_encoders.split_breaks` splits plain text: a leading BREAK keeps an empty first
    group, a trailing one adds none)."""
    groups: list[list[Piece]] = [[]]
    for piece in pieces:
        parts = [piece.text] if piece.embedding is not None else _BREAK.split(piece.text)
        for i, part in enumerate(parts):
            if i:
                groups.append([])
            if part:
                groups[-1].append(Piece(part, piece.weight, piece.embedding))
    return groups[:-1] if len(groups) > 1 and not groups[-1] else groups
