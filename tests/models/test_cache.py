"""The model cache: one load per file identity and options, byte-bounded LRU eviction, thread safety."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch
from model_helpers import bundled_metadata, prefixed, tiny_unet, unet_state, vae_state, write

from ldmgraph.models.cache import ModelCache
from ldmgraph.models.checkpoint import load_checkpoint, load_text_encoder, load_vae


def _unet_file(path: Path, seed: int = 0) -> Path:
    return write(path, prefixed("model.diffusion_model.", unet_state(tiny_unet(), seed=seed)))


def test_same_file_is_loaded_once_and_shared(tmp_path: Path) -> None:
    path = _unet_file(tmp_path / "m.safetensors")
    cache = ModelCache()
    a = load_checkpoint(path, cache=cache)
    b = load_checkpoint(str(tmp_path / "." / "m.safetensors"), cache=cache)  # another spelling, same file
    assert a is b
    assert (cache.stats.loads, cache.stats.hits, cache.stats.misses) == (1, 1, 1)
    assert cache.used_bytes == sum(p.numel() * 4 for p in a.unet.parameters())
    c = load_checkpoint(path, cache=cache, dtype="float16")  # other options: another entry
    assert c is not a and cache.stats.loads == 2


def test_rewritten_file_is_loaded_again(tmp_path: Path) -> None:
    path = _unet_file(tmp_path / "m.safetensors", seed=0)
    cache = ModelCache()
    first = load_checkpoint(path, cache=cache)
    _unet_file(path, seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_checkpoint(path, cache=cache)
    assert second is not first and cache.stats.loads == 2
    w = "input_blocks.0.0.weight"
    assert not torch.equal(
        first.unet.diffusion_model.state_dict()[w], second.unet.diffusion_model.state_dict()[w]
    )


def test_lru_eviction_by_bytes() -> None:
    cache = ModelCache(budget_bytes=10, sizeof=len)
    cache.get_or_load("a", lambda: "aaaa")
    cache.get_or_load("b", lambda: "bbbb")
    cache.get_or_load("a", lambda: "never")  # a becomes most recently used
    cache.get_or_load("c", lambda: "cccc")  # 12 bytes > 10: evict the least recently used (b)
    assert cache.keys() == ["a", "c"] and cache.stats.evictions == 1
    assert cache.get_or_load("b", lambda: "BBBB") == "BBBB" and cache.stats.loads == 4
    huge = cache.get_or_load("huge", lambda: "x" * 50)  # larger than the budget: returned, not kept
    assert huge == "x" * 50 and "huge" not in cache and cache.used_bytes <= 10


def test_concurrent_requests_load_once() -> None:
    cache = ModelCache()
    calls = []

    def slow() -> torch.nn.Module:
        calls.append(1)
        time.sleep(0.2)
        return torch.nn.Linear(2, 2)

    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load("k", slow))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(r is results[0] for r in results)


def test_bundled_models_share_one_minilm_and_vae_loader_caches(tmp_path: Path) -> None:
    unet_cfg = tiny_unet(context_dim=384)
    files = [
        write(
            tmp_path / f"b{i}.safetensors",
            {
                **prefixed("model.diffusion_model.", unet_state(unet_cfg, seed=i)),
                **prefixed("first_stage_model.", vae_state()),
            },
            bundled_metadata(unet_cfg),
        )
        for i in range(2)
    ]
    cache = ModelCache()
    a, b = (load_checkpoint(f, cache=cache) for f in files)
    assert a.unet is not b.unet
    assert a.text_encoder is b.text_encoder is load_text_encoder("minilm-l6-v2", cache=cache)
    assert a.text_encoder.encode(["a red square"]).context.shape == (1, 32, 384)
    v1 = load_vae(files[0], cache=cache)
    assert load_vae(files[0], cache=cache) is v1 and v1.scale_factor == 0.5
