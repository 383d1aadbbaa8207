"""The server's decode engines: continuous batching (SlotEngine) and the static batcher (StaticBatcher).

Continuous batching keeps a fixed set of decode slots busy.

Each slot owns a row of the KV cache (the model's whole context). A request is prefilled alone
(its prompt right-padded to a bucket, so few shapes compile) and its keys and values copied into
a free slot between two decode steps; one compiled step then decodes every slot, each at its own
position with its own sampling parameters and RNG. A row that ends (EOS, a stop string,
max_tokens, a client gone) frees its slot at once, so a short request never waits for a long one
and a new one starts at the next step. At most one prefill runs between two steps: a long prompt
delays the decoding rows by one prefill, not by a whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtj.generate import bucket, sample
from mtj.lm import LM
from mtj.model import Params, logits_of, run_layers, unstack_layers
from mtj.sharding import constrain


@dataclasses.dataclass
class Job:
    """One sequence to generate. `events` gets ("tokens", [t]) while streaming and ("done", None | error)
    at the end; the server's are delivered on its event loop."""

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
    cancelled: bool = False  # the client went away: its row ends at the next step
    ended: bool = False


COMPUTE_CAST = {"q", "k", "v", "o", "fc_in", "fc_out", "wte", "wpe", "kernel"}  # cast to the compute dtype at every use


def compute_weights(params: Params, cfg: Any) -> Params:
    """The matmul kernels and embeddings in the compute dtype, once. The model casts them at every
    use (to the same values), so a decode step would otherwise re-cast the whole head each token;
    biases and LayerNorm parameters stay as they are (they enter fp32 arithmetic)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a.astype(cfg.dtype) if path[-1].key in COMPUTE_CAST else a, params)


def _prefill(params: Params, tokens: jax.Array, length: jax.Array, cfg: Any) -> tuple[list, jax.Array]:
    """The prompt's per-layer (k, v) [1, H, P, Dh] and the logits after its last real token."""
    P = tokens.shape[1]
    zeros = lambda: jnp.zeros((1, cfg.n_heads, P, cfg.head_dim), jnp.dtype(cfg.dtype))  # noqa: E731
    cache = [(zeros(), zeros()) for _ in range(cfg.layers)]
    x, cache = run_layers(unstack_layers(params, cfg), tokens, cfg, cache=cache, index=0)
    return cache, logits_of(params, x[0, length - 1], cfg)


def _insert(cache: list, prompt_cache: list, slot: jax.Array) -> list:
    """The slot's cache row starts with the prompt's keys and values."""
    put = lambda big, small: jax.lax.dynamic_update_slice(big, small, (slot, 0, 0, 0))  # noqa: E731
    return [(put(k, pk), put(v, pv)) for (k, v), (pk, pv) in zip(cache, prompt_cache)]


def _step(params: Params, cache: list, tokens: jax.Array, lengths: jax.Array, temperature: jax.Array,
          top_k: jax.Array, top_p: jax.Array, keys: jax.Array, counts: jax.Array, cfg: Any) -> tuple[jax.Array, list]:
    """One token for every slot: slot s holds lengths[s] tokens and decodes tokens[s] at that position."""
    L = cache[0][0].shape[2]
    valid = jnp.arange(L)[None, :] <= lengths[:, None]
    x, cache = run_layers(unstack_layers(params, cfg), tokens[:, None], cfg, lengths[:, None], valid, cache, lengths)
    logits = logits_of(params, x[:, 0], cfg)
    step_keys = jax.vmap(jax.random.fold_in)(keys, counts)
    return sample(logits, step_keys, temperature, top_k, top_p), cache


class Engine:
    """What the server uses: a bounded queue of requests and a thread that decodes them."""

    def __init__(self, lm: LM, max_queue: int, name: str):
        self.lm = lm
        self.eos = lm.tokenizer.eos_id if lm.tokenizer else -1
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None  # what stopped the thread, if anything did (for /health)
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def room(self) -> int:
        return self.jobs.maxsize - self.jobs.qsize()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs; raises queue.Full when the server is overloaded."""
        if len(jobs) > self.room():
            raise queue.Full
        for job in jobs:
            self.jobs.put_nowait(job)

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self.stopping.set()
        self.thread.join(timeout=120)

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 -- recorded for /health
            self.failure = e
            raise

    def _run(self) -> None:
        raise NotImplementedError

    def _finished(self, job: Job) -> bool:
        """Whether a row that just took a token has ended (EOS, max_tokens, a stop string)."""
        return job.tokens[-1] == self.eos or len(job.tokens) >= job.max_new or \
            (bool(job.stop) and any(s in self.lm.decode_new(job.tokens) for s in job.stop))


class StaticBatcher(Engine):
    """Takes the requests that arrived together (up to max_batch) and decodes them as one
    generate call: every row waits for the batch's longest. Fastest for one request at a time
    on CPU (the generator's compiled decode loop); `--engine static`."""

    def __init__(self, lm: LM, max_batch: int = 8, max_queue: int = 64, wait_s: float = 0.01):
        super().__init__(lm, max_queue, "mtj-static-batcher")
        self.max_batch, self.wait_s = max_batch, wait_s
        self.thread.start()

    def warm(self) -> None:
        self.lm.generate_tokens([[0]], max_new_tokens=1, temperature=0)

    def _take(self) -> list[Job]:
        try:
            batch = [self.jobs.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for job in batch:
            if job.cancelled:
                job.events.put(("done", None))
        return [job for job in batch if not job.cancelled]

    def _run(self) -> None:
        while not (self.stopping.is_set() and self.jobs.empty()):
            batch = self._take()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        """With a stream, a stop string or a cancellation in the batch, tokens come back step by
        step and a row ends as soon as its request is answered."""
        def on_tokens(step: int, tokens: np.ndarray) -> np.ndarray:
            for job, token in zip(batch, tokens.tolist()):
                if job.ended:
                    continue
                if job.cancelled:
                    job.ended = True
                    continue
                job.tokens.append(token)
                if job.stream:
                    job.events.put(("tokens", [token]))
                job.ended = self._finished(job)
            return np.array([job.ended for job in batch])

        stepwise = any(job.stream or job.stop for job in batch)
        try:
            outs = self.lm.generate_tokens([j.ids for j in batch], max(j.max_new for j in batch),
                                           [j.temperature for j in batch], [j.top_k for j in batch],
                                           [j.top_p for j in batch], [j.seed for j in batch],
                                           on_tokens if stepwise else None)
            for job, out in zip(batch, outs):
                if not stepwise:
                    job.tokens = out[: job.max_new]
                job.events.put(("done", None))
        except Exception as e:  # noqa: BLE001 -- the batch fails, the server keeps serving
            for job in batch:
                job.events.put(("done", e))


class SlotEngine(Engine):
    """Decodes queued requests in `slots` slots (continuous batching); `--engine continuous`."""

    def __init__(self, lm: LM, slots: int = 8, max_queue: int = 64):
        super().__init__(lm, max_queue, "mtj-slot-engine")
        self.cfg, self.slots = lm.config, slots
        cfg, mesh = self.cfg, lm.mesh
        with jax.set_mesh(mesh):
            shape = (slots, cfg.n_heads, cfg.seq, cfg.head_dim)
            zeros = jax.jit(lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), "batch", "heads", None, None))
            self.cache = [(zeros(), zeros()) for _ in range(cfg.layers)]
            self.params = jax.jit(functools.partial(compute_weights, cfg=cfg))(lm.params)
        self._prefill = jax.jit(functools.partial(_prefill, cfg=cfg))
        self._insert = jax.jit(_insert, donate_argnums=0)
        self._step = jax.jit(functools.partial(_step, cfg=cfg), donate_argnums=1)
        self._first = jax.jit(lambda logits, key, t, k, p: sample(logits[None], key[None], t[None], k[None], p[None])[0])
        self.active: list[Job | None] = [None] * slots
        self.tokens = np.zeros(slots, np.int32)  # each slot's last token, decoded next
        self.lengths = np.zeros(slots, np.int32)  # tokens in each slot's cache
        self.counts = np.zeros(slots, np.int32)  # tokens each slot has generated
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.keys = np.zeros((slots, 2), np.uint32)  # each slot's RNG key (raw threefry data)
        self.thread.start()

    def warm(self) -> None:
        """Compile every prefill bucket and the decode step before traffic arrives (call before submitting)."""
        sizes, n = [], 1
        while not sizes or sizes[-1] < self.cfg.seq:
            sizes.append(min(bucket(n), self.cfg.seq))
            n = sizes[-1] + 1
        with jax.set_mesh(self.lm.mesh):
            for size in sizes:
                prompt_cache, _ = self._prefill(self.params, jnp.zeros((1, size), jnp.int32), jnp.int32(1))
            self.cache = self._insert(self.cache, prompt_cache, jnp.int32(0))
            self._decode_all()

    # --- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with jax.set_mesh(self.lm.mesh):
                while not (self.stopping.is_set() and self.jobs.empty() and not any(self.active)):
                    self._admit()
                    if any(self.active):
                        self._decode()
        except BaseException as e:  # noqa: BLE001 -- the requests in the slots fail with it
            for job in self.active:
                if job is not None:
                    job.events.put(("done", e))
            raise

    def _admit(self) -> None:
        """Prefill one waiting request into a free slot (waiting for one only when no slot decodes)."""
        if all(job is not None for job in self.active):
            return
        try:
            job = self.jobs.get(timeout=0.05) if not any(self.active) else self.jobs.get_nowait()
        except queue.Empty:
            return
        if job.cancelled:
            job.events.put(("done", None))
            return
        slot = self.active.index(None)
        n = len(job.ids)
        padded = np.zeros((1, min(bucket(n), self.cfg.seq)), np.int32)
        padded[0, :n] = job.ids
        try:
            prompt_cache, logits = self._prefill(self.params, jnp.asarray(padded), jnp.int32(n))
            self.cache = self._insert(self.cache, prompt_cache, jnp.int32(slot))
            key = jax.random.key(np.uint32(job.seed))
            token = int(self._first(logits, jax.random.fold_in(key, 0),
                                    jnp.float32(job.temperature), jnp.int32(job.top_k), jnp.float32(job.top_p)))
        except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
            job.events.put(("done", e))
            return
        self.active[slot] = job
        self.lengths[slot], self.counts[slot], self.keys[slot] = n, 1, np.array(jax.random.key_data(key))
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = job.temperature, job.top_k, job.top_p
        self._take(slot, token)

    def _decode(self) -> None:
        tokens = self._decode_all()
        for slot, job in enumerate(self.active):
            if job is not None:
                self.lengths[slot] += 1
                self.counts[slot] += 1
                self._take(slot, int(tokens[slot]))

    def _decode_all(self) -> np.ndarray:
        """One decode step of every slot (free ones too: their rows are overwritten when taken)."""
        tokens, self.cache = self._step(self.params, self.cache, jnp.asarray(self.tokens), jnp.asarray(self.lengths),
                                        jnp.asarray(self.temperature), jnp.asarray(self.top_k), jnp.asarray(self.top_p),
                                        jax.random.wrap_key_data(jnp.asarray(self.keys)), jnp.asarray(self.counts))
        return np.asarray(tokens)

    def _take(self, slot: int, token: int) -> None:
        """A slot's new token: deliver it, and free the slot when its request has ended."""
        job = self.active[slot]
        if not job.cancelled:
            job.tokens.append(token)
            if job.stream:
                job.events.put(("tokens", [token]))
        ended = job.cancelled or self._finished(job) or self.lengths[slot] >= self.cfg.seq
        if ended:
            job.ended = True
            self.active[slot] = None
            job.events.put(("done", None))
        else:
            self.tokens[slot] = token
