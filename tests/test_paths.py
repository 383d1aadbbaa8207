"""User paths: one helper turns them into path objects (local or gs://), and writes are atomic."""

import re

import pytest

from conftest import REPO
from mtj.paths import glob, open_atomic, published_dir, user_path, write_atomic


def test_every_user_path_goes_through_one_helper():
    for source in sorted((REPO / "mtj").rglob("*.py")):  # the commands too
        text = source.read_text()
        assert "pathlib" not in text, f"{source.name} uses pathlib: use mtj.paths.user_path"
        if source.name != "paths.py":
            assert "epath.Path(" not in text, f"{source.name} builds paths itself: use mtj.paths.user_path"
            assert not re.search(r"(?<![.\w])open\(", text), f"{source.name} calls open(): use user_path(p).open()"


def test_local_paths_are_absolute_and_urls_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(user_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(user_path("gs://bucket/a/b")) == "gs://bucket/a/b"
    assert str(user_path("gs://bucket/a") / "step_1") == "gs://bucket/a/step_1"


def test_a_failed_write_leaves_nothing_and_the_old_file_intact(tmp_path):
    target = tmp_path / "sub" / "metrics.jsonl"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with open_atomic(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.jsonl"]
    write_atomic(target, "new\n")  # replaces the old file
    assert target.read_text() == "new\n"


def test_published_dir_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with published_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with published_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="already exists"):
        with published_dir(tmp_path / "out"):
            pass


def test_glob_spans_directories_locally(tmp_path):
    for name in ("a/x.txt", "a/b/y.txt", "z.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("t")
    assert [p.name for p in glob(tmp_path / "**" / "*.txt")] == ["y.txt", "x.txt"]  # a/b/y.txt, a/x.txt


def test_a_torn_metrics_line_is_skipped_and_the_log_rewritten_whole(tmp_path):
    from mtj.config import Config
    from mtj.metrics import MetricsLog, read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert [r["step"] for r in read_metrics(log)] == [1, 2]
    with pytest.warns(UserWarning):
        MetricsLog(tmp_path, Config(), keep_until=1).close()  # resuming from step 1
    assert log.read_text() == '{"step": 1, "loss": 5.0}\n'
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(log)
