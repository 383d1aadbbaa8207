"""Training data: sources of fixed-length token windows and a resumable, sharded loader.

A source is random access: `len(source)` windows of `seq+1` tokens and
`source.read(indices)`. The loader walks a seeded permutation of the windows
per epoch, so its position is two integers (epoch, step) and resuming costs
O(1): nothing already consumed is re-read.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from mtj.tokenizer import EOS, Tokenizer


class Source(Protocol):
    seq: int  # windows hold seq + 1 tokens

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...  # [len(indices), seq + 1] int32


class ArraySource:
    """Windows held in memory, [N, seq + 1]."""

    def __init__(self, windows: np.ndarray, name: str = "array"):
        self.windows = np.asarray(windows, np.int32)
        self.seq = self.windows.shape[1] - 1
        self.name = name

    def __len__(self) -> int:
        return len(self.windows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.windows[indices]


def documents_from_text(text: str) -> list[str]:
    """Documents are separated by the literal <|endoftext|>."""
    return [d for d in text.split(EOS) if d.strip()]


def read_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return documents_from_text(path.read_text(encoding="utf-8", errors="replace"))


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream: every document followed by EOS."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to separate documents")
    ids = tokenizer.encode_batch(docs)
    return np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_id)), np.int32)


def windows(stream: np.ndarray, seq: int) -> np.ndarray:
    """Cut a token stream into [N, seq + 1] windows, dropping the remainder."""
    n = len(stream) // (seq + 1)
    return stream[: n * (seq + 1)].reshape(n, seq + 1)


def text_source(pattern: str, seq: int, tokenizer: Tokenizer) -> ArraySource:
    """A .txt/.jsonl file, a directory of them, or a glob, tokenized in memory."""
    path = Path(pattern)
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl")) if path.is_dir() else \
        [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"no .txt/.jsonl input found at '{pattern}'")
    docs = [d for f in files for d in read_documents(f)]
    data = windows(tokenize_documents(docs, tokenizer), seq)
    if len(data) == 0:
        raise ValueError(f"'{pattern}' holds fewer than seq+1={seq + 1} tokens: not one training window")
    return ArraySource(data, name=pattern)


def open_source(spec: str, seq: int, tokenizer: Tokenizer) -> Source:
    """A data source from a `train_set`/`val_set` value."""
    if not spec:
        raise ValueError("no data given: set 'train_set' to an .index file, a text file or directory, or tfds:NAME")
    return text_source(spec, seq, tokenizer)


class Loader:
    """Batches [gas, per-process batch, seq + 1] of a seeded, per-epoch shuffle of a source.

    Each step consumes gas * global_batch windows; process p of n takes its
    own contiguous slice of every micro-batch, so the processes together see
    each window of an epoch exactly once. Batches are read ahead on a thread.
    """

    def __init__(self, source: Source, gas: int, global_batch: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.source, self.gas, self.global_batch = source, gas, global_batch
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.process_index, self.process_count = process_index, process_count
        self.per_step = gas * global_batch
        self.steps_per_epoch = len(source) // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"data source {getattr(source, 'name', '')} has {len(source)} sequences but one step "
                             f"needs {self.per_step} (gradient_accumulation_steps x global batch)")
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._ahead: dict[tuple[int, int], concurrent.futures.Future] = {}

    # position -----------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def restore(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._ahead.clear()

    def reset(self) -> None:
        self.restore({"epoch": 0, "step": 0})

    # reading ------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.source)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def _read(self, epoch: int, step: int) -> np.ndarray:
        idx = self._order(epoch)[step * self.per_step: (step + 1) * self.per_step]
        idx = idx.reshape(self.gas, self.global_batch)
        local = self.global_batch // self.process_count
        idx = idx[:, self.process_index * local: (self.process_index + 1) * local]
        return self.source.read(idx.reshape(-1)).reshape(self.gas, local, -1)

    def _position(self, k: int) -> tuple[int, int]:
        total = self.epoch * self.steps_per_epoch + self.step + k
        return divmod(total, self.steps_per_epoch)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> np.ndarray:
        for k in range(self.prefetch + 1):
            pos = self._position(k)
            if pos not in self._ahead:
                self._ahead[pos] = self._pool.submit(self._read, *pos)
        batch = self._ahead.pop(self._position(0)).result()
        self.epoch, self.step = self._position(1)
        return batch
