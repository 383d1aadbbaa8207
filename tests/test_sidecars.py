"""Record-offset sidecars (mtj/tfrecord.py, mtj-index): opening a dataset reads no record but each file's first;
a missing or stale sidecar falls back to a scan and never yields a wrong record; token ids are checked."""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from etils import epath

from conftest import REPO
from mtj.data import Loader, TFRecordSource, open_source
from mtj.tfrecord import RecordError, encode_example, sidecar_of, write_tfrecords
from mtj.tokenizer import load_tokenizer

SEQ = 8


def dataset(folder, files=3, records=10, seed=0, vocab=50257) -> epath.Path:
    """`files` TFRecord files of `records` windows of SEQ + 1 random ids (varied lengths), with sidecars, and
    their .index."""
    folder = epath.Path(folder)
    rng = np.random.default_rng(seed)
    names = []
    for f in range(files):
        names.append(f"part-{f}_{records}.tfrecords")
        write_tfrecords(folder / names[-1], rng.integers(0, vocab, (records, SEQ + 1)) // rng.integers(1, 500, (records, 1)))
    (folder / "data.index").write_text("".join(n + "\n" for n in names))
    return folder / "data.index"


def batches(index, steps=6, **kw) -> list[np.ndarray]:
    loader = Loader(TFRecordSource(index, SEQ, **kw), gas=2, global_batch=4, seed=5)
    return [next(loader) for _ in range(steps)]


def test_opening_reads_the_sidecars_and_each_files_first_record_only(tmp_path):
    index = dataset(tmp_path)
    source = TFRecordSource(index, SEQ)
    assert source.offsets.dtype == np.int64 and source.lengths.dtype == np.uint32  # 12 bytes per record
    want = source.read(np.arange(30))
    for f, path in enumerate(source.files):  # every header but each file's first overwritten: a scan would fail
        data = bytearray(path.read_bytes())
        for offset in source.offsets[10 * f + 1: 10 * (f + 1)].tolist():
            data[offset - 12: offset] = b"\xff" * 12
        path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no scan warning
        opened = TFRecordSource(index, SEQ)
    np.testing.assert_array_equal(opened.read(np.arange(0, 30, 10)), want[::10])
    with pytest.raises(RecordError, match="part-0_10.tfrecords: the record at byte offset .* is not framed as its "
                                          "offsets say"):
        opened.read(np.array([1]))


def test_a_dataset_without_sidecars_gives_the_same_batches(tmp_path):
    """As the original trainer wrote them: no sidecars. They are scanned (one warning naming mtj-index)."""
    index = dataset(tmp_path / "with")
    shutil.copytree(tmp_path / "with", tmp_path / "without")
    for sidecar in (tmp_path / "without").glob("*.offsets"):
        sidecar.unlink()
    with pytest.warns(UserWarning, match=r"3 of the 3 files .* were scanned .*3: no sidecar.*mtj-index"):
        scanned = batches(tmp_path / "without" / "data.index")
    for want, got in zip(batches(index), scanned):
        np.testing.assert_array_equal(want, got)


def rewrite(path, windows):
    """Rewrite a TFRecord file in place, leaving its old sidecar (as a tool that knows nothing of sidecars)."""
    sidecar = sidecar_of(path).read_bytes()
    write_tfrecords(path, windows)
    sidecar_of(path).write_bytes(sidecar)


def test_a_stale_sidecar_is_detected_and_the_file_scanned(tmp_path):
    index = dataset(tmp_path, files=2)
    first = tmp_path / "part-0_10.tfrecords"
    new = np.arange(12 * (SEQ + 1)).reshape(12, SEQ + 1) % 1000  # more records: another size
    rewrite(first, new)
    with pytest.warns(UserWarning, match="1: a sidecar that does not describe it"):
        source = TFRecordSource(index, SEQ)
    np.testing.assert_array_equal(source.read(np.arange(12)), new)
    data = first.read_bytes()
    first.write_bytes(data[:-5])  # truncated mid-record: the sidecar's size no longer matches; the scan names the cut
    with pytest.raises(RecordError, match="part-0_10.tfrecords: record at byte offset .* \\(truncated\\)"):
        TFRecordSource(index, SEQ)
    first.write_bytes(data[: int(source.offsets[6]) - 12])  # cut at a record boundary: the 6 records before it
    with pytest.warns(UserWarning, match="does not describe it"):
        kept = TFRecordSource(index, SEQ)
    assert len(kept) == 6 + 10
    np.testing.assert_array_equal(kept.read(np.arange(6)), new[:6])


def test_a_same_size_rewrite_that_moves_records_fails_loudly_at_the_record(tmp_path):
    """The sidecar's size check passes, but the records moved: the header read with each record says so."""
    index = dataset(tmp_path, files=1, records=4)
    source = TFRecordSource(index, SEQ)
    windows = source.read(np.arange(4))
    assert len(set(source.lengths.tolist())) > 1, source.lengths  # records of different lengths
    longest = int(np.argmax(source.lengths))
    order = [longest, *[i for i in range(4) if i != longest]] if longest else [1, 0, 2, 3]  # another length first
    assert source.lengths[order[0]] != source.lengths[0]
    rewrite(tmp_path / "part-0_4.tfrecords", windows[order])  # the same records, in another order: the same size
    with pytest.raises(RecordError, match="not framed as its offsets say.*mtj-index"):  # at opening: the first record
        TFRecordSource(index, SEQ)


def test_out_of_vocabulary_ids_name_file_offset_and_id(tmp_path):
    path = tmp_path / "bad_3.tfrecords"
    good = np.full(SEQ + 1, 7)
    write_tfrecords(path, [good, np.array([5] * SEQ + [2**33]), good])
    (tmp_path / "bad.index").write_text("bad_3.tfrecords\n")
    offset = 12 + len(encode_example(good)) + 4  # the second record's header
    source = TFRecordSource(tmp_path / "bad.index", SEQ, n_vocab=1000)
    np.testing.assert_array_equal(source.read(np.array([0, 2])), [good, good])
    with pytest.raises(RecordError, match=rf"bad_3.tfrecords: the record at byte offset {offset} holds the token id "
                                          rf"{2**33} \(position {SEQ}\), outside the model's vocabulary \[0, 1000\)"):
        source.read(np.array([0, 1]))
    with pytest.warns(UserWarning, match=f"skipping corrupt record: .*byte offset {offset} holds the token id"):
        kept = TFRecordSource(tmp_path / "bad.index", SEQ, skip_corrupt=True, n_vocab=1000)
    assert len(kept) == 2
    (tmp_path / "neg.txt").write_text("hello world " * 20)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        open_source(str(tmp_path / "neg.txt"), SEQ, load_tokenizer("gpt2"), n_vocab=100)


def test_two_processes_read_disjoint_slices_and_resume_exactly(tmp_path):
    index = dataset(tmp_path, files=3, records=16)
    source = TFRecordSource(index, SEQ)
    whole = Loader(source, gas=2, global_batch=4, seed=1)
    parts = [Loader(TFRecordSource(index, SEQ), gas=2, global_batch=4, seed=1, process_index=p, process_count=2)
             for p in range(2)]
    for step in range(5):
        want = next(whole)
        got = [next(p) for p in parts]
        np.testing.assert_array_equal(np.concatenate(got, axis=1), want)
        if step == 2:  # resume each process from its state, in a new loader
            states = [p.state() for p in parts]
            parts = [Loader(TFRecordSource(index, SEQ), gas=2, global_batch=4, seed=1, process_index=p, process_count=2)
                     for p in range(2)]
            for p, state in zip(parts, states):
                p.restore(state)


def mtj_index(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "index.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_mtj_index_on_a_bucket_prefix(tmp_path, gcs_dir):
    local = dataset(tmp_path, files=3, records=6)
    remote = epath.Path(gcs_dir) / "data"
    for name in [*local.read_text().split(), "data.index"]:  # as the original trainer left them: no sidecars
        (remote / name).write_bytes((tmp_path / name).read_bytes())
    with pytest.warns(UserWarning, match="3: no sidecar"):
        scanned = batches(str(remote / "data.index"), steps=3)
    done = mtj_index(str(remote) + "/")
    assert done.returncode == 0 and "wrote 3 sidecars (18 records); 0 files already had theirs" in done.stdout, done.stderr
    assert "indexing" in done.stderr and "3/3" in done.stderr  # the progress bar
    for name in local.read_text().split():
        assert (remote / (name + ".offsets")).read_bytes() == sidecar_of(tmp_path / name).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for want, got in zip(scanned, batches(str(remote / "data.index"), steps=3)):
            np.testing.assert_array_equal(want, got)
    again = mtj_index(str(remote / "data.index"))  # resumable: what has its sidecar is skipped
    assert again.returncode == 0 and "wrote 0 sidecars (0 records); 3 files already had theirs" in again.stdout
    missing = mtj_index(str(remote / "nothing_1.tfrecords"))
    assert missing.returncode == 1 and missing.stderr.strip().endswith("nothing_1.tfrecords: no such TFRecord file")


def test_a_corrupt_sidecar_falls_back_to_the_scan(tmp_path):
    index = dataset(tmp_path, files=1)
    want = TFRecordSource(index, SEQ).read(np.arange(10))
    sidecar = sidecar_of(tmp_path / "part-0_10.tfrecords")
    for damage in (b"", b"not a zip", sidecar.read_bytes()[:-20]):
        sidecar.write_bytes(damage)
        with pytest.warns(UserWarning, match="does not describe it"):
            np.testing.assert_array_equal(TFRecordSource(index, SEQ).read(np.arange(10)), want)
