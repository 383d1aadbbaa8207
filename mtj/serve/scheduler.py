"""The server's decode engines: continuous batching (SlotEngine, the default) and the static batcher.

Continuous batching keeps a fixed set of decode slots busy.

Each slot owns a row of the KV cache (the model's whole context). A request's prompt, but its last
token, is prefilled alone (right-padded to a bucket, by default a power of two, so few shapes compile) and its
keys and values copied into a free slot between two decode calls; its last prompt token is then
decoded with the other slots, so its first new token comes from the same compiled step as every
other token. That step decodes every slot, each at its own position with its own sampling
parameters and RNG, attending to the shortest power-of-two prefix of the cache that holds the
longest row (one compilation per prefix). A call runs up to MAX_STEPS steps on the device and
returns early after a step in which a row ended (EOS, max_tokens), so its slot is free at once; a
stop string or a client gone ends a row at the end of the call. While a request waits for a free
slot, calls take one step: a new request starts at the next step, and one prefill at a time runs
between steps, so a long prompt delays the decoding rows by one prefill, not by a whole batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtj.decode import penalties
from mtj.decode import slots as slots_verbs
from mtj.decode.generator import bucket
from mtj.decode.sampling import SamplingParams, check_sampling
from mtj.decode.slots import MAX_STEPS, SPAN_MIN, Slots, powers_of_two, right_padded
from mtj.decode.stops import RowText
from mtj.lm import LM
from mtj.serve.drafting import DraftSlots
from mtj.serve.metrics import Metrics
from mtj.serve.prefix_cache import PrefixPool


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence to generate. `events` gets ("tokens", [t]) while streaming and ("done", None | error)
    at the end; the server's are delivered on its event loop. `text` (made when the engine takes the job) decides
    when the row ends, appending its tokens to `tokens`. Jobs are equal only to themselves."""

    ids: list[int]
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    events: Any
    stream: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)  # strings that end the row's decoding
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: RowText | None = None
    cancelled: bool = False  # the client went away: its row ends at the next step
    ended: bool = False
    repetition_penalty: float = 1.0  # logit adjustments (mtj.decode.penalties)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    queued_at: float = 0.0  # time.perf_counter() when submitted
    last_at: float = 0.0  # ... when its last token was made


def check_job(job: Job, cfg: Any) -> None:
    """Raise ValueError, naming the value, for a job this model cannot decode: the engine's arrays and
    compiled steps take any job that passes."""
    n = len(job.ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if min(job.ids) < 0 or max(job.ids) >= cfg.n_vocab:
        raise ValueError(f"token ids must be in [0, {cfg.n_vocab})")
    if job.max_new < 1 or n + job.max_new > cfg.seq:
        raise ValueError(f"the prompt has {n} tokens; with {job.max_new} new tokens that exceeds the context of "
                         f"{cfg.seq} tokens")
    check_sampling(job.temperature, job.top_k, job.top_p, job.seed, cfg.n_vocab)
    penalties.check_penalties(job.repetition_penalty, job.presence_penalty, job.frequency_penalty, job.logit_bias or {},
                              cfg.n_vocab)


ADJUSTMENTS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias")  # Job's, generate_tokens'


class EngineStopped(RuntimeError):
    """The engine is not taking work: it is stopping, or it failed (the failure is the cause)."""


class Engine:
    """What the server uses: a bounded queue of jobs and a thread that decodes them.

    A job whose values the engine cannot take fails alone. A cancelled job leaves the queue at once
    (its row, if decoding, ends at the next step). If the thread itself fails, every queued and
    active job is answered with the failure at once and nothing more is accepted (see /health)."""

    def __init__(self, lm: LM, max_queue: int, name: str):
        self.lm = lm
        self.eos = lm.tokenizer.eos_id if lm.tokenizer else -1
        self.max_queue = max_queue
        self.queue: collections.deque[Job] = collections.deque()
        self.changed = threading.Condition()  # guards `queue` and `failure`
        self.stopping = threading.Event()
        self.failure: BaseException | None = None  # what stopped the thread, if anything did (for /health)
        self.most_rows = 0  # the most requests decoded together so far (for /health: is batching happening?)
        self.metrics = Metrics(self)
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread.is_alive() and not self.stopping.is_set()

    def room(self) -> int:
        return self.max_queue - len(self.queue)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs; raises ValueError for a job this model cannot decode (`check_job`), queue.Full when
        the server is overloaded, EngineStopped when it is not serving."""
        for job in jobs:
            check_job(job, self.lm.config)
            job.queued_at = time.perf_counter()
        with self.changed:
            if not self.alive:
                raise EngineStopped("the engine has stopped; see /health") from self.failure
            if len(jobs) > self.room():
                raise queue.Full
            self.queue.extend(jobs)
            self.changed.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The jobs' client has gone: queued ones are answered and leave the queue now, decoding ones
        end at the next step."""
        with self.changed:
            for job in jobs:
                job.cancelled = True
                if job in self.queue:
                    self.queue.remove(job)
                    job.events.put(("done", None))

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self.stopping.set()
        self.thread.join(timeout=120)

    def _next(self, timeout: float) -> Job | None:
        """The first queued job, waiting up to `timeout` seconds for one; it gets the RowText that decides when
        its row ends."""
        with self.changed:
            if not self.queue and timeout > 0:
                self.changed.wait(timeout)
            job = self.queue.popleft() if self.queue else None
        if job is not None:
            job.text = RowText(self.lm.tokenizer, self.eos, job.stop, job.max_new, tokens=job.tokens)
            self.metrics.prompt_tokens.inc(len(job.ids))
        return job

    def took(self, job: Job, token: int, at: float) -> bool:
        """A row's next token, made at time `at`, streamed if asked for; whether the row has ended."""
        first, before = not job.last_at, len(job.tokens)
        ended = job.text.append(token)
        if job.stream:
            job.events.put(("tokens", [token]))
        (self.metrics.time_to_first_token if first else self.metrics.inter_token_latency).observe(
            at - (job.queued_at if first else job.last_at))
        self.metrics.generation_tokens.inc(len(job.tokens) - before)  # (as usage counts them: not EOS)
        job.last_at = at
        return ended

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 -- recorded for /health; every waiting request is answered
            with self.changed:
                self.failure = e
                waiting = list(self.queue)
                self.queue.clear()
            for job in self.in_flight():
                job.events.put(("done", e))
            stopped = EngineStopped(f"the engine failed before this request started: {type(e).__name__}: {e}")
            for job in waiting:
                job.events.put(("done", stopped))
            raise

    def _run(self) -> None:
        raise NotImplementedError

    def in_flight(self) -> list[Job]:
        """Jobs taken from the queue and not yet answered."""
        raise NotImplementedError


class StaticBatcher(Engine):
    """Takes the requests that arrived together (up to max_batch) and decodes them as one
    generate call (the generator's compiled loop): every row waits for the batch's longest and
    a new request for the whole batch; `--engine static`. A request that does not fit the context
    beside the others (a long prompt with a short max_tokens beside a short prompt with a long one)
    waits, first in line, for the next batch."""

    def __init__(self, lm: LM, max_batch: int = 8, max_queue: int = 64, wait_s: float = 0.01):
        super().__init__(lm, max_queue, "mtj-static-batcher")
        self.max_batch, self.wait_s = max_batch, wait_s
        self.batch: list[Job] = []
        self.thread.start()

    def warm(self) -> None:
        self.lm.generate_tokens([[0]], max_new_tokens=1, temperature=0)

    def in_flight(self) -> list[Job]:
        return self.batch

    def _next_batch(self) -> list[Job]:
        """The next batch: jobs in arrival order that fit the context together (the generator needs the
        longest prompt + the largest max_tokens to fit); the others go back to the front of the queue."""
        first = self._next(0.1)
        if first is None:
            return []
        batch, skipped = [first], []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            job = self._next(deadline - time.monotonic())
            if job is None:
                break
            fits = max(len(j.ids) for j in (*batch, job)) + max(j.max_new for j in (*batch, job)) <= self.lm.config.seq
            (batch if fits else skipped).append(job)
        with self.changed:
            self.queue.extendleft(reversed(skipped))
        for job in batch:
            if job.cancelled:
                job.events.put(("done", None))
        return [job for job in batch if not job.cancelled]

    def _run(self) -> None:
        while not (self.stopping.is_set() and not self.queue):
            self.batch = self._next_batch()
            if self.batch:
                self._generate(self.batch)
            self.batch = []

    def _generate(self, batch: list[Job]) -> None:
        """Tokens come back step by step: a row ends as soon as its request is answered or its client
        has gone, and the call as soon as every row has ended."""
        def on_tokens(step: int, tokens: np.ndarray) -> np.ndarray:
            now = time.perf_counter()
            for job, token in zip(batch, tokens.tolist()):
                if job.ended:
                    continue
                if job.cancelled:
                    job.ended = True
                    continue
                job.ended = self.took(job, token, now)
            return np.array([job.ended for job in batch])

        self.most_rows = max(self.most_rows, len(batch))
        try:
            self.lm.generate_tokens([j.ids for j in batch], max(j.max_new for j in batch),
                                    [j.temperature for j in batch], [j.top_k for j in batch],
                                    [j.top_p for j in batch], [j.seed for j in batch], on_tokens,
                                    **{name: [getattr(j, name) for j in batch] for name in ADJUSTMENTS})
        except Exception as e:  # noqa: BLE001 -- the server keeps serving
            if len(batch) > 1 and not any(job.tokens for job in batch):  # nothing sent yet: find the job at fault
                for job in batch:
                    self._generate([job])
                return
            for job in batch:
                job.events.put(("done", e))
            return
        for job in batch:
            job.text.end()  # (the generator ends at the context's end)
            job.events.put(("done", None))


def engine_buckets(slots: int, speculate: int, prefill_buckets: list[int] | None, seq: int,
                   draft: LM | None = None) -> list[int]:
    """The prefill buckets of a SlotEngine's options (seq always the last), or ValueError naming a bad option."""
    if slots < 1:
        raise ValueError(f"the engine needs at least one slot, got {slots}")
    if not 0 <= speculate <= 16:
        raise ValueError(f"--speculate must be in [0, 16] (draft tokens per step; 0 = off), got {speculate}")
    if draft and not speculate:
        raise ValueError("a draft model (--draft-ckpt) drafts for speculative decoding: give --speculate K too")
    if prefill_buckets is None:
        prefill_buckets = powers_of_two(16, seq)
    if any(b < 1 for b in prefill_buckets):
        raise ValueError(f"prefill buckets must be positive, got {prefill_buckets}")
    return sorted({min(b, seq) for b in prefill_buckets} | {seq})


def histories(active: list[Job | None], seq: int) -> np.ndarray:
    """Each slot's tokens so far (prompt and output; zeros for a free slot), [slots, seq]: what prompt-lookup
    drafts are looked up in."""
    out = np.zeros((len(active), seq), np.int32)
    for slot, job in enumerate(active):
        if job is not None:
            tokens = (job.ids + job.tokens)[:seq]
            out[slot, :len(tokens)] = tokens
    return out


class SlotValues:
    """What each slot decodes with, on the host; `record` is a decode call's `Slots`."""

    def __init__(self, slots: int):
        self.tokens = np.zeros(slots, np.int32)  # each slot's last token, decoded next
        self.lengths = np.zeros(slots, np.int32)  # tokens in each slot's cache
        self.counts = np.zeros(slots, np.int32)  # tokens each slot has generated
        self.keys = np.zeros((slots, 2), np.uint32)  # each slot's RNG key (raw threefry data)
        self.temperature, self.top_k = np.zeros(slots, np.float32), np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.penalties = np.zeros((slots, 3), np.float32)  # repetition (1: off), presence, frequency

    def start(self, slot: int, job: Job) -> None:
        self.tokens[slot], self.lengths[slot], self.counts[slot] = job.ids[-1], len(job.ids) - 1, 0
        self.keys[slot] = np.array(jax.random.key_data(jax.random.key(np.uint32(job.seed))))
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = job.temperature, job.top_k, job.top_p
        self.penalties[slot] = job.repetition_penalty, job.presence_penalty, job.frequency_penalty

    def record(self, active: list[Job | None], seq: int) -> Slots:
        live = np.array([job is not None for job in active])
        left = [job.max_new - len(job.tokens) if job else 0 for job in active]
        budget = np.where(live, np.minimum(left, seq - self.lengths), 1 << 30).astype(np.int32)
        return Slots(jnp.asarray(self.tokens), jnp.asarray(np.where(live, self.lengths, 0)), jnp.asarray(budget),
                     jnp.asarray(live), jnp.asarray(self.counts), jax.random.wrap_key_data(jnp.asarray(self.keys)),
                     SamplingParams(jnp.asarray(self.temperature), jnp.asarray(self.top_k), jnp.asarray(self.top_p)),
                     jnp.asarray(self.penalties))


class SlotAdjustments:
    """Each slot's logit_bias and the tokens its penalties read, on the devices (`penalties.Rows`). A neutral
    slot leaves the logits as they are, so only a request with adjustments, or one after a bias, sets its row."""

    def __init__(self, slots: int, width: int, buckets: list[int]):
        self.width, self.buckets, self.biased = width, buckets, np.zeros(slots, bool)
        self.rows = jax.jit(lambda: penalties.empty_rows(slots, width))()
        self._start = jax.jit(penalties.start_row, donate_argnums=0)

    def start(self, slot: int, job: Job, force: bool = False) -> None:
        """The slot's row for the job: its bias, its prompt's tokens, nothing generated."""
        if not (force or self.biased[slot] or not penalties.neutral(job.repetition_penalty, job.presence_penalty,
                                                                    job.frequency_penalty, job.logit_bias)):
            return
        padded = right_padded(job.ids, next(b for b in self.buckets if b >= len(job.ids)))
        self.rows = self._start(self.rows, jnp.int32(slot), penalties.bias_row(job.logit_bias, self.width), padded,
                                jnp.arange(padded.shape[1])[None] < len(job.ids))
        self.biased[slot] = bool(job.logit_bias)

    def warm(self) -> None:
        for size in self.buckets:
            self.start(0, Job([0] * size, 1, 0.0, 0, 1.0, 0, None), force=True)


def compile_decoder(cfg: Any, span: int, greedy: bool, speculate: int, draft: DraftSlots | None) -> Any:
    """The continuous engine's decode call for a span, the cache (and a draft model's) donated."""
    if not speculate:
        return jax.jit(functools.partial(slots_verbs.decode, cfg=cfg, span=span, greedy=greedy), donate_argnums=(1, 5))
    return jax.jit(functools.partial(slots_verbs.decode_speculative, cfg=cfg, span=span, greedy=greedy, k=speculate,
                                     draft_cfg=draft and draft.cfg), donate_argnums=(1, 6, 8))


class SlotEngine(Engine):
    """Decodes queued requests in `slots` slots (continuous batching); `--engine continuous`. `lm` holds its
    weights in their decode layout from then on (`LM.use_decode_layout`): the devices hold them once."""

    def __init__(self, lm: LM, slots: int = 8, max_queue: int = 64, prefill_buckets: list[int] | None = None,
                 prefix_cache_gb: float = 0.0, speculate: int = 0, draft: LM | None = None):
        """`prefill_buckets`: the prompt lengths prefill compiles for (a prompt is padded to the next
        one; the context length is always the last); default: powers of two from 16. `prefix_cache_gb`: the
        device memory (GiB per device) of the prefix cache's pool; 0: no prefix cache. `speculate` k: every decode
        step verifies a k-token draft per slot (`mtj.decode.speculative`), from prompt lookup or `draft`, a
        smaller model of the same vocabulary; 0: off."""
        super().__init__(lm, max_queue, "mtj-slot-engine")
        self.cfg, self.slots = lm.config, slots
        self.prefill_buckets = engine_buckets(slots, speculate, prefill_buckets, self.cfg.seq, draft)
        self.draft = DraftSlots(draft, lm, slots) if draft else None
        self.speculate, self.drafts = speculate, np.zeros(2, np.int64)  # draft tokens verified, kept
        self.params = lm.use_decode_layout()
        with jax.set_mesh(lm.mesh):
            self.cache = slots_verbs.init_cache(self.cfg, slots)
            self.adjustments = SlotAdjustments(slots, self.cfg.padded_vocab, self.prefill_buckets)
        self._prefill = jax.jit(functools.partial(slots_verbs.prefill, cfg=self.cfg))
        self._insert = jax.jit(slots_verbs.insert, donate_argnums=0)
        self._decoders: dict[tuple[int, bool], Any] = {}
        self.prefix_cache = PrefixPool(self.cfg, lm.mesh, prefix_cache_gb, self.prefill_buckets) if prefix_cache_gb \
            else None
        self.active: list[Job | None] = [None] * slots
        self.values = SlotValues(slots)
        self.thread.start()

    def warm(self) -> None:
        """Compile every prefill bucket and decode span before traffic arrives (call before submitting)."""
        with jax.set_mesh(self.lm.mesh):
            for size in self.prefill_buckets:
                prompt_cache = self._prefill(self.params, jnp.zeros((1, size), jnp.int32))
                self.cache = self._insert(self.cache, prompt_cache, jnp.int32(0))
            if self.prefix_cache:
                self.cache = self.prefix_cache.warm(self.params, self.cache)
            if self.draft:
                self.draft.warm(self.prefill_buckets)
            self.adjustments.warm()
            for span in powers_of_two(SPAN_MIN, self.cfg.seq):  # every cache prefix a decode call may attend to
                for greedy in (True, False):
                    self._decode_call(span, greedy, 1)

    # --- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        with jax.set_mesh(self.lm.mesh):
            while not (self.stopping.is_set() and not self.queue and not any(self.active)):
                self._admit()
                if any(self.active):
                    self._step()

    def in_flight(self) -> list[Job]:
        return [job for job in self.active if job is not None]

    def _admit(self) -> None:
        """Prefill one waiting request into a free slot (waiting for one only when no slot decodes)."""
        if all(job is not None for job in self.active):
            return
        job = self._next(0.05 if not any(self.active) else 0)
        if job is None:
            return
        if job.cancelled:
            job.events.put(("done", None))
            return
        slot = self.active.index(None)
        try:
            self._start(slot, job)
        except Exception as e:  # noqa: BLE001 -- this request fails alone; its slot stays free
            job.events.put(("done", e))
            return
        self.active[slot] = job

    def _start(self, slot: int, job: Job) -> None:
        """Write the job's values into the slot's host arrays (where values that do not fit raise before
        anything on the device changed), then prefill its prompt into the slot's cache row."""
        n = len(job.ids)
        self.values.start(slot, job)
        self.adjustments.start(slot, job)
        if n == 1:
            return
        prompt = job.ids[:-1]
        tokens = right_padded(prompt, next(b for b in self.prefill_buckets if b >= n - 1))
        if self.draft:
            self.draft.start(slot, tokens)

        def cold(cache: list) -> list:
            return self._insert(cache, self._prefill(self.params, tokens), jnp.int32(slot))

        self.cache = self.prefix_cache.prefill(self.params, self.cache, slot, prompt, cold) if self.prefix_cache \
            else cold(self.cache)

    def _step(self) -> None:
        """Decode steps of every slot: one while a request waits for a free slot, else up to MAX_STEPS (a
        speculative step may give a slot several tokens)."""
        live = np.array([job is not None for job in self.active])
        self.most_rows = max(self.most_rows, int(live.sum()))
        steps = 1 if (not live.all() and self.queue) else MAX_STEPS
        span = min(bucket(int(self.values.lengths[live].max()) + steps * (self.speculate + 1), SPAN_MIN), self.cfg.seq)
        began = time.perf_counter()
        out, took, ran = self._decode_call(span, bool((self.values.temperature[live] == 0).all()), steps)
        each = (time.perf_counter() - began) / max(ran, 1)  # the call's steps are taken as evenly spaced
        if self.speculate:
            self.drafts += [self.speculate * int(live.sum()) * ran, int((took[:ran, live] - 1).sum())]
        for i in range(ran):
            for slot, job in enumerate(self.active):
                for token in out[i, slot, :took[i, slot]].tolist() if job is not None else ():
                    if self.active[slot] is not job:  # (a slot freed earlier in this call ignores the rest)
                        break
                    self.values.lengths[slot] += 1
                    self.values.counts[slot] += 1
                    self._deliver(slot, token, began + (i + 1) * each)

    def _decode_call(self, span: int, greedy: bool, steps: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Run the compiled decode of this span over every slot (free ones too: their rows are overwritten when
        taken): tokens [MAX_STEPS, S, k + 1], how many of them each slot took [MAX_STEPS, S], steps run."""
        if (span, greedy) not in self._decoders:
            self._decoders[span, greedy] = compile_decoder(self.cfg, span, greedy, self.speculate, self.draft)
        slots, fn = self.values.record(self.active, self.cfg.seq), self._decoders[span, greedy]
        if not self.speculate:
            out, ran, self.cache, self.adjustments.rows = fn(self.params, self.cache, slots, jnp.int32(steps),
                                                             jnp.int32(self.eos), self.adjustments.rows)
            return np.asarray(out)[:, :, None], np.ones((MAX_STEPS, self.slots), np.int32), int(ran)
        history = jnp.asarray(histories(self.active, self.cfg.seq))
        draft = (self.draft.params, self.draft.cache) if self.draft else (None, None)
        out, took, ran, self.cache, draft_cache, self.adjustments.rows = fn(
            self.params, self.cache, slots, history, jnp.int32(steps), jnp.int32(self.eos), self.adjustments.rows, *draft)
        if self.draft:
            self.draft.cache = draft_cache
        return np.asarray(out), np.asarray(took), int(ran)

    def _deliver(self, slot: int, token: int, at: float) -> None:
        """A slot's new token, made at time `at`: deliver it, and free the slot when its request has ended."""
        job = self.active[slot]
        ended = job.cancelled or self.took(job, token, at) or self.values.lengths[slot] >= self.cfg.seq
        if ended:
            job.text.end()
            job.ended = True
            self.active[slot] = None
            job.events.put(("done", None))
        else:
            self.values.tokens[slot] = token
