"""Reading textual-inversion embedding files (the layouts `ldmgraph.models.embeddings` recognises).

Apart from `embeddings` because reading needs torch (safetensors' torch reader and the allow-list
unpickler, `ldmgraph.models.safe_unpickle`: nothing in a pickled file is executed), while finding and
listing the files does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file

from ldmgraph.models.embeddings import Embedding, embedding_from_tensors, find_embedding
from ldmgraph.models.safe_unpickle import load_pickled_weights


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Read an embedding file: safetensors memory-mapped, pickles through the allow-list unpickler."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
    else:
        tensors = load_pickled_weights(path, nested=True)
    return embedding_from_tensors(path.name, tensors)


def load_named(names: list[str], model_dirs: tuple[Path, ...] | list[Path]) -> dict[str, Embedding]:
    """The embeddings a prompt refers to, by the name it uses (a name ends at whitespace, a comma, a
    semicolon or a bracket: `embedding:name.pt,` names `name.pt`)."""
    return {name: load_embedding(find_embedding(name, model_dirs)) for name in names}
