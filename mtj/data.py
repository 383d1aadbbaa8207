"""Training data: sources of fixed-length token windows and resumable, sharded loaders.

A source is random access: `len(source)` windows of `seq+1` tokens and
`source.read(indices)`. The loader walks a seeded permutation of the windows
per epoch, so its position is two integers (epoch, step) and resuming costs
O(1): nothing already consumed is re-read. A tfds: dataset is a stream of
documents tokenized as they are read (StreamLoader), resumable as exactly.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import warnings
from typing import IO, Protocol

import fsspec
import numpy as np
from etils import epath

from mtj.corpus import expand_inputs, iter_documents, tokenize_documents, windows
from mtj.paths import PathLike, is_remote
from mtj.tfrecord import (FOOTER, HEADER, PACKED_FEATURES, RecordError, check_record, decode_features,
                          listed_files, offsets_of, parse_sidecar, scan_lengths, sidecar_of)
from mtj.tokenizer import Tokenizer


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


def document_source(docs: list[str], seq: int, tokenizer: Tokenizer, name: str) -> ArraySource:
    """Documents tokenized in memory (EOS after each) and cut into seq+1 windows."""
    data = windows(np.concatenate(tokenize_documents(docs, tokenizer)) if docs else np.zeros(0, np.int32), seq)
    if len(data) == 0:
        raise ValueError(f"'{name}' holds fewer than seq+1={seq + 1} tokens: not one training window")
    return ArraySource(data, name=name)


def text_source(spec: str, seq: int, tokenizer: Tokenizer) -> ArraySource:
    """Text inputs (.txt/.jsonl/.jsonl.zst/.tar.gz, a directory or a glob) tokenized in memory."""
    return document_source(list(iter_documents(expand_inputs(spec))), seq, tokenizer, spec)


class TFRecordSource:
    """The sequences of the TFRecord files listed in an .index file, by random access.

    Opening reads each file's sidecar (its records' data lengths, written by create_tfrecords and
    mtj-index) and its first record (a file written with another seq fails now, not mid-run); in a
    bucket, many files at once. A file without a sidecar, or with one that does not describe it, has its
    12-byte record headers scanned instead, with a warning. Memory: 12 bytes per record (offset, length).
    A record is read whole and checked: its header must frame the length its offsets say (a stale sidecar
    fails loudly, never yields another record), its data CRC, its length seq + 1, and its token ids must
    lie in [0, n_vocab) (data tokenized for another model would otherwise train silently on clamped ids).
    With `skip_corrupt`, every record is read and checked at opening and the bad ones are left out.
    From a bucket, a batch's records are fetched as concurrent range reads (the loader reads ahead).
    """

    max_open_files = 64  # local files kept open for reading; the least recently used is closed beyond this
    open_threads = 32  # files in a bucket whose sidecars (or headers) are read at once

    def __init__(self, index: PathLike, seq: int, skip_corrupt: bool = False, n_vocab: int | None = None):
        self.files = listed_files(index)
        self.seq, self.name, self.skip_corrupt, self.n_vocab = seq, str(index), skip_corrupt, n_vocab
        if any(is_remote(p) for p in self.files):  # a bucket answers each request in ~ms: many at once
            with concurrent.futures.ThreadPoolExecutor(min(self.open_threads, len(self.files))) as pool:
                per_file = list(pool.map(lambda path: self._records(path, index), self.files))
        else:  # a local file's sidecar is read in ~0.1 ms: starting threads would cost more
            per_file = [self._records(path, index) for path in self.files]
        scanned = [(path, why) for path, (_, _, why) in zip(self.files, per_file) if why]
        if scanned:
            reasons = collections.Counter(why.split(":")[0] for _, why in scanned)
            warnings.warn(f"{len(scanned)} of the {len(self.files)} files of {index} were scanned for their records "
                          f"({', '.join(f'{n}: {why}' for why, n in reasons.most_common())}; first: {scanned[0][0]}, "
                          f"{scanned[0][1]}). "
                          f"`mtj-index {index}` writes their sidecars, so that opening them reads no record")
        self.starts = np.concatenate([[0], np.cumsum([len(o) for o, _, _ in per_file])]).astype(np.int64)
        if self.starts[-1] == 0:
            raise ValueError(f"the TFRecord files of {index} hold no records")
        self.offsets = np.concatenate([o for o, _, _ in per_file])  # int64: each record's data offset in its file
        self.lengths = np.concatenate([n for _, n, _ in per_file]).astype(np.uint32)
        self._handles: dict[int, IO[bytes]] = {}  # in order of use, oldest first
        self._remote = {i: fsspec.core.url_to_fs(os.fspath(p)) for i, p in enumerate(self.files) if is_remote(p)}
        self.read(self.starts[:-1][np.diff(self.starts) > 0])  # the first record of each file

    def _records(self, path: epath.Path, index: PathLike) -> tuple[np.ndarray, np.ndarray, str | None]:
        """One file's records (data offsets, lengths), and why it was scanned (None: from its sidecar)."""
        try:
            size = path.stat().length
        except FileNotFoundError:
            raise FileNotFoundError(f"{index} lists {path}, which does not exist") from None
        why = None
        try:
            lengths = parse_sidecar(sidecar_of(path).read_bytes(), size)
        except FileNotFoundError:
            why = "no sidecar"
        except ValueError as e:
            why = f"a sidecar that does not describe it: {e}"
        if why:
            lengths = scan_lengths(path, skip_corrupt=self.skip_corrupt)
        offsets = offsets_of(lengths)
        if self.skip_corrupt:
            offsets, lengths = self._verified(path, offsets, lengths)
        return offsets, lengths, why

    def _checked(self, path: epath.Path, offset: int, raw: bytes, length: int) -> np.ndarray:
        """The tokens of one record read whole, checked: framing, CRC, Example, length seq + 1, token ids. A packed
        record (with "segment_ids" and "loss_mask" features, create_tfrecords --format jsonl) gives [3, seq + 1]:
        tokens, segment ids, loss mask."""
        where = f"{path}: the record at byte offset {offset - 12}"
        data = check_record(raw, path, offset, length)
        try:
            features = decode_features(data)
            tokens = features.get("text")
            if tokens is None:
                raise ValueError("no Int64List 'text' feature" if "text" not in features else "'text' is not an Int64List")
            packed = [features[name] for name in PACKED_FEATURES if name in features]
            if packed and (len(packed) < len(PACKED_FEATURES) or any(f is None for f in packed)):
                raise ValueError(f"a packed record has Int64List features {', '.join(PACKED_FEATURES)}")
        except ValueError as e:
            raise RecordError(f"{where} is not an Example with an Int64List 'text' feature ({e})") from None
        if any(len(x) != self.seq + 1 for x in [tokens, *packed]):
            raise RecordError(f"{where} has {len(tokens)} tokens but seq+1={self.seq + 1} are needed; set 'seq' "
                              "to match the data or re-run create_tfrecords.py with --seq")
        self._check_ids(tokens[None], [where])
        return np.stack([tokens, *packed]) if packed else tokens

    def _check_ids(self, tokens: np.ndarray, where: list[str]) -> None:
        """RecordError naming the first record (of `where`, by row) holding an id outside the vocabulary."""
        if self.n_vocab is None:
            return
        bad = (tokens < 0) | (tokens >= self.n_vocab)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise RecordError(f"{where[row]} holds the token id {int(tokens[row, col])} (position {col}), outside the "
                              f"model's vocabulary [0, {self.n_vocab}): was the data tokenized for another model? "
                              "(skip_corrupt_records=true leaves such records out)")

    def _verified(self, path: epath.Path, offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        good = []
        with path.open("rb") as f:
            for k, (offset, length) in enumerate(zip(offsets.tolist(), lengths.tolist())):
                try:
                    f.seek(offset - HEADER)
                    self._checked(path, offset, f.read(HEADER + length + FOOTER), length)
                    good.append(k)
                except RecordError as e:
                    warnings.warn(f"skipping corrupt record: {e}")
        return offsets[good], lengths[good]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _handle(self, fid: int) -> IO[bytes]:
        f = self._handles.pop(fid, None) or self.files[fid].open("rb")
        self._handles[fid] = f  # now the most recently used
        while len(self._handles) > self.max_open_files:
            self._handles.pop(next(iter(self._handles))).close()
        return f

    def _raw(self, indices: np.ndarray, fids: np.ndarray) -> list[bytes]:
        """Each record read whole (header, data, CRC): local files by seek and read, remote ones in one
        concurrent call."""
        starts = (self.offsets[indices] - HEADER).tolist()
        ends = (self.offsets[indices] + self.lengths[indices] + FOOTER).tolist()
        out: dict[int, bytes] = {}
        remote = [k for k, f in enumerate(fids.tolist()) if f in self._remote]
        if remote:
            fs = self._remote[int(fids[remote[0]])][0]
            paths = [self._remote[int(fids[k])][1] for k in remote]
            out.update(zip(remote, fs.cat_ranges(paths, [starts[k] for k in remote], [ends[k] for k in remote])))
        for k, fid in enumerate(fids.tolist()):
            if k not in out:
                f = self._handle(fid)
                f.seek(starts[k])
                out[k] = f.read(ends[k] - starts[k])
        return [out[k] for k in range(len(indices))]

    def read(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        fids = np.searchsorted(self.starts, indices, side="right") - 1
        rows = [self._checked(self.files[f], int(self.offsets[i]), raw, int(self.lengths[i]))
                for i, f, raw in zip(indices.tolist(), fids.tolist(), self._raw(indices, fids))]
        if len({row.ndim for row in rows}) > 1:
            raise RecordError(f"{self.name} mixes packed records (create_tfrecords --format jsonl) with plain ones: "
                              "give them as separate sources (a train_set mixture)")
        return np.stack(rows).astype(np.int32)


class TfdsDocuments:
    """`tfds:NAME[:SPLIT]`: the "text" feature of a locally prepared TFDS dataset (array_record format, found in
    $TFDS_DATA_DIR, default ~/tensorflow_datasets), by random access: len() and the text of document i."""

    def __init__(self, spec: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("tfds: data needs tensorflow-datasets: pip install tensorflow-datasets array_record") from None
        _, name, *rest = spec.split(":")
        data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
        self.source = tfds.data_source(name, split=rest[0] if rest else "train", data_dir=data_dir)
        self.name = spec

    def __len__(self) -> int:
        return len(self.source)

    def texts(self, indices: list[int]) -> list[str]:
        texts = (self.source[i]["text"] for i in indices)
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]


def open_source(spec: str, seq: int, tokenizer: Tokenizer, skip_corrupt: bool = False, n_vocab: int | None = None) -> Source:
    """A data source from a `train_set`/`val_set` value: an .index file of TFRecords, or text files (a file, a
    directory or a glob) tokenized in memory (tfds:NAME[:SPLIT] streams: `loader`). With `n_vocab`, a token id outside
    [0, n_vocab) is an error (TFRecords: when its record is read)."""
    if not spec:
        raise ValueError("no data given: set 'train_set' to an .index file, text files or tfds:NAME[:SPLIT]")
    if spec.startswith("tfds:"):
        raise ValueError(f"'{spec}' is read as a stream: use mtj.data.loader")
    if spec.endswith(".index"):
        return TFRecordSource(spec, seq, skip_corrupt, n_vocab)
    source = text_source(spec, seq, tokenizer)
    if n_vocab is not None and len(source) and int(source.windows.max()) >= n_vocab:
        raise ValueError(f"'{spec}': the tokenizer gives the token id {int(source.windows.max())}, outside the model's "
                         f"vocabulary [0, {n_vocab}): use the model's own tokenizer")
    return source


class EpochOrder:
    """The order of n items in an epoch: a permutation seeded by (seed, epoch), or their own order when not
    shuffled; the current epoch's is kept."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.order = -1, np.arange(0)

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle \
                else np.arange(self.n)
            self.epoch = epoch
        return self.order


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
        self._order = EpochOrder(len(source), seed, shuffle)
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
    def _read(self, epoch: int, step: int) -> np.ndarray:
        idx = self._order(epoch)[step * self.per_step: (step + 1) * self.per_step]
        idx = idx.reshape(self.gas, self.global_batch)
        local = self.global_batch // self.process_count
        idx = idx[:, self.process_index * local: (self.process_index + 1) * local]
        rows = self.source.read(idx.reshape(-1))
        return rows.reshape(self.gas, local, *rows.shape[1:])

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

    def describe(self) -> str:
        return f"{len(self.source):,} sequences, {self.steps_per_epoch:,} steps per epoch"


class StreamLoader:
    """Loader's batches from documents tokenized as they are read (tfds:NAME[:SPLIT]), so memory holds a few
    documents' tokens and the epoch's document order, not the split.

    Each epoch walks a seeded permutation of the documents (their stored order when not shuffled), each
    followed by EOS, concatenated and cut into seq + 1 windows; a step takes the next gas x global_batch
    windows and process p its slice of each micro-batch (every process tokenizes the stream); what is left
    at the end of an epoch, short of a step, is dropped. Unshuffled, the batches are Loader's over the same
    windows held in memory. The position is (epoch, the document the next window starts in, how many of
    its tokens are already used): resuming tokenizes from there, O(1) in the steps already taken.
    """

    chunk = 64  # documents tokenized together (the tokenizers library batches across cores)

    def __init__(self, docs: TfdsDocuments, seq: int, tokenizer: Tokenizer, gas: int, global_batch: int,
                 seed: int = 0, shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 n_vocab: int | None = None):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no <|endoftext|> token to separate documents")
        if len(docs) == 0:
            raise ValueError(f"'{docs.name}' holds no documents")
        self.docs, self.seq, self.tokenizer, self.gas, self.global_batch = docs, seq, tokenizer, gas, global_batch
        self.seed, self.shuffle, self.n_vocab = seed, shuffle, n_vocab
        self.process_index, self.process_count = process_index, process_count
        self.per_step = gas * global_batch
        self.steps_per_epoch = None  # known once an epoch has been read
        self._order = EpochOrder(len(docs), seed, shuffle)
        self.reset()

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "doc": self.doc, "used": self.used, "seed": self.seed}

    def restore(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.doc, self.used = int(state["doc"]), int(state["used"])
        self._tokens = np.zeros(0, np.int32)  # from token `used` of document `doc` on
        self._counts: collections.deque[int] = collections.deque()  # tokens of each document in _tokens, in order
        self._next = self.doc  # the next document to tokenize

    def reset(self) -> None:
        self.restore({"epoch": 0, "step": 0, "doc": 0, "used": 0})

    def describe(self) -> str:
        return f"{len(self.docs):,} documents, tokenized as they are read"

    def _fill(self, need: int) -> None:
        """Tokenize documents until `need` tokens are buffered or the epoch's documents are all read."""
        order = self._order(self.epoch)
        while len(self._tokens) < need and self._next < len(order):
            picked = order[self._next:self._next + self.chunk].tolist()
            ids = [np.array([*t, self.tokenizer.eos_id], np.int32) for t in self.tokenizer.encode_batch(self.docs.texts(picked))]
            if self._next == self.doc:  # resuming inside this document
                ids[0] = ids[0][self.used:]
            if self.n_vocab is not None and max(int(t.max()) for t in ids if len(t)) >= self.n_vocab:
                raise ValueError(f"'{self.docs.name}': the tokenizer gives a token id outside the model's vocabulary "
                                 f"[0, {self.n_vocab}): use the model's own tokenizer")
            self._counts.extend(len(t) for t in ids)
            self._tokens = np.concatenate([self._tokens, *ids])
            self._next += len(picked)

    def _consume(self, n: int) -> None:
        """Drop n buffered tokens, moving the position past them."""
        self._tokens = self._tokens[n:]
        while n:
            if n < self._counts[0]:
                self._counts[0] -= n
                self.used += n
                return
            n -= self._counts.popleft()
            self.doc, self.used = self.doc + 1, 0

    def __iter__(self) -> "StreamLoader":
        return self

    def __next__(self) -> np.ndarray:
        need = self.per_step * (self.seq + 1)
        self._fill(need)
        if len(self._tokens) < need:  # the epoch ends: what is left is short of a step
            if self.step == 0:
                raise ValueError(f"'{self.docs.name}' holds fewer tokens than one step needs ({need}: "
                                 "gradient_accumulation_steps x global batch x (seq + 1))")
            self.steps_per_epoch = self.step
            self.restore({"epoch": self.epoch + 1, "step": 0, "doc": 0, "used": 0})
            self._fill(need)
        batch = self._tokens[:need].reshape(self.gas, self.global_batch, self.seq + 1)
        local = self.global_batch // self.process_count
        batch = batch[:, self.process_index * local:(self.process_index + 1) * local].copy()
        self._consume(need)
        self.step += 1
        return batch


class MixtureLoader:
    """Loader's batches drawn from several sources by weight (a `train_set` mapping of sources to weights).

    Sample j of step t comes from the source a uniform draw seeded by (seed, t) picks, so the order is fixed
    by the seed and the weights; each source is read in its own seeded per-epoch order from where it left off.
    The position is the step and how many samples each source has given: a resume continues exactly, and with
    other weights from that step on (`weights_changed` says so)."""

    def __init__(self, sources: dict[str, Source], weights: dict[str, float], gas: int, global_batch: int,
                 seed: int = 0, shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.names = list(sources)
        self.sources, self.weights, self.seed = sources, dict(weights), seed
        self.gas, self.global_batch = gas, global_batch
        self.process_index, self.process_count = process_index, process_count
        self.per_step = gas * global_batch
        self._orders = [EpochOrder(len(sources[n]), seed + 1 + i, shuffle) for i, n in enumerate(self.names)]
        self.step, self.drawn = 0, {n: 0 for n in self.names}
        self.weights_changed: str | None = None

    def state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "drawn": dict(self.drawn), "weights": dict(self.weights)}

    def restore(self, state: dict) -> None:
        if "drawn" not in state:
            raise ValueError("this run's data position is of one source, not of a mixture: train_set cannot become a "
                             "mixture at a resume (start a new run from the checkpoint with --tune-model-path)")
        if set(state["drawn"]) != set(self.names):
            raise ValueError(f"the mixture's sources were {sorted(state['drawn'])} and are now {sorted(self.names)}: "
                             "a resume may change the weights, not the sources")
        self.step, self.drawn = int(state["step"]), {n: int(state["drawn"][n]) for n in self.names}
        old = {n: float(w) for n, w in state.get("weights", {}).items()}
        self.weights_changed = None if old == self.weights else \
            f"mixture weights from step {self.step} on: {self.weights} (were {old})"

    def reset(self) -> None:
        self.step, self.drawn = 0, {n: 0 for n in self.names}

    def choices(self, step: int) -> np.ndarray:
        """The source (its position in names) of each of step `step`'s samples."""
        w = np.array([self.weights[n] for n in self.names], np.float64)
        u = np.random.default_rng([self.seed, step]).random(self.per_step)
        return np.minimum(np.searchsorted(np.cumsum(w / w.sum()), u, side="right"), len(w) - 1)

    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> np.ndarray:
        picked = self.choices(self.step)
        local = self.global_batch // self.process_count
        mine = np.zeros((self.gas, self.global_batch), bool)
        mine[:, self.process_index * local:(self.process_index + 1) * local] = True
        mine = mine.reshape(-1)
        rows: dict[int, np.ndarray] = {}  # this process's samples, by their place in the step
        for i, name in enumerate(self.names):
            at = np.flatnonzero(picked == i)
            wanted = mine[at]
            if wanted.any():  # only this process's draws are looked up and read
                n = len(self.sources[name])
                positions = self.drawn[name] + np.flatnonzero(wanted)
                indices = np.array([self._orders[i](int(p // n))[p % n] for p in positions], np.int64)
                rows.update(zip(at[wanted].tolist(), self.sources[name].read(indices)))
            self.drawn[name] += len(at)
        self.step += 1
        ordered = [rows[j] for j in sorted(rows)]
        if len({row.ndim for row in ordered}) > 1:  # packed sources beside plain ones: a plain row is one document
            ordered = [r if r.ndim == 2 else np.stack([r, np.ones_like(r), np.ones_like(r)]) for r in ordered]
        out = np.stack(ordered)
        return out.reshape(self.gas, local, *out.shape[1:])

    def describe(self) -> str:
        return "a mixture: " + ", ".join(f"{n} x {self.weights[n]:g} ({len(self.sources[n]):,} sequences)"
                                         for n in self.names)


def loader(spec: str | dict[str, float], seq: int, tokenizer: Tokenizer, gas: int, global_batch: int, seed: int = 0,
           shuffle: bool = True, process_index: int = 0, process_count: int = 1, skip_corrupt: bool = False,
           n_vocab: int | None = None) -> Loader | StreamLoader | MixtureLoader:
    """The batches of a `train_set`/`val_set` value: a stream for tfds:NAME[:SPLIT], a mixture for a mapping of
    sources to weights, else Loader over its source."""
    if isinstance(spec, dict):
        sources = {name: open_source(name, seq, tokenizer, skip_corrupt, n_vocab) for name in spec}
        return MixtureLoader(sources, spec, gas, global_batch, seed, shuffle, process_index, process_count)
    if spec.startswith("tfds:"):
        return StreamLoader(TfdsDocuments(spec), seq, tokenizer, gas, global_batch, seed, shuffle, process_index,
                            process_count, n_vocab)
    return Loader(open_source(spec, seq, tokenizer, skip_corrupt, n_vocab), gas, global_batch, seed, shuffle,
                  process_index, process_count)
