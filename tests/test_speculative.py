"""Speculative decoding with prompt-lookup drafts and with draft models, in generate_tokens, the continuous engine
and the server: the drafts, greedy output equal to plain decoding for the three families, and sampled tokens that
follow the target distribution (chi-square)."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import mtj
from mtj.decode import speculative
from mtj.decode.sampling import SamplingParams, filter_logits
from mtj.serve.scheduler import SlotEngine
from mtj.tokenizer import load_tokenizer
from conftest import REPO
from test_engine import Request
from test_prefix_cache import family_model


def test_lookup_takes_the_most_recent_longest_ngram():
    history = jnp.array([[1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3, 0, 0],  # 1 2 3 twice before: the later one
                         [4, 5, 6, 2, 2, 8, 8, 3, 3, 1, 1, 9, 4, 5, 0, 0],  # no 9 4 5 before; 4 5 -> 6 2 2
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 0]])  # nothing repeats
    drafts, found = speculative.lookup(history, jnp.int32(14), 3)
    np.testing.assert_array_equal(drafts[:2], [[7, 8, 5], [6, 2, 2]])
    assert found.tolist() == [True, True, False]
    assert speculative.lookup(history, jnp.int32(7), 3)[1].tolist() == [True, False, False]  # row 0 ends 1 2, seen at 0


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[keep].astype(np.float64) / probs[keep].astype(np.float64).sum() * counts.sum()
    return stats.chisquare(counts[keep], expected * counts.sum() / expected.sum()).pvalue


def test_sampled_acceptance_draws_from_the_target_distribution():
    V, K, N = 12, 2, 40_000
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.normal(0, 1.5, (1, K + 1, V)), jnp.float32)
    sampling = SamplingParams(jnp.array([0.9]), jnp.array([8]), jnp.array([0.95]))
    drafts = jnp.array([[int(np.argsort(logits[0, 0])[-2]), 3]])  # the second likeliest, then any token
    keys = jax.random.split(jax.random.key(1), N)
    tokens, count = jax.jit(jax.vmap(lambda key: speculative.accept_sampled(logits, drafts, key[None], sampling)))(keys)
    tokens, count = np.asarray(tokens[:, 0]), np.asarray(count[:, 0])
    p = np.asarray(jax.nn.softmax(filter_logits(logits[0] / 0.9, jnp.array([8] * 3), jnp.array([0.95] * 3)), axis=-1))
    assert chi_square_p(np.bincount(tokens[:, 0], minlength=V), p[0]) > 1e-3
    kept = tokens[:, 0] == int(drafts[0, 0])  # the first draft kept: the next token follows position 1's p
    assert np.all(count[~kept] == 1) and np.all(count[kept] >= 2) and 0.05 < kept.mean() < 0.95
    assert chi_square_p(np.bincount(tokens[kept, 1], minlength=V), p[1]) > 1e-3
    greedy, n = speculative.accept_sampled(logits, drafts, keys[:1], sampling._replace(temperature=jnp.array([0.0])))
    assert int(greedy[0, 0]) == int(np.argmax(logits[0, 0])) and int(n[0]) == 1  # temperature 0: the argmax


@pytest.mark.parametrize("family", ["gptj", "neo", "neox"])
def test_greedy_speculation_is_plain_greedy_decoding(tmp_path, family):
    lm = mtj.load(family_model(tmp_path / family, family), dtype="float32")
    rng = np.random.RandomState(2)
    passage = rng.randint(1, 300, 24).tolist()
    prompts = [passage + passage[:6], [7, 8, 9] * 10, rng.randint(1, 300, 20).tolist()]  # (one prompt bucket)
    want = lm.generate_tokens(prompts, 90, temperature=0)
    before = lm.generator.drafts.copy()
    assert [lm.generate_tokens([p], 90, temperature=0, speculate=4)[0] for p in prompts] == want
    drafted, kept = lm.generator.drafts - before
    assert kept >= 5 and drafted > kept  # drafts were verified, some of them kept and some not
    engine = SlotEngine(lm, slots=2, speculate=4)  # each slot speculates on its own
    try:
        reqs = [Request(p, 90) for p in prompts]
        engine.submit(reqs)
        for r in reqs:
            r.wait()
        if family == "gptj":  # sampled: a seeded request's tokens are its own, alone or among others
            alone = Request(prompts[1], 40, temperature=0.9, seed=5)
            engine.submit([alone])
            alone.wait()
            crowd = [Request(p, 40, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
            again = Request(prompts[1], 40, temperature=0.9, seed=5)
            engine.submit(crowd[:2] + [again] + crowd[2:])
            for r in crowd + [again]:
                r.wait()
            assert again.tokens == alone.tokens and len(alone.tokens) == 40
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == want and engine.drafts[1] >= 5
    if family == "gptj":  # a batch (it takes what all its rows agree on), and streaming
        assert lm.generate_tokens(prompts, 90, temperature=0, speculate=4) == want
        streamed = []
        lm.generate_tokens(prompts[:1], 90, temperature=0, speculate=4, on_tokens=lambda step, t: streamed.append(int(t[0])))
        assert streamed == want[0]
    with pytest.raises(ValueError, match="speculate must be in"):
        lm.generate_tokens(prompts, 4, speculate=-1)


def test_sampled_speculation_follows_the_plain_distribution(tmp_path):
    """The 6th new token of 300 seeded prompts, decoded alone (a batch speculates only as far as all its rows
    agree), without speculation, with prompt lookup and with a draft model, and by the engine with the draft model:
    one distribution (chi-square), on a model whose vocabulary is small enough to count."""
    from conftest import SHARP, hf_gptj

    lm = mtj.load(hf_gptj(tmp_path / "small", vocab_size=8, n_positions=64, n_embd=32, n_head=4, rotary_dim=4,
                          **SHARP), dtype="float32")
    prompt, rows = [1, 2, 3, 1, 2, 3, 1, 2], 300
    plain = np.array([lm.generate_tokens([prompt], 8, temperature=1.0, seed=s)[0] for s in range(rows)])
    before = lm.generator.drafts.copy()
    fast = np.array([lm.generate_tokens([prompt], 8, temperature=1.0, seed=s, speculate=3)[0]
                     for s in range(rows, 2 * rows)])
    assert (lm.generator.drafts - before)[1] > 60
    small = mtj.load(hf_gptj(tmp_path / "draft", vocab_size=8, n_positions=64, n_embd=16, n_head=2, rotary_dim=4,
                             n_layer=1, seed=3, **SHARP), dtype="float32")
    lm.set_draft(small)  # drafts from a model's own q
    before = lm.generator.drafts.copy()
    drafted = np.array([lm.generate_tokens([prompt], 8, temperature=1.0, seed=s, speculate=3)[0]
                        for s in range(2 * rows, 3 * rows)])
    assert (lm.generator.drafts - before)[1] > 60
    engine = SlotEngine(lm, slots=8, max_queue=rows, speculate=3, draft=small)  # every slot drafting on its own
    served = [Request(prompt, 8, temperature=1.0, seed=s) for s in range(3 * rows, 4 * rows)]
    try:
        engine.submit(served)
        for r in served:
            r.wait()
    finally:
        engine.stop()
    assert engine.drafts[1] > 60
    engine_tokens = np.array([r.tokens for r in served])
    table = np.array([np.bincount(t[:, 5], minlength=8) for t in (plain, fast, drafted, engine_tokens)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_acceptance_with_a_draft_distribution_draws_from_the_target():
    """Drafts drawn from a draft model's q: kept with probability min(1, p/q), replaced from max(0, p - q)."""
    V, K, N = 10, 2, 40_000
    rng = np.random.RandomState(3)
    logits = jnp.asarray(rng.normal(0, 1.5, (1, K + 1, V)), jnp.float32)
    q = jax.nn.softmax(jnp.asarray(rng.normal(0, 1.5, (1, K, V)), jnp.float32), axis=-1)
    sampling = SamplingParams(jnp.array([1.0]), jnp.array([0]), jnp.array([1.0]))
    keys = jax.random.split(jax.random.key(2), N)

    def one(key):
        drafts = jax.random.categorical(jax.random.fold_in(key, 7), jnp.log(q[0]))[None].astype(jnp.int32)  # [1, K]
        return speculative.accept_sampled(logits, drafts, key[None], sampling, q)

    tokens, count = jax.jit(jax.vmap(one))(keys)
    tokens = np.asarray(tokens[:, 0])
    p = np.asarray(jax.nn.softmax(logits[0], axis=-1))
    assert chi_square_p(np.bincount(tokens[:, 0], minlength=V), p[0]) > 1e-3
    assert 0.2 < float((np.asarray(count[:, 0]) > 1).mean()) < 0.95


def test_a_draft_model_keeps_greedy_output(tmp_path):
    from conftest import SHARP, hf_gptj

    lm = mtj.load(family_model(tmp_path / "target", "gptj"), dtype="float32")
    prompts = [[7, 8, 9] * 8, np.random.RandomState(4).randint(1, 300, 20).tolist()]
    want = [lm.generate_tokens([p], 60, temperature=0)[0] for p in prompts]
    lm.set_draft(mtj.load(family_model(tmp_path / "self", "gptj"), dtype="float32"))  # the same weights: q = p
    before = lm.generator.drafts.copy()
    assert [lm.generate_tokens([p], 60, temperature=0, speculate=4)[0] for p in prompts] == want
    drafted, kept = lm.generator.drafts - before
    assert kept >= 0.9 * drafted > 0  # its own drafts agree with it: the two caches stay in step
    small = mtj.load(hf_gptj(tmp_path / "small", vocab_size=300, n_positions=128, n_embd=16, n_head=2, rotary_dim=4,
                             n_layer=1, seed=5, **SHARP), dtype="float32")
    lm.set_draft(small)
    assert lm.generate_tokens(prompts, 60, temperature=0, speculate=3) == want  # (a batch)
    sampled = lm.generate_tokens(prompts, 30, temperature=0.8, seed=[1, 2], speculate=3)
    assert [len(s) for s in sampled] == [30, 30]
    with pytest.raises(ValueError, match="the target's vocabulary"):
        lm.set_draft(mtj.load(hf_gptj(tmp_path / "other", vocab_size=301, n_positions=128, n_embd=16, n_head=2,
                                      rotary_dim=4, n_layer=1), dtype="float32"))


def test_a_draft_model_in_the_engine(tmp_path):
    """The continuous engine drafting with the model itself (its drafts agree: the slots' draft caches stay in step)
    and with a GPT-Neo of the same vocabulary beside a prefix cache: greedy requests keep plain greedy output, also
    among sampled ones, through slot reuse and a one-token prompt."""
    from conftest import SHARP
    from test_neo_neox import hf_model

    lm = mtj.load(family_model(tmp_path / "target", "gptj"), dtype="float32")
    rng = np.random.RandomState(6)
    prompts = [[7, 8, 9] * 8, rng.randint(1, 300, 20).tolist(), [5], rng.randint(1, 300, 37).tolist()]
    want = [lm.generate_tokens([p], 40, temperature=0)[0] for p in prompts]
    hf_model(tmp_path / "neo", "neo", 1, hidden_size=16, num_layers=1, num_heads=2, vocab_size=300, window_size=40,
             max_position_embeddings=128, attention_types=[[["global"], 1]], **SHARP)
    own, neo = (mtj.load(path, dtype="float32") for path in (family_model(tmp_path / "own", "gptj"), tmp_path / "neo"))
    for draft, cache_gb in ((own, 0.0), (neo, 0.0005)):
        engine = SlotEngine(lm, slots=2, speculate=4, draft=draft, prefix_cache_gb=cache_gb)
        try:
            greedy = [Request(p, 40) for p in prompts]
            sampled = [Request(p, 30, temperature=0.8, seed=i) for i, p in enumerate(prompts)]
            engine.submit([r for pair in zip(greedy, sampled) for r in pair])
            for r in greedy + sampled:
                r.wait()
        finally:
            engine.stop()
        assert [r.tokens for r in greedy] == want and [len(r.tokens) for r in sampled] == [30] * 4
        drafted, kept = engine.drafts
        assert kept >= (0.9 * drafted if draft is own else 1) and drafted > 0
    with pytest.raises(ValueError, match="give --speculate K too"):
        SlotEngine(lm, slots=2, draft=own)


def test_a_draft_model_through_the_server(tmp_path):
    """`mtj-serve --speculate 3 --draft-ckpt CKPT`: greedy completions are generate_tokens' and /metrics counts the
    draft model's tokens; --draft-ckpt without --speculate is refused before anything loads."""
    from conftest import SHARP, hf_gptj
    from test_serve import Running, request

    paths = {}
    for name, kw in (("target", dict(n_embd=32, n_head=4)), ("draft", dict(n_embd=16, n_head=2, n_layer=1))):
        paths[name] = hf_gptj(tmp_path / name, seed=len(paths), vocab_size=50257, n_positions=128, rotary_dim=4,
                              bos_token_id=50256, eos_token_id=50256, **kw, **SHARP)
        load_tokenizer("gpt2").save_pretrained(paths[name])
    lm = mtj.load(paths["target"], dtype="float32")
    srv = Running(paths["target"], "--dtype", "float32", "--speculate", "3", "--draft-ckpt", str(paths["draft"]))
    try:
        for prompt in ["Once upon a time", "one two one two one two one"]:
            want = lm.decode_new(lm.generate_tokens([lm.tokenizer.encode(prompt)], 24, temperature=0)[0])
            status, body = request(srv.port, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
            assert status == 200 and json.loads(body)["choices"][0]["text"] == want
        metrics = request(srv.port, "/metrics")[1]
    finally:
        assert srv.stop() == 0
    assert float(re.search(r"^mtj_spec_decode_draft_tokens_total (\S+)", metrics, re.M).group(1)) > 0
    refused = subprocess.run([sys.executable, "scripts/serve.py", "--ckpt", str(tmp_path / "nowhere"), "--draft-ckpt",
                              str(paths["draft"])], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "give --speculate K too" in refused.stderr


def test_speculation_through_the_screened_head_and_scanned_layers(tmp_path, monkeypatch):
    """Greedy speculation where the bf16 head screen decides plain steps (forced here as on CPUs with AMX), also
    when it can decide none (every step falls back to the full head), and over scanned layers' stacked cache."""
    from conftest import SHARP, hf_gptj
    from mtj import platforms
    from mtj.decode import cpu as cpu_decode

    monkeypatch.setattr(cpu_decode, "has_amx", lambda: True)
    prompts = [[5, 6, 7, 8] * 6, list(range(40, 60))]
    lm = mtj.load(hf_gptj(tmp_path / "hf", vocab_size=1000, n_positions=128, n_embd=64, n_head=4, rotary_dim=8,
                          **SHARP), dtype="float32")
    want = [lm.generate_tokens([p], 70, temperature=0)[0] for p in prompts]
    assert lm.generator._screen_head is not None  # (the screen is on)
    assert [lm.generate_tokens([p], 70, temperature=0, speculate=4)[0] for p in prompts] == want
    head = lm.generator._screen_head
    lm.generator._screen_head = {**head, "w_norm": head["w_norm"] * 1e6}  # every step falls back to the full head
    assert [lm.generate_tokens([p], 70, temperature=0, speculate=4)[0] for p in prompts] == want
    deep = mtj.load(hf_gptj(tmp_path / "deep", vocab_size=1000, n_positions=128, n_embd=32, n_head=4, rotary_dim=4,
                            n_layer=platforms.platform("cpu").unroll_layers + 1, **SHARP), dtype="float32")
    want = [deep.generate_tokens([p], 70, temperature=0)[0] for p in prompts]
    before = deep.generator.drafts.copy()
    assert [deep.generate_tokens([p], 70, temperature=0, speculate=4)[0] for p in prompts] == want
    assert (deep.generator.drafts - before)[1] > 0
