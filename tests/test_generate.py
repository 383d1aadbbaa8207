"""Generation: greedy parity with transformers, sampling filters and statistics, seeds, stops."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import mtj
from conftest import assert_greedy, hf_gptj
from mtj import platforms
from mtj.decode import cpu as cpu_decode
from mtj.decode.cache import empty_cache
from mtj.decode.cpu import blocked_argmax, screen_head, screened_argmax
from mtj.decode.generator import bucket
from mtj.decode.sampling import SamplingParams, filter_logits, sample
from mtj.decode.stops import truncate_at_stop
from mtj.tokenizer import load_tokenizer

PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def hf_greedy(model, prompts, new):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers expects for generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    import transformers

    path = hf_gptj(tmp_path_factory.mktemp("gen") / "hf", vocab_size=1000, n_positions=128, n_embd=64, n_head=4,
                   rotary_dim=8, n_layer=2)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(autouse=True)
def screened(monkeypatch):
    """Greedy fp32 decoding here goes through the bf16 head screen on any CPU (mtj uses it on CPUs
    with AMX only), so the screen's exactness is tested everywhere; other files test the plain head."""
    monkeypatch.setattr(cpu_decode, "has_amx", lambda: True)


def test_greedy_matches_transformers(gptj):
    path, model = gptj
    lm = mtj.load(path, dtype="float32")
    assert lm.generate_tokens([PROMPTS[1]], max_new_tokens=32, temperature=0) == hf_greedy(model, [PROMPTS[1]], 32)
    expected = hf_greedy(model, PROMPTS, 32)
    assert lm.generate_tokens(PROMPTS, max_new_tokens=32, temperature=0) == expected
    # each prompt alone gives what it gives in the batch
    assert [lm.generate_tokens([p], 32, temperature=0)[0] for p in PROMPTS] == expected
    sharded = mtj.load(path, mp=4, dtype="float32")
    assert sharded.generate_tokens(PROMPTS, max_new_tokens=32, temperature=0) == expected


def test_long_generations_grow_the_cache(tmp_path):
    """64+ new tokens decode in phases over a growing KV cache: greedy (screened and not) and the
    sampling path (top_k=1 is greedy) still give transformers' tokens."""
    import transformers

    # large weights: sharp attention, so a key or value misplaced in the cache changes the tokens
    path = hf_gptj(tmp_path / "hf", vocab_size=1000, n_positions=128, n_embd=64, n_head=4, rotary_dim=8, n_layer=2,
                   initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    lm = mtj.load(path, dtype="float32")
    expected = hf_greedy(model, PROMPTS, 70)
    assert lm.generate_tokens(PROMPTS, 70, temperature=0) == expected
    head = lm.generator._screen_head
    lm.generator._screen_head = {**head, "w_norm": head["w_norm"] * 1e6}  # every step falls back to the full head
    assert lm.generate_tokens(PROMPTS, 70, temperature=0) == expected
    lm.generator._screen_head = head
    assert lm.generate_tokens(PROMPTS[:1], 70, temperature=0) == expected[:1]
    assert lm.generate_tokens(PROMPTS, 70, temperature=1.0, top_k=1, seed=3) == expected
    # deeper than the CPU's unroll_layers: scanned layers over one stacked cache
    path = hf_gptj(tmp_path / "deep", vocab_size=1000, n_positions=128, n_embd=32, n_head=4, rotary_dim=4,
                   n_layer=platforms.platform("cpu").unroll_layers + 1, initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert mtj.load(path, dtype="float32").generate_tokens(PROMPTS, 70, temperature=0) == hf_greedy(model, PROMPTS, 70)


def test_the_cpu_cache_dtype_is_fp32_and_decodes_as_the_compute_dtype(tmp_path, monkeypatch):
    """On CPU a bf16 model's KV cache is fp32 (XLA:CPU rewrites a bf16 array whole to update a row of it);
    attention reads it back in bf16, so greedy tokens are those of a bf16 cache."""
    path = hf_gptj(tmp_path / "hf", vocab_size=1000, n_positions=128, n_embd=64, n_head=4, rotary_dim=8, n_layer=2,
                   initializer_range=0.3)
    lm = mtj.load(path, dtype="bfloat16")
    assert jax.eval_shape(lambda: empty_cache(lm.config, 1, 8))[0][0].dtype == jnp.float32
    fp32_cache = lm.generate_tokens(PROMPTS, 70, temperature=0)
    monkeypatch.setitem(platforms.PLATFORMS, "cpu", dataclasses.replace(platforms.platform("cpu"), cache_float32=False))
    lm = mtj.load(path, dtype="bfloat16")
    assert jax.eval_shape(lambda: empty_cache(lm.config, 1, 8))[0][0].dtype == jnp.bfloat16
    assert lm.generate_tokens(PROMPTS, 70, temperature=0) == fp32_cache


def test_streaming_callback_sees_every_token(gptj):
    lm = mtj.load(gptj[0], dtype="float32")
    seen = []
    out = lm.generate_tokens(PROMPTS[:2], 6, temperature=0, on_tokens=lambda step, toks: seen.append((step, toks.tolist())))
    assert [s for s, _ in seen] == list(range(6))
    assert [[t[i] for _, t in seen] for i in range(2)] == out


def test_the_token_callback_ends_rows(gptj):
    lm = mtj.load(gptj[0], dtype="float32")
    eos = lm.generator.eos_id
    full = lm.generate_tokens(PROMPTS[:3], 40, temperature=0)
    steps = []

    def end_row_0_at_3_and_row_2_at_5(step: int, tokens: np.ndarray) -> np.ndarray:
        steps.append(step)
        return np.array([step >= 3, False, step >= 5])

    out = lm.generate_tokens(PROMPTS[:3], 40, temperature=0, on_tokens=end_row_0_at_3_and_row_2_at_5)
    assert out[1] == full[1]  # a row nobody ends decodes as before
    assert out[0] == full[0][:4] + [eos] and out[2] == full[2][:6] + [eos]  # ended rows stop there
    assert len(steps) == 40
    ended_all = []
    lm.generate_tokens(PROMPTS[:3], 40, temperature=0,
                       on_tokens=lambda step, t: (ended_all.append(step), np.full(3, step >= 2))[1])
    assert ended_all == [0, 1, 2]  # every row ended: the decode loop stops


def test_top_k_top_p_filters():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4))
    out = filter_logits(logits, jnp.array([0, 2, 0, 3]), jnp.array([1.0, 1.0, 0.75, 0.55]))
    probs = np.array(jnp.exp(out - jnp.max(out, -1, keepdims=True)))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[0], [0.4, 0.3, 0.2, 0.1], atol=1e-6)  # nothing filtered
    np.testing.assert_allclose(probs[1], [4 / 7, 3 / 7, 0, 0], atol=1e-6)  # top-2
    np.testing.assert_allclose(probs[2], [4 / 9, 3 / 9, 2 / 9, 0], atol=1e-6)  # 0.4+0.3 < 0.75: add 0.2
    np.testing.assert_allclose(probs[3], [4 / 7, 3 / 7, 0, 0], atol=1e-6)  # top-3, then 0.4 < 0.55: add 0.3


def test_top_k_top_p_thresholds_equal_a_sorted_reference():
    """filter_logits finds its cuts by bisection; a plain sort per row (numpy) must agree, ties included."""
    rng = np.random.RandomState(0)
    V = 5000
    logits = (rng.randn(8, V) * np.array([0.01, 0.5, 1, 2, 4, 8, 1, 3])[:, None]).astype(np.float32)
    logits[6, :100] = 2.0  # a tie at the top_k edge
    logits[:, -7:] = -np.inf  # padded vocabulary
    top_k = np.array([0, 10, 4000, 0, 1, 100, 50, 0])
    top_p = np.array([0.9, 1.0, 0.5, 0.99, 1.0, 0.3, 1.0, 0.05], np.float32)
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))))
    for row in range(8):
        x = logits[row].astype(np.float64)
        order = np.sort(x)[::-1]
        kept = x >= (order[top_k[row] - 1] if top_k[row] else -np.inf)  # ties at the edge are kept
        p = np.exp(np.where(kept, x, -np.inf) - x.max())
        p /= p.sum()
        if top_p[row] < 1:
            desc = np.sort(p)[::-1]
            last = np.searchsorted(np.cumsum(desc), top_p[row])  # the first rank whose mass reaches top_p
            kept &= p >= desc[last]
        np.testing.assert_array_equal(got[row], kept, err_msg=f"row {row}")


@pytest.mark.parametrize("width", [50432, 4096, 97])
def test_blocked_argmax_is_the_first_largest(width):
    rng = np.random.RandomState(width)
    x = rng.randn(6, width).astype(np.float32)
    x[1, [5, width - 3]] = 9.0  # a tie: the first one wins
    x[2, :] = 0.0
    x[3, -40:] = -np.inf  # padded vocabulary columns
    x[4, width - 1] = 5.0  # the last column
    x[5, 0] = 5.0
    np.testing.assert_array_equal(np.asarray(blocked_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_screened_argmax_is_the_fp32_argmax_or_says_it_is_unsure():
    from mtj.config import Config

    cfg = Config(n_vocab=4000, d_model=64, layers=1, n_heads=4, seq=32, dtype="float32")
    rng = np.random.RandomState(0)
    kernel = rng.randn(64, cfg.padded_vocab).astype(np.float32) * 0.02
    kernel[:, 3001] = kernel[:, 7]  # an exact tie across blocks: the first column wins
    bias = (rng.randn(cfg.padded_vocab) * 0.01).astype(np.float32)
    bias[3001] = bias[7]
    head = screen_head({"lm_head": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}, cfg)
    x = rng.randn(64, 64).astype(np.float32)
    x[0] = kernel[:, 7] * 400  # makes column 7 (and its twin) the largest
    full = np.argmax(x @ kernel + bias + np.where(np.arange(cfg.padded_vocab) < 4000, 0, -1e30), axis=-1)
    assert full[0] == 7
    decided = 0
    for rows, expected in zip(np.split(x, 8), np.split(full, 8)):
        token, sure = screened_argmax(jnp.asarray(rows), head)
        if sure:
            decided += 1
            np.testing.assert_array_equal(np.asarray(token), expected)
    assert decided >= 6  # random logits are rarely close enough to need the full head
    loose = {**head, "w_norm": head["w_norm"] * 1e6}  # bounds too wide to decide anything
    assert not bool(screened_argmax(jnp.asarray(x[:8]), loose)[1])


def test_greedy_batches_fall_back_to_the_full_head(gptj):
    """When the bf16 screen cannot decide, the step is retried with the full fp32 head."""
    path, model = gptj
    lm = mtj.load(path, dtype="float32")
    expected = hf_greedy(model, PROMPTS, 32)
    assert lm.generate_tokens(PROMPTS, 32, temperature=0) == expected
    head = lm.generator._screen_head
    assert head is not None  # the batch above was screened
    lm.generator._screen_head = {**head, "w_norm": head["w_norm"] * 1e6}  # never decides
    seen = []
    out = lm.generate_tokens(PROMPTS, 32, temperature=0, on_tokens=lambda step, toks: seen.append(step))
    assert out == expected and seen == list(range(32))


def test_greedy_batches_of_a_small_vocabulary(tmp_path):
    """Too few vocabulary blocks for the screen: the full head decides (it used to fail in top_k)."""
    import transformers

    path = hf_gptj(tmp_path / "hf", vocab_size=100, n_positions=64, n_embd=32, n_head=4, rotary_dim=4, n_layer=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    lm = mtj.load(path, dtype="float32")
    prompts = [[p % 100 for p in prompt] for prompt in PROMPTS]
    assert lm.generate_tokens(prompts, 16, temperature=0) == hf_greedy(model, prompts, 16)
    assert lm.generator._screen_head is None


def test_temperature_sampling_frequencies():
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature, draws = 0.7, 20000
    keys = jax.random.split(jax.random.key(0), draws)
    padded = jnp.full((draws, 256), -1e30).at[:, :5].set(logits)  # as the model's padded vocabulary
    tokens = np.asarray(sample(padded, keys, SamplingParams(jnp.full(draws, temperature), jnp.zeros(draws, jnp.int32),
                                                            jnp.ones(draws))))
    expected = np.exp(np.asarray(logits) / temperature)
    expected = expected / expected.sum() * draws
    observed = np.bincount(tokens, minlength=256)[:5]
    assert observed.sum() == draws
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 18.47, (observed, expected)  # chi-square 0.999 quantile, 4 degrees of freedom
    greedy = sample(logits[None], keys[:1], SamplingParams(jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1)))
    assert int(greedy[0]) == 0


def test_seeds_and_stop(tmp_path):
    path = hf_gptj(tmp_path / "hf", vocab_size=50257, n_positions=64, n_embd=32, n_head=4, rotary_dim=4,
                   bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(path)
    lm = mtj.load(path, dtype="float32")
    a = lm.generate("Hello there", max_new_tokens=12, temperature=1.0, seed=5)
    assert a == lm.generate("Hello there", max_new_tokens=12, temperature=1.0, seed=5)
    assert a != lm.generate("Hello there", max_new_tokens=12, temperature=1.0, seed=6)
    assert truncate_at_stop("one two. three", [".", "three"]) == "one two"
    text = lm.generate(["Hello there"], max_new_tokens=12, temperature=1.0, seed=5)[0]
    if len(text) > 2:
        stop = text[1:3]
        assert lm.generate("Hello there", max_new_tokens=12, temperature=1.0, seed=5, stop=[stop])[0] == text[:text.find(stop)]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        lm.generate_tokens([[1] * 60], max_new_tokens=10)
    # the sampling values are checked as the server checks them, before any cast could wrap them
    for bad, named in [(dict(top_p=0.0), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(top_k=lm.config.n_vocab + 1), "top_k"), (dict(temperature=float("inf")), "temperature"),
                       (dict(seed=2**32), "seed"), (dict(seed=[0, -1]), "seed")]:
        with pytest.raises(ValueError, match=named):
            lm.generate_tokens([[1, 2], [3]], max_new_tokens=2, **bad)
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(3, 1) == 4


def test_slim_checkpoint_samples_like_the_original(tmp_path, gptj):
    import subprocess
    import sys

    from conftest import REPO

    path, _ = gptj
    subprocess.run([sys.executable, str(REPO / "scripts" / "from_hf.py"), "--hf", str(path), "--out",
                    str(tmp_path / "full")], check=True, cwd=REPO)
    subprocess.run([sys.executable, str(REPO / "scripts" / "slim.py"), "--ckpt", str(tmp_path / "full"), "--out",
                    str(tmp_path / "slim")], check=True, cwd=REPO)
    slim = mtj.load(tmp_path / "slim")
    assert slim.config.param_dtype == "bfloat16" and slim.params["wte"].dtype == jnp.bfloat16
    assert not (tmp_path / "slim" / "step_0" / "opt_state").exists()
    full = mtj.load(tmp_path / "full")
    np.testing.assert_allclose(slim.logits([[1, 2, 3]]), full.logits([[1, 2, 3]]), atol=0.05)
    new = slim.generate_tokens([[1, 2, 3]], 8, temperature=0)[0]
    assert len(new) == 8
    assert_greedy(slim, [1, 2, 3], new, rel=0.01)  # decoding on the bf16 weights follows their forward pass


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    """A small sharp GPT-J with the GPT-2 tokenizer (context 64), its LM here, and mtj-sample on it."""
    import subprocess
    import sys

    from conftest import REPO, SHARP

    path = hf_gptj(tmp_path_factory.mktemp("sample") / "hf", vocab_size=50257, n_embd=32, n_head=4, rotary_dim=4,
                   bos_token_id=50256, eos_token_id=50256, **SHARP)
    load_tokenizer("gpt2").save_pretrained(path)

    def sample(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--ckpt", str(path), *args],
                              input=stdin, cwd=REPO, capture_output=True, text=True)

    sample.path = path
    return mtj.load(path), sample


def greedy_text(lm, prompt: str, new: int) -> str:
    return lm.decode_new(lm.generate_tokens([lm.tokenizer.encode(prompt)], new, temperature=0)[0])


def test_sample_command_one_shot_and_interactive(sampler):
    import json

    lm, sample = sampler
    done = sample("--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "Hello there" + greedy_text(lm, "Hello there", 5) + "\n"  # streamed as it decodes
    # no --prompt: one prompt per line of stdin (blank lines skipped), until its end
    done = sample("--json", "--max-new-tokens", "5", "--temperature", "0", stdin="Hello there\n\nThe king said\n")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["prompt"], r["completion"]) for r in rows] == \
        [(p, greedy_text(lm, p, 5)) for p in ("Hello there", "The king said")]
    # --stop ends the text before it, streamed or not
    full = greedy_text(lm, "The king said", 12)
    stop = full[3:5]
    for mode in ([], ["--json"]):
        done = sample("--prompt", "The king said", "--max-new-tokens", "12", "--temperature", "0", "--stop", stop, *mode)
        text = json.loads(done.stdout)["completion"] if mode else done.stdout[len("The king said"):-1]
        assert text == full[:full.index(stop)], (mode, done.stdout, done.stderr[-500:])
    # speculative decoding, its drafts from a draft model (here the model itself), streamed: the same text
    done = sample("--prompt", "The king said", "--max-new-tokens", "12", "--temperature", "0", "--speculate", "3",
                  "--draft-ckpt", str(sample.path))
    assert done.returncode == 0 and done.stdout == "The king said" + full + "\n", done.stderr[-2000:]


def test_sample_command_fits_the_context_checks_values_and_reports_its_seed(sampler):
    import concurrent.futures
    import re

    lm, sample = sampler
    ids = lm.tokenizer.encode("Hello there")
    # the default 128 new tokens do not fit a context of 64: it generates what fits, and says so
    done = sample("--prompt", "Hello there", "--temperature", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    room = lm.config.seq - len(ids)
    assert done.stdout == "Hello there" + greedy_text(lm, "Hello there", room) + "\n"
    assert f"note: {room} new tokens fit" in done.stderr
    long = sample("--prompt", "word " * 80)
    assert long.returncode == 1 and long.stderr.strip().splitlines()[-1] == \
        f"error: the prompt has {len(lm.tokenizer.encode('word ' * 80))} tokens and fills the model's context of 64: shorten it"
    bad = [(["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"), (["--top-k", "-3"], "top_k"),
           (["--temperature", "nan"], "temperature"), (["--temperature", "-1"], "temperature"),
           (["--num-samples", "0"], "--num-samples"), (["--max-new-tokens", "0"], "--max-new-tokens"),
           (["--seed", "-1"], "--seed"), (["--speculate", "17"], "--speculate"),
           (["--draft-ckpt", "x"], "--speculate")]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # refused before the model loads: each takes an import
        refusals = list(pool.map(lambda args: sample("--prompt", "x", *args), [args for args, _ in bad]))
    for (args, named), refused in zip(bad, refusals):
        assert refused.returncode == 2 and named in refused.stderr.strip().splitlines()[-1], (args, refused.stderr)
    too_big = sample("--prompt", "x", "--top-k", "60000")
    assert too_big.returncode == 1 and too_big.stderr.strip().splitlines()[-1].startswith("error: top_k must be in")
    # sampling is random unless seeded; each run reports the seed that repeats it
    runs = [sample("--prompt", "Hello there", "--max-new-tokens", "24", "--temperature", "2") for _ in range(2)]
    assert runs[0].stdout != runs[1].stdout
    seed = re.search(r"seed (\d+) \(--seed \1 repeats this\)", runs[0].stderr).group(1)
    again = sample("--prompt", "Hello there", "--max-new-tokens", "24", "--temperature", "2", "--seed", seed)
    assert again.stdout == runs[0].stdout and "repeats this" not in again.stderr
    # --help shows every default, 0 included
    assert "(default: 0)" in sample("--help").stdout
    # --dtype takes the command lines' spellings; greedy text in fp32 is the fp32 model's
    fp32 = sample("--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "fp32")
    want = greedy_text(mtj.load(sample.path, dtype="float32"), "Hello there", 6)
    assert fp32.returncode == 0 and fp32.stdout == "Hello there" + want + "\n", fp32.stderr
