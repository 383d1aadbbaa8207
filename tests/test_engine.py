"""The continuous-batching engine: slots decode requests of any mix exactly as generate_tokens does."""

import dataclasses
import gc
import queue
import time
import weakref

import numpy as np
import pytest

import mtj
from conftest import hf_gptj
from mtj.serve.scheduler import SlotEngine
from mtj.tokenizer import load_tokenizer


@dataclasses.dataclass(eq=False)
class Request:
    ids: list
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: bool = True
    stop: list = dataclasses.field(default_factory=list)
    tokens: list = dataclasses.field(default_factory=list)
    cancelled: bool = False
    ended: bool = False
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    times: list = dataclasses.field(default_factory=list)  # when each event arrived
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    queued_at: float = 0.0  # (the engine's timing, for /metrics)
    last_at: float = 0.0

    def wait(self) -> None:
        while True:
            kind, value = self.events.get(timeout=300)
            self.times.append(time.perf_counter())
            if kind == "done":
                assert value is None, value
                return


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = hf_gptj(tmp_path_factory.mktemp("engine") / "hf", vocab_size=50257, n_positions=256, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(path)
    return mtj.load(path, dtype="float32")


def requests(n: int, seed: int, **kw) -> list[Request]:
    rng = np.random.RandomState(seed)
    return [Request(rng.randint(0, 50000, rng.randint(1, 100)).tolist(), int(rng.randint(1, 60)), **kw) for _ in range(n)]


def test_any_mix_of_requests_decodes_as_generate_tokens(lm):
    reqs = requests(14, seed=0)
    want = [lm.generate_tokens([r.ids], r.max_new, temperature=0)[0] for r in reqs]
    engine = SlotEngine(lm, slots=4)
    try:
        engine.submit(reqs[:5])  # more than the slots at once, then more while they decode
        time.sleep(0.2)
        engine.submit(reqs[5:])
        for r in reqs:
            r.wait()
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == want


def test_prefill_buckets_are_an_option(lm):
    reqs = [Request(list(range(100, 100 + n)), 5) for n in (1, 6, 30, 120)]  # past the last bucket: the context
    engine = SlotEngine(lm, slots=2, prefill_buckets=[8, 50])
    try:
        assert engine.prefill_buckets == [8, 50, lm.config.seq]
        engine.submit(reqs)
        for r in reqs:
            r.wait()
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == [lm.generate_tokens([r.ids], 5, temperature=0)[0] for r in reqs]
    with pytest.raises(ValueError, match="prefill buckets must be positive"):
        SlotEngine(lm, prefill_buckets=[0, 16])


def test_seeded_sampling_is_the_same_alone_and_among_others(lm):
    engine = SlotEngine(lm, slots=4)
    try:
        alone = Request(lm.tokenizer.encode("Once upon a time"), 30, temperature=0.9, top_p=0.95, seed=11)
        engine.submit([alone])
        alone.wait()
        crowd = requests(6, seed=1, temperature=1.0)
        again = Request(alone.ids, 30, temperature=0.9, top_p=0.95, seed=11)
        engine.submit(crowd[:3] + [again] + crowd[3:])
        for r in crowd + [again]:
            r.wait()
    finally:
        engine.stop()
    assert again.tokens == alone.tokens and len(set(map(tuple, (r.tokens for r in crowd)))) > 1


def test_a_late_short_request_finishes_before_a_long_one(lm):
    engine = SlotEngine(lm, slots=2)
    try:
        engine.warm()
        long = Request(lm.tokenizer.encode("A long story"), 200)
        engine.submit([long])
        for _ in range(100):  # bounded: until the long one is decoding
            if long.tokens:
                break
            time.sleep(0.01)
        assert long.tokens and not long.ended
        short = Request(lm.tokenizer.encode("Short"), 3)
        engine.submit([short])
        short.wait()
        long.wait()
    finally:
        engine.stop()
    assert short.times[0] < long.times[-1]  # its first token came before the long one ended
    assert short.times[-1] < long.times[-1] and len(long.tokens) == 200


def test_cancelled_and_stopped_rows_free_their_slots(lm):
    engine = SlotEngine(lm, slots=1)
    try:
        first = Request(lm.tokenizer.encode("Going away"), 200)
        engine.submit([first])
        for _ in range(200):
            if len(first.tokens) >= 2:
                break
            time.sleep(0.01)
        first.cancelled = True  # the client went away: the only slot is freed at the next step
        second = Request(lm.tokenizer.encode("Next"), 4)
        engine.submit([second])
        second.wait()
        first.wait()
        text = lm.decode_new(lm.generate_tokens([second.ids], 8, temperature=0)[0])
        assert len(text) >= 4
        stopper = Request(second.ids, 8, stop=[text[2:4]])
        engine.submit([stopper])
        stopper.wait()
    finally:
        engine.stop()
    assert len(first.tokens) < 200 and second.tokens == lm.generate_tokens([second.ids], 4, temperature=0)[0]
    stopped = lm.decode_new(stopper.tokens)
    assert stopper.stop[0] in stopped and stopper.stop[0] not in lm.decode_new(stopper.tokens[:-1])  # ended right there


@pytest.mark.parametrize("mp", [1, 4])  # q/k/v joined without model parallelism, apart with it
def test_the_engine_and_its_lm_share_one_copy_of_the_weights(tmp_path, mp):
    path = hf_gptj(tmp_path / "hf", vocab_size=512, n_positions=64, n_embd=32, n_head=4, rotary_dim=4, n_layer=2)
    lm = mtj.load(path, dtype="float32", mp=mp)
    tokens = np.arange(1, 11)[None]
    logits, generated = lm.logits(tokens), lm.generate_tokens([[1, 2, 3]], 8, temperature=0)
    stacked = weakref.ref(lm.params["layers"]["attn"]["q"])
    engine = SlotEngine(lm, slots=2)
    try:
        gc.collect()
        assert stacked() is None and lm.params is engine.params  # the layer-stacked copy is gone
        np.testing.assert_allclose(lm.logits(tokens), logits, rtol=1e-5, atol=1e-5)
        assert lm.generate_tokens([[1, 2, 3]], 8, temperature=0) == generated
        request = Request([1, 2, 3], 8)
        engine.submit([request])
        request.wait()
        assert request.tokens == generated[0]
    finally:
        engine.stop()
