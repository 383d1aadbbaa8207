"""logit_bias and the repetition, presence and frequency penalties (mtj/decode/penalties.py) against
transformers' logits processors and OpenAI's definition, on the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                  SequenceBiasLogitsProcessor)

from mtj.decode import penalties as P

B, V = 3, 40


def case(seed: int):
    """Logits of both signs, each row's prompt and generated tokens (with repeats), and its state."""
    rng = np.random.RandomState(seed)
    logits = rng.normal(0, 3, (B, V)).astype(np.float32)
    prompt, generated = rng.randint(0, V, (B, 6)), rng.randint(0, V // 2, (B, 8))
    seen = P.seen_prompt(jnp.asarray(prompt), jnp.ones(prompt.shape, bool), V)
    for t in generated.T:
        seen = P.add(seen, jnp.asarray(t))
    return logits, prompt, generated, seen


def penalties(bias=None, repetition=1.0, presence=0.0, frequency=0.0) -> P.Penalties:
    row = P.bias_row(bias, V)
    return P.Penalties(jnp.asarray(np.stack([row] * B)), *(jnp.full(B, v, jnp.float32) for v in (repetition, presence, frequency)))


def test_repetition_penalty_is_transformers():
    logits, prompt, generated, seen = case(0)
    for r in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(r)(torch.tensor(np.concatenate([prompt, generated], 1)), torch.tensor(logits))
        np.testing.assert_allclose(P.apply(jnp.asarray(logits), penalties(repetition=r), seen), want.numpy(), rtol=1e-6)


def test_logit_bias_is_transformers_sequence_bias():
    logits, prompt, generated, seen = case(1)
    bias = {3: 5.0, 17: -100.0, 39: 0.5}
    want = SequenceBiasLogitsProcessor([[[t], v] for t, v in bias.items()])(torch.tensor(prompt), torch.tensor(logits))
    np.testing.assert_allclose(P.apply(jnp.asarray(logits), penalties(bias), seen), want.numpy(), rtol=1e-6)


def test_presence_and_frequency_are_openais_definition():
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting generated tokens only (transformers has no
    processor for these)."""
    logits, prompt, generated, seen = case(2)
    counts = np.stack([np.bincount(g, minlength=V) for g in generated])
    for presence, frequency in ((0.8, 0.0), (0.0, 0.6), (-0.5, 1.5)):
        want = logits - counts * frequency - (counts > 0) * presence
        got = P.apply(jnp.asarray(logits), penalties(presence=presence, frequency=frequency), seen)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_speculative_step_sees_its_drafts_as_generated():
    logits, _, _, seen = case(3)
    rng = np.random.RandomState(3)
    drafts = rng.randint(0, V // 4, (B, 3))  # (repeats within a draft)
    step = rng.normal(0, 3, (B, 4, V)).astype(np.float32)
    values = penalties({1: 2.0}, repetition=1.4, presence=0.3, frequency=0.7)
    got = P.apply_along(jnp.asarray(step), values, seen, jnp.asarray(drafts))
    for j in range(4):
        np.testing.assert_allclose(got[:, j], P.apply(jnp.asarray(step[:, j]), values, seen), rtol=1e-6)
        if j < 3:
            seen = P.add(seen, jnp.asarray(drafts[:, j]))


def test_bad_values_are_named():
    P.check_penalties(1.0, 0.0, 0.0, {0: 100.0}, V)
    for args, message in (((0.0, 0, 0, {}), "repetition_penalty must be"), ((1.0, 2.5, 0, {}), "presence_penalty"),
                          ((1.0, 0, float("nan"), {}), "frequency_penalty"), ((1.0, 0, 0, {V: 1.0}), "outside the vocab"),
                          ((1.0, 0, 0, {2: 101.0}), "logit_bias values")):
        with pytest.raises(ValueError, match=message):
            P.check_penalties(*args, V)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties as a transformers logits processor (it has none), counting the
    tokens after the prompt's `start`."""

    def __init__(self, start: int, presence: float, frequency: float):
        self.start, self.presence, self.frequency = start, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def test_greedy_generation_with_them_is_transformers_generate(tmp_path):
    """The same random GPT-J (fp32) in transformers' generate and generate_tokens, each option alone and all
    together: the same tokens, other than without them; per row in a batch, and through speculative decoding."""
    import transformers

    import mtj
    from conftest import SHARP, hf_gptj

    path = hf_gptj(tmp_path / "hf", vocab_size=300, n_positions=128, n_embd=32, n_head=4, rotary_dim=4, **SHARP)
    lm = mtj.load(path, dtype="float32")
    model = transformers.GPTJForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [5, 9, 5, 9, 5, 17, 23, 5, 9]
    new = 40
    settings = [dict(repetition_penalty=1.8), dict(logit_bias={9: 4.0, 23: -100.0, 44: 6.0}),
                dict(presence_penalty=1.5), dict(frequency_penalty=0.8),
                dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.2, logit_bias={7: 3.0})]
    plain = lm.generate_tokens([prompt], new, temperature=0)[0]
    wants = []
    for kw in settings:
        processors = transformers.LogitsProcessorList([OpenAIPenalties(len(prompt), kw.get("presence_penalty", 0.0),
                                                                       kw.get("frequency_penalty", 0.0))])
        hf_kw = {"sequence_bias": [[[t], v] for t, v in kw["logit_bias"].items()]} if "logit_bias" in kw else {}
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0,
                                 repetition_penalty=kw.get("repetition_penalty", 1.0), logits_processor=processors,
                                 **hf_kw)
        want = out[0, len(prompt):].tolist()  # (to its EOS, token 0, if it made one: mtj's has no tokenizer here)
        got = lm.generate_tokens([prompt], new, temperature=0, **kw)[0]
        assert got[:len(want)] == want and got != plain, kw
        wants.append(got)
    batch = lm.generate_tokens([prompt] * len(settings), new, temperature=0,
                               **{k: [kw.get(k, d) for kw in settings] for k, d in
                                  (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                   ("logit_bias", None))})
    assert batch == wants
    assert [lm.generate_tokens([prompt], new, temperature=0, speculate=4, **kw)[0] for kw in settings] == wants
    lm.set_draft(mtj.load(path, dtype="float32"))  # its own drafts, unpenalized: they repeat within a step
    assert [lm.generate_tokens([prompt], new, temperature=0, speculate=4, **kw)[0] for kw in settings] == wants


def test_the_sample_command_takes_them(tmp_path):
    """mtj-sample's --repetition-penalty, --presence-penalty, --frequency-penalty and --logit-bias give
    generate_tokens' tokens; a value out of range is refused before the model loads, a token id after it."""
    import json
    import subprocess
    import sys

    import mtj
    from conftest import REPO, SHARP, hf_gptj
    from mtj.tokenizer import load_tokenizer

    path = hf_gptj(tmp_path / "hf", vocab_size=50257, n_positions=128, n_embd=32, n_head=4, rotary_dim=4,
                   bos_token_id=50256, eos_token_id=50256, **SHARP)
    load_tokenizer("gpt2").save_pretrained(path)
    lm = mtj.load(path, dtype="float32")
    ids = lm.tokenizer.encode("the cat and the cat")
    kw = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={262: -100.0, 50256: -100.0})

    def sample(*args):
        return subprocess.run([sys.executable, "scripts/sample.py", "--ckpt", str(path), "--dtype", "float32",
                               "--prompt", "the cat and the cat", "--temperature", "0", "--max-new-tokens", "12", "--json",
                               *args], capture_output=True, text=True, cwd=REPO)

    done = sample("--repetition-penalty", "1.5", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
                  "--logit-bias", "262:-100,50256:-100")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["tokens"] == lm.generate_tokens([ids], 12, temperature=0, **kw)[0]
    refused = sample("--presence-penalty", "3")
    assert refused.returncode == 2 and "presence_penalty must be in [-2, 2]" in refused.stderr
    refused = sample("--logit-bias", "60000:1")
    assert refused.returncode == 1 and "outside the vocabulary" in refused.stderr


def test_both_engines_take_them_per_row(tmp_path):
    """The static batcher and the continuous engine (plain and speculative) decode requests with and without
    adjustments, side by side and one after another in a slot (a bias does not outlive its request), as
    generate_tokens does each alone."""
    import mtj
    from conftest import SHARP, hf_gptj
    from mtj.serve.scheduler import SlotEngine, StaticBatcher
    from test_engine import Request

    lm = mtj.load(hf_gptj(tmp_path / "hf", vocab_size=300, n_positions=128, n_embd=32, n_head=4, rotary_dim=4, **SHARP),
                  dtype="float32")
    prompts = [[5, 9, 5, 9, 5, 17, 23, 5, 9], [40, 41, 42, 40, 41]]
    settings = [dict(logit_bias={9: 4.0, 23: -100.0, 44: 6.0}), {}, dict(repetition_penalty=1.8),
                dict(presence_penalty=1.5, frequency_penalty=0.8), {}]
    cases = [(p, kw) for p in prompts for kw in settings]
    want = [lm.generate_tokens([p], 30, temperature=0, **kw)[0] for p, kw in cases]
    assert len({tuple(w) for w in want}) > len(prompts) + 1  # (they change the output)
    for make in (lambda: StaticBatcher(lm, max_batch=4), lambda: SlotEngine(lm, slots=1),  # (one slot: in turn)
                 lambda: SlotEngine(lm, slots=3, speculate=3)):
        engine = make()
        reqs = [Request(p, 30, **kw) for p, kw in cases]
        try:
            engine.submit(reqs)
            for r in reqs:
                r.wait()
        finally:
            engine.stop()
        assert [r.tokens for r in reqs] == want, type(engine).__name__
