"""TFRecord data: format, round trip, sharding across processes, resume, corruption, inputs."""

import collections
import functools
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest

from conftest import REPO
from mtj.corpus import create_tfrecords, expand_inputs, iter_documents, tokenize_documents, windows as cut
from mtj.data import ArraySource, Loader, StreamLoader, TFRecordSource, loader, open_source
from mtj.tfrecord import RecordError, decode_example, encode_example, iter_records, masked_crc32c, write_tfrecords
from mtj.tokenizer import load_tokenizer

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.",
        "You are all resolved rather to die than to famish? ünïcödé ✓", "Resolved. resolved."] * 3


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): independent of google_crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc_and_framing_match_the_standard(tmp_path):
    assert crc32c_reference(b"123456789") == 0xE3069283  # the published CRC-32C check value

    def mask(crc):
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    for data in [b"", b"123456789", bytes(range(256)) * 3]:
        assert masked_crc32c(data) == mask(crc32c_reference(data))
    write_tfrecords(tmp_path / "one.tfrecords", [np.array([1, 300, 50256])])
    raw = (tmp_path / "one.tfrecords").read_bytes()
    payload = encode_example(np.array([1, 300, 50256]))
    length = struct.pack("<Q", len(payload))
    assert raw == length + struct.pack("<I", mask(crc32c_reference(length))) + payload + \
        struct.pack("<I", mask(crc32c_reference(payload)))
    # Example{features{feature{key:"text" value{int64_list{value:[1,300,50256]}}}}} with packed varints
    assert payload == bytes.fromhex("0a14" "0a12" "0a04" "74657874" "120a" "1a08" "0a06" "01ac02d08803")
    assert decode_example(payload).tolist() == [1, 300, 50256]


def test_varints_round_trip_large_ids():
    values = np.array([0, 1, 127, 128, 16383, 16384, 50431, 2**21, 2**28 + 5], np.int64)
    assert decode_example(encode_example(values)).tolist() == values.tolist()


def test_write_read_round_trip(tmp_path):
    tok = load_tokenizer("gpt2")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    index = create_tfrecords(str(tmp_path / "in.jsonl"), "rt", tmp_path / "out", tok, seq=16,
                             preserve_data_order=True, progress=False)
    expected = [t for d in DOCS for t in (*tok.encode(d), tok.eos_id)]
    source = TFRecordSource(index, seq=16)
    data = source.read(np.arange(len(source)))
    assert data.shape == (len(expected) // 17, 17)
    assert data.reshape(-1).tolist() == expected[: data.size]
    assert [p.name for p in source.files] == [f"rt_{len(source)}.tfrecords"]


def test_split_files_repack_and_shuffle(tmp_path):
    tok = load_tokenizer("gpt2")
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(DOCS))
    index = create_tfrecords(str(tmp_path / "a.txt"), "big", tmp_path, tok, seq=8, n_repack_epochs=2,
                             max_file_sequences=5, seed=1, progress=False)
    once = create_tfrecords(str(tmp_path / "a.txt"), "once", tmp_path, tok, seq=8, seed=1, progress=False)
    files = index.read_text().split()
    assert len(files) > 1 and all(f.startswith("big-") for f in files)
    big, first = TFRecordSource(index, 8), TFRecordSource(once, 8)
    assert len(big) == 2 * len(first)
    epochs = big.read(np.arange(len(big))).reshape(2, len(first), 9)
    np.testing.assert_array_equal(epochs[0], first.read(np.arange(len(first))))  # the same seed, the same first epoch
    assert not np.array_equal(epochs[0], epochs[1])  # the second epoch is reshuffled
    tokenized = collections.Counter(tuple(tok.encode(d)) for d in DOCS)
    for epoch in epochs:  # each epoch: whole documents in some order, each at most as often as given
        text = epoch.reshape(-1).tolist()
        ends = [i for i, t in enumerate(text) if t == tok.eos_id]
        whole = collections.Counter(tuple(text[a + 1:b]) for a, b in zip([-1, *ends], ends))
        assert whole <= tokenized and whole.total() >= len(DOCS) - 2  # the cut-off tail: at most 2 short ones


def test_input_kinds(tmp_path):
    import zstandard

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one<|endoftext|>two")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "d" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "four"}\n'))
    with tarfile.open(tmp_path / "e.tar.gz", "w:gz") as tar:
        data = b'{"text": "five"}\n'
        info = tarfile.TarInfo("inner/x.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert list(iter_documents(expand_inputs(tmp_path / "d"))) == ["one", "two", "three", "four"]
    assert list(iter_documents(expand_inputs(tmp_path / "e.tar.gz"))) == ["five"]
    assert len(expand_inputs(str(tmp_path / "d" / "*.txt"))) == 1
    with pytest.raises(FileNotFoundError, match="no input"):
        expand_inputs(tmp_path / "nothing*")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        list(iter_documents([tmp_path / "bad.jsonl"]))


def test_processes_get_disjoint_slices_covering_the_epoch():
    source = ArraySource(np.arange(96 * 5).reshape(96, 5))
    seen = []
    for p in range(2):
        loader = Loader(source, gas=2, global_batch=8, seed=7, process_index=p, process_count=2)
        assert loader.steps_per_epoch == 6
        batches = [next(loader) for _ in range(6)]
        assert batches[0].shape == (2, 4, 5)
        seen.append(np.concatenate([b.reshape(-1, 5)[:, 0] // 5 for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(96))


def test_resume_mid_epoch_and_reshuffle():
    source = ArraySource(np.arange(40 * 3).reshape(40, 3))
    loader = Loader(source, gas=1, global_batch=4, seed=3)
    for _ in range(7):
        next(loader)
    state = loader.state()
    expected = [next(loader) for _ in range(10)]  # crosses into epoch 1
    fresh = Loader(source, gas=1, global_batch=4, seed=3)
    fresh.restore(json.loads(json.dumps(state)))
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)
    epoch0 = np.concatenate([b.reshape(-1) for b in [Loader(source, 1, 4, seed=3)._read(0, s) for s in range(10)]])
    epoch1 = np.concatenate([Loader(source, 1, 4, seed=3)._read(1, s).reshape(-1) for s in range(10)])
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "d_4.tfrecords"
    write_tfrecords(path, [np.arange(9) + i for i in range(4)])
    (tmp_path / "d.index").write_text("d_4.tfrecords\n")
    return path


def test_truncated_file_names_file_and_offset(records):
    raw = records.read_bytes()
    records.write_bytes(raw[:-7])
    with pytest.raises(RecordError, match=rf"{records.name}.*byte offset \d+.*truncated"):
        TFRecordSource(records.parent / "d.index", seq=8)
    with pytest.warns(UserWarning, match=rf"{records.name}.*byte offset \d+.*truncated"):
        kept = TFRecordSource(records.parent / "d.index", seq=8, skip_corrupt=True)
    assert len(kept) == 3


def test_bad_crc_names_file_and_offset(records):
    raw = bytearray(records.read_bytes())
    record_size = len(raw) // 4
    raw[record_size + 20] ^= 0xFF  # inside the data of the second record
    records.write_bytes(bytes(raw))
    source = TFRecordSource(records.parent / "d.index", seq=8)  # headers are fine
    with pytest.raises(RecordError, match=rf"{records.name}: bad data CRC .* byte offset {record_size}"):
        source.read(np.array([1]))
    with pytest.warns(UserWarning, match=rf"skipping corrupt record.*byte offset {record_size}"):
        skipped = TFRecordSource(records.parent / "d.index", seq=8, skip_corrupt=True)
    assert len(skipped) == 3 and skipped.read(np.array([1]))[0, 0] == 2


def framed(data: bytes) -> bytes:
    """One TFRecord with correct CRCs around `data`."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def digests(folder) -> dict[str, bytes]:
    return {p.name: hashlib.sha256(p.read_bytes()).digest() for p in sorted(folder.iterdir())}


def test_a_malformed_example_with_right_crcs_names_file_and_offset(records):
    good = records.read_bytes()
    bad_at = len(good) // 2  # the third record's place
    records.write_bytes(good[:bad_at] + framed(b"\x0a\x07garbage") + good[bad_at:])
    before = digests(records.parent)
    source = TFRecordSource(records.parent / "d.index", seq=8)  # framing and the first record are fine
    with pytest.raises(RecordError, match=rf"{records}: the record at byte offset {bad_at} is not an Example"):
        source.read(np.arange(len(source)))
    with pytest.warns(UserWarning, match=rf"skipping corrupt record.*byte offset {bad_at} is not an Example"):
        kept = TFRecordSource(records.parent / "d.index", seq=8, skip_corrupt=True)
    np.testing.assert_array_equal(kept.read(np.arange(4))[:, 0], [0, 1, 2, 3])
    assert digests(records.parent) == before


def test_every_record_and_every_file_is_checked_against_seq(records):
    good = records.read_bytes()
    last_at = len(good) // 4 * 3
    records.write_bytes(good[:last_at] + framed(encode_example(np.arange(5))))  # the last record is short
    (records.parent / "other_2.tfrecords").write_bytes(framed(encode_example(np.arange(17))) * 2)
    before = digests(records.parent)
    source = TFRecordSource(records.parent / "d.index", seq=8)
    source.read(np.arange(3))
    with pytest.raises(RecordError, match=rf"{records}: the record at byte offset {last_at} has 5 tokens but seq\+1=9"):
        source.read(np.array([3]))
    # A second file written with another seq fails at opening, not mid-run.
    (records.parent / "d.index").write_text("d_4.tfrecords\nother_2.tfrecords\n")
    with pytest.raises(RecordError, match=r"other_2.tfrecords: the record at byte offset 0 has 17 tokens but seq\+1=9"):
        TFRecordSource(records.parent / "d.index", seq=8)
    assert {k: v for k, v in digests(records.parent).items() if k != "d.index"} == \
        {k: v for k, v in before.items() if k != "d.index"}


def test_open_files_are_bounded(tmp_path):
    names = [f"part{i}_3.tfrecords" for i in range(10)]
    for i, name in enumerate(names):
        write_tfrecords(tmp_path / name, [np.arange(9) + 10 * i + j for j in range(3)])
    (tmp_path / "parts.index").write_text("\n".join(names))
    source = TFRecordSource(tmp_path / "parts.index", seq=8)
    source.max_open_files = 4

    def open_parts() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").endswith(".tfrecords") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    for i in np.random.RandomState(0).permutation(len(source)):
        row = source.read(np.array([i]))[0]
        assert row[0] == 10 * (i // 3) + i % 3
        assert open_parts() <= 4
    assert open_parts() == 4


def test_wrong_length_and_empty_inputs(records, tmp_path):
    with pytest.raises(RecordError, match=rf"{records.name}: the record at byte offset 0 has 9 tokens but seq\+1=17"):
        TFRecordSource(records.parent / "d.index", seq=16)
    (tmp_path / "empty.index").write_text("")
    with pytest.raises(ValueError, match="lists no TFRecord files"):
        TFRecordSource(tmp_path / "empty.index", seq=8)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        create_tfrecords(str(tmp_path / "empty.txt"), "e", tmp_path, load_tokenizer("gpt2"), seq=8, progress=False)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than seq"):
        open_source(str(tmp_path / "tiny.txt"), 64, load_tokenizer("gpt2"))
    with pytest.raises(ValueError, match="needs 8"):
        Loader(ArraySource(np.zeros((3, 5))), gas=2, global_batch=4)


def test_cli_writes_original_format(tmp_path):
    (tmp_path / "in.txt").write_text("<|endoftext|>".join(DOCS))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "create_tfrecords.py"), str(tmp_path / "in.txt"),
                             "cli", "--output-dir", str(tmp_path / "o"), "--seq", "8", "--min-unique-tokens", "5"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    files = (tmp_path / "o" / "cli.index").read_text().split()
    records = list(iter_records(tmp_path / "o" / files[0]))
    assert files[0] == f"cli_{len(records)}.tfrecords"
    assert all(len(set(decode_example(r).tolist())) >= 5 and len(decode_example(r)) == 9 for r in records)


@functools.cache
def corpus_builder():
    """A TFDS builder of the documents in its class attribute `documents`, prepared offline as array_record."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class MtjTestCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        documents: list[str] = []

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, doc in enumerate(self.documents):
                yield i, {"text": doc}

    return MtjTestCorpus


def tfds_corpus(folder, documents, monkeypatch) -> list[str]:
    """Prepare `documents` as tfds:mtj_test_corpus in `folder` (TFDS_DATA_DIR); their stored order."""
    import tensorflow_datasets as tfds

    builder = corpus_builder()
    builder.documents = documents
    builder(data_dir=str(folder), file_format="array_record").download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(folder))
    stored = tfds.data_source("mtj_test_corpus", split="train", data_dir=str(folder))
    return [stored[i]["text"].decode() for i in range(len(stored))]


def stream(tok, **kw):
    return loader("tfds:mtj_test_corpus:train", 16, tok, gas=2, global_batch=2, **kw)


def test_tfds_streams_the_batches_of_its_windows_in_memory(tmp_path, monkeypatch):
    docs = tfds_corpus(tmp_path, DOCS, monkeypatch)
    assert sorted(docs) == sorted(DOCS)
    tok = load_tokenizer("gpt2")
    windows = ArraySource(cut(np.concatenate(tokenize_documents(docs, tok)), 16))
    in_memory = [Loader(windows, 2, 4, shuffle=False, process_index=p, process_count=2) for p in range(2)]
    streamed = [loader("tfds:mtj_test_corpus", 16, tok, 2, 4, shuffle=False, process_index=p, process_count=2)
                for p in range(2)]
    assert isinstance(streamed[0], StreamLoader) and "12 documents" in streamed[0].describe()
    for _ in range(2 * in_memory[0].steps_per_epoch + 1):  # into the third epoch
        for mine, theirs in zip(streamed, in_memory):
            np.testing.assert_array_equal(next(mine), next(theirs))
    assert streamed[0].steps_per_epoch == in_memory[0].steps_per_epoch


def test_tfds_stream_resumes_exactly_and_reshuffles_each_epoch(tmp_path, monkeypatch):
    docs = [" ".join(f"w{i}x{j}" for j in range(i % 7 + 1)) for i in range(40)]  # documents of 2 to 22 tokens
    tfds_corpus(tmp_path, docs, monkeypatch)
    tok = load_tokenizer("gpt2")
    run = stream(tok, seed=3)
    states, batches = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(run.state())))  # as a checkpoint keeps it
        batches.append(next(run))
    assert run.epoch >= 1 and run.steps_per_epoch  # an epoch boundary was crossed
    for k in (1, 3, run.steps_per_epoch, run.steps_per_epoch + 1, 10):
        resumed = stream(tok, seed=3)
        resumed.restore(states[k])
        for want in batches[k:]:
            np.testing.assert_array_equal(next(resumed), want)
    epochs = [stream(tok, seed=3) for _ in range(2)]
    epochs[1].restore({"epoch": 1, "step": 0, "doc": 0, "used": 0})
    assert not np.array_equal(next(epochs[0]), next(epochs[1]))  # another document order


def test_tfds_stream_memory_does_not_grow_with_the_split(tmp_path, monkeypatch):
    tok = load_tokenizer("gpt2")
    peaks = []
    for n in (500, 10_000):
        tfds_corpus(tmp_path / str(n), [f"document {i} " + "lorem ipsum dolor sit amet " * 20 for i in range(n)],
                    monkeypatch)
        tracemalloc.start()
        run = stream(tok, seed=1)
        for _ in range(3):
            next(run)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # the larger split's ~1.1M tokens would take 4.4 MB as int32; the stream holds its permutation (8 B a document)
    assert peaks[1] - peaks[0] < 9_500 * 8 + 200_000, peaks
