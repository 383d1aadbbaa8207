"""Training data: sources of fixed-length token windows and a resumable, sharded loader.

A source is random access: `len(source)` windows of `seq+1` tokens and
`source.read(indices)`. The loader walks a seeded permutation of the windows
per epoch, so its position is two integers (epoch, step) and resuming costs
O(1): nothing already consumed is re-read.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from typing import IO, Protocol

import fsspec
import numpy as np
from etils import epath

from mtj.corpus import expand_inputs, iter_documents, tokenize_documents, windows
from mtj.paths import PathLike, is_remote, user_path
from mtj.tfrecord import RecordError, check_record, decode_example, scan_offsets
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

    Index entries are taken as written when absolute (a path or a URL) and relative to the index's
    own location otherwise, so a data folder can be copied into a bucket whole. Opening reads only
    the 12-byte record headers (a truncated file fails here, naming file and offset); each record's
    data CRC is checked when it is read. From a bucket, a batch's records are fetched as concurrent
    range reads (the loader reads batches ahead on a thread).
    """

    max_open_files = 64  # local files kept open for reading; the least recently used is closed beyond this

    def __init__(self, index: PathLike, seq: int, skip_corrupt: bool = False):
        index = user_path(index)
        if not index.is_file():
            raise FileNotFoundError(f"index file {index} does not exist")
        lines = [line.strip() for line in index.read_text().splitlines() if line.strip()]
        self.files = [user_path(p) if p.startswith("/") or is_remote(p) else index.parent / p for p in lines]
        if not self.files:
            raise ValueError(f"index file {index} lists no TFRecord files")
        self.seq, self.name, self.skip_corrupt = seq, str(index), skip_corrupt
        file_ids, offsets, lengths = [], [], []
        for i, path in enumerate(self.files):
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path}, which does not exist")
            records = scan_offsets(path, skip_corrupt=skip_corrupt)
            if skip_corrupt:
                records = self._verified(path, records)
            file_ids += [i] * len(records)
            offsets += [o for o, _ in records]
            lengths += [n for _, n in records]
        if not offsets:
            raise ValueError(f"the TFRecord files of {index} hold no records")
        self.file_ids, self.offsets, self.lengths = np.array(file_ids), np.array(offsets), np.array(lengths)
        self._handles: dict[int, IO[bytes]] = {}  # in order of use, oldest first
        self._remote = {i: fsspec.core.url_to_fs(os.fspath(p)) for i, p in enumerate(self.files) if is_remote(p)}
        # Fail now, not mid-run, on a file written with another seq: the first record of each file.
        self.read(np.unique(self.file_ids, return_index=True)[1])

    def _tokens(self, path: epath.Path, offset: int, length: int, raw: bytes) -> np.ndarray:
        """The tokens of one record read as data + CRC bytes, checked: CRC, Example, length seq + 1."""
        where = f"{path}: the record at byte offset {offset - 12}"
        data = check_record(raw, path, offset, length)
        try:
            tokens = decode_example(data)
        except ValueError as e:
            raise RecordError(f"{where} is not an Example with an Int64List 'text' feature ({e})") from None
        if len(tokens) != self.seq + 1:
            raise RecordError(f"{where} has {len(tokens)} tokens but seq+1={self.seq + 1} are needed; set 'seq' "
                              "to match the data or re-run create_tfrecords.py with --seq")
        return tokens

    def _verified(self, path: epath.Path, records: list[tuple[int, int]]) -> list[tuple[int, int]]:
        good = []
        with path.open("rb") as f:
            for offset, length in records:
                try:
                    f.seek(offset)
                    self._tokens(path, offset, length, f.read(length + 4))
                    good.append((offset, length))
                except RecordError as e:
                    warnings.warn(f"skipping corrupt record: {e}")
        return good

    def __len__(self) -> int:
        return len(self.offsets)

    def _handle(self, fid: int) -> IO[bytes]:
        f = self._handles.pop(fid, None) or self.files[fid].open("rb")
        self._handles[fid] = f  # now the most recently used
        while len(self._handles) > self.max_open_files:
            self._handles.pop(next(iter(self._handles))).close()
        return f

    def _raw(self, indices: list[int]) -> list[bytes]:
        """Each record's data and CRC bytes: local files by seek and read, remote ones in one concurrent call."""
        out: dict[int, bytes] = {}
        remote = [i for i in indices if int(self.file_ids[i]) in self._remote]
        if remote:
            fs = self._remote[int(self.file_ids[remote[0]])][0]
            paths = [self._remote[int(self.file_ids[i])][1] for i in remote]
            starts = [int(self.offsets[i]) for i in remote]
            ends = [int(self.offsets[i] + self.lengths[i]) + 4 for i in remote]
            out.update(zip(remote, fs.cat_ranges(paths, starts, ends)))
        for i in indices:
            if i not in out:
                f = self._handle(int(self.file_ids[i]))
                f.seek(int(self.offsets[i]))
                out[i] = f.read(int(self.lengths[i]) + 4)
        return [out[i] for i in indices]

    def read(self, indices: np.ndarray) -> np.ndarray:
        raws = self._raw([int(i) for i in indices])
        return np.stack([self._tokens(self.files[int(self.file_ids[i])], int(self.offsets[i]), int(self.lengths[i]), raw)
                         for i, raw in zip(indices, raws)]).astype(np.int32)


def tfds_source(spec: str, seq: int, tokenizer: Tokenizer) -> ArraySource:
    """`tfds:NAME[:SPLIT]`: the "text" feature of a locally prepared TFDS dataset (array_record format),
    found in $TFDS_DATA_DIR (default ~/tensorflow_datasets); tokenized in memory."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("tfds: data needs tensorflow-datasets: pip install tensorflow-datasets array_record") from None
    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "train"
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    texts = (source[i]["text"] for i in range(len(source)))
    docs = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return document_source(docs, seq, tokenizer, spec)


def open_source(spec: str, seq: int, tokenizer: Tokenizer, skip_corrupt: bool = False) -> Source:
    """A data source from a `train_set`/`val_set` value: an .index file of TFRecords, tfds:NAME[:SPLIT],
    or text files (a file, a directory or a glob) tokenized on the fly."""
    if not spec:
        raise ValueError("no data given: set 'train_set' to an .index file, text files or tfds:NAME[:SPLIT]")
    if spec.endswith(".index"):
        return TFRecordSource(spec, seq, skip_corrupt)
    if spec.startswith("tfds:"):
        return tfds_source(spec, seq, tokenizer)
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
