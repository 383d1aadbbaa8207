"""The continuous engine's prefix cache: the radix tree's bookkeeping, and outputs that do not change."""

import numpy as np
import pytest

import mtj
from conftest import SHARP, hf_gptj
from mtj.decode.slots import pool_bytes_per_token
from mtj.serve.prefix_cache import PrefixCache
from mtj.serve.scheduler import SlotEngine
from test_engine import Request
from test_neo_neox import hf_model


def stored(cache: PrefixCache, ids: list[int]) -> np.ndarray:
    k, positions = cache.reserve(ids)
    cache.insert(ids, k, positions)
    return positions


def test_the_longest_cached_prefix_to_the_token():
    cache = PrefixCache(100)
    a = stored(cache, [1, 2, 3, 4, 5, 6])
    assert len(a) == 6 and cache.cached == 6
    np.testing.assert_array_equal(cache.lookup([1, 2, 3, 9]), a[:3])  # ends inside a node
    b = stored(cache, [1, 2, 3, 7, 8])  # splits the first node: only 7, 8 are new
    assert len(b) == 2 and cache.cached == 8
    np.testing.assert_array_equal(cache.lookup([1, 2, 3, 7, 8, 9]), np.concatenate([a[:3], b]))
    np.testing.assert_array_equal(cache.lookup([1, 2, 3, 4, 5, 6, 7]), a)  # the split kept the first prompt whole
    assert len(cache.lookup([2, 1])) == 0 and len(stored(cache, [1, 2])) == 0  # a cached prefix stores nothing
    assert cache.looked_up == 4 + 6 + 7 + 2 and cache.hits == 3 + 5 + 6


def test_eviction_takes_the_least_recently_used_leaves_and_never_the_prefix_in_use():
    cache = PrefixCache(10)
    old, mid = stored(cache, [1, 1, 1, 1]), stored(cache, [2, 2, 2])
    cache.lookup([1, 1])  # [1 1 1 1] is now the most recently used
    new = stored(cache, [3, 3, 3, 3, 3])  # needs 2 more positions than are free: [2 2 2] goes
    assert set(new) & set(mid) and len(cache.lookup([2, 2, 2])) == 0 and len(cache.lookup([1, 1, 1, 1])) == 4
    assert cache.evicted == 3 and cache.cached == 9
    np.testing.assert_array_equal(cache.lookup([1, 1, 1, 1]), old)
    # a prompt extending the cached [3 3 3 3 3]: its prefix is kept, the rest of the pool is evicted
    longer = stored(cache, [3, 3, 3, 3, 3, 4, 4, 4, 4, 4])
    np.testing.assert_array_equal(cache.lookup([3] * 5 + [4] * 5), np.concatenate([new, longer]))
    assert len(cache.lookup([1])) == 0 and cache.cached == 10
    # more than the pool holds: as much as fits once everything else is evicted
    k, positions = cache.reserve(list(range(20, 40)))
    assert k == 0 and len(positions) == 10
    cache.release(positions)
    assert cache.cached == 0 and len(cache.lookup([3])) == 0
    with pytest.raises(ValueError, match="at least one token"):
        PrefixCache(0)


def family_model(path, family: str):
    if family == "gptj":
        return hf_gptj(path, vocab_size=300, n_positions=128, n_embd=32, n_head=4, rotary_dim=4, **SHARP)
    kw = (dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=300, window_size=40, max_position_embeddings=128,
               attention_types=[[["global", "local"], 1]]) if family == "neo" else
          dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=300,
               max_position_embeddings=128))
    hf_model(path, family, 0, **kw, **SHARP)
    return path


@pytest.mark.parametrize("family,mp", [("gptj", 1), ("neo", 1), ("neox", 2)])  # mp 2: the pool's heads split too
def test_outputs_are_the_same_with_the_cache_on_and_off(tmp_path, family, mp):
    lm = mtj.load(family_model(tmp_path / family, family), dtype="float32", mp=mp)
    rng = np.random.RandomState(1)
    header, other = rng.randint(1, 300, 70).tolist(), rng.randint(1, 300, 40).tolist()
    prompts = [header + [5, 6, 7], header + rng.randint(1, 300, 35).tolist(),  # its bucket would pass the context
               header + [8], header[:50], header + [5, 6, 7, 9, 9], other + header[:30], other, header + [8]]
    want = [lm.generate_tokens([p], 12, temperature=0)[0] for p in prompts]
    want.append(lm.generate_tokens([header + [8]], 12, temperature=0.8, seed=3)[0])
    # a pool of one context: later prompts evict earlier ones
    engine = SlotEngine(lm, slots=2, prefix_cache_gb=128.5 * pool_bytes_per_token(lm.config) / mp / 2 ** 30)
    try:
        reqs = [Request(p, 12) for p in prompts] + [Request(header + [8], 12, temperature=0.8, seed=3)]
        for r in reqs:  # one at a time: each finds what the ones before it cached
            engine.submit([r])
            r.wait()
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == want
    assert engine.prefix_cache.tree.hits > 150 and engine.prefix_cache.tree.evicted > 0
    for bad, message in ((float("nan"), "a positive number of GiB"), (1e-9, "less than one context")):
        with pytest.raises(ValueError, match=message):
            SlotEngine(lm, slots=1, prefix_cache_gb=bad)
