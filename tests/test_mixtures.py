"""`train_set` as a mixture of sources with weights: the shares drawn, a deterministic order, an exact resume, a
weight change at a resume honoured from that step, and a training run over one."""

import json

import numpy as np
import pytest

from mtj.config import ConfigError, from_dict
from mtj.data import ArraySource, MixtureLoader

SEQ = 4


def sources(sizes: dict[str, int]) -> dict[str, ArraySource]:
    """Windows whose first token names their source (0, 1, ...) and whose second their index in it."""
    return {name: ArraySource(np.array([[k, i, 0, 0, 0] for i in range(n)], np.int32), name)
            for k, (name, n) in enumerate(sizes.items())}


def mixture(weights: dict[str, float], **kw) -> MixtureLoader:
    return MixtureLoader(sources({"a": 700, "b": 50}), weights, gas=2, global_batch=50, seed=7, **kw)


def drawn(loader: MixtureLoader, steps: int) -> np.ndarray:
    return np.stack([next(loader) for _ in range(steps)])  # [steps, gas, batch, seq + 1]


def test_the_shares_follow_the_weights_and_each_source_its_own_epochs():
    samples = drawn(mixture({"a": 0.7, "b": 0.3}), 100).reshape(-1, SEQ + 1)  # 10,000
    share_b = np.mean(samples[:, 0] == 1)
    assert abs(share_b - 0.3) < 0.01, share_b
    # the small source is read epoch after epoch, each a permutation of it
    from_b = samples[samples[:, 0] == 1, 1]
    for epoch in range(len(from_b) // 50):
        assert sorted(from_b[epoch * 50:(epoch + 1) * 50]) == list(range(50))
    assert not np.array_equal(from_b[:50], from_b[50:100])  # reshuffled
    assert np.array_equal(drawn(mixture({"a": 0.7, "b": 0.3}), 5), drawn(mixture({"a": 0.7, "b": 0.3}), 5))


def test_a_resume_is_exact_and_new_weights_hold_from_that_step():
    whole = drawn(mixture({"a": 0.7, "b": 0.3}), 30)
    first = mixture({"a": 0.7, "b": 0.3})
    drawn(first, 12)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint's meta keeps it
    again = mixture({"a": 0.7, "b": 0.3})
    again.restore(state)
    assert again.weights_changed is None and np.array_equal(drawn(again, 18), whole[12:])
    changed = mixture({"a": 0.2, "b": 0.8})
    changed.restore(state)
    assert "from step 12 on" in changed.weights_changed and "'b': 0.8" in changed.weights_changed
    after = drawn(changed, 40).reshape(-1, SEQ + 1)
    assert abs(np.mean(after[:, 0] == 1) - 0.8) < 0.02
    # each source goes on where it was: b's samples before and after the resume are its epochs, in turn
    before = whole[:12].reshape(-1, SEQ + 1)
    from_b = np.concatenate([before[before[:, 0] == 1, 1], after[after[:, 0] == 1, 1]])
    assert len(from_b) >= 150 and np.sum(before[:, 0] == 1) % 50  # (the resume falls inside an epoch of b)
    for epoch in range(len(from_b) // 50):
        assert sorted(from_b[epoch * 50:(epoch + 1) * 50]) == list(range(50))
    for process in range(2):  # processes read disjoint halves of every micro-batch, together the whole
        part = MixtureLoader(sources({"a": 700, "b": 50}), {"a": 0.7, "b": 0.3}, 2, 50, 7, process_index=process,
                             process_count=2)
        assert np.array_equal(next(part), whole[0][:, process * 25:(process + 1) * 25])


def test_mistakes_are_named():
    base = dict(layers=2, d_model=64, n_heads=8, n_vocab=512, seq=32)
    for bad in ({}, {"a.index": 0}, {"a.index": -1.0}, {"tfds:x": 1.0}):
        with pytest.raises(ConfigError, match="train_set"):
            from_dict({**base, "train_set": bad})
    single = {"epoch": 0, "step": 3, "seed": 7}
    with pytest.raises(ValueError, match="cannot become a mixture"):
        mixture({"a": 1.0, "b": 1.0}).restore(single)
    other = mixture({"a": 1.0, "b": 1.0}).state() | {"drawn": {"a": 1, "c": 2}}
    with pytest.raises(ValueError, match="not the sources"):
        mixture({"a": 1.0, "b": 1.0}).restore(other)


def test_training_on_a_mixture_resumes_with_new_weights(tmp_path, capsys):
    from conftest import assets
    from mtj.train import train
    from test_train import config, metrics

    text = (assets() / "text" / "tinyshakespeare.txt").read_text()
    (tmp_path / "a.txt").write_text(text[:60_000])
    (tmp_path / "b.txt").write_text(text[60_000:90_000])
    mix = {str(tmp_path / "a.txt"): 0.7, str(tmp_path / "b.txt"): 0.3}
    train(config(tmp_path, train_set=mix, total_steps=3, ckpt_every=3), progress=False)
    assert "a mixture: " in capsys.readouterr().out
    train(config(tmp_path, train_set={str(tmp_path / "a.txt"): 0.1, str(tmp_path / "b.txt"): 0.9}, total_steps=5),
          progress=False)
    out = capsys.readouterr().out
    assert "resuming" in out and "mixture weights from step 3 on" in out, out
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3, 4, 5]


def test_packed_and_plain_sources_mix():
    """A plain source's windows beside packed ones read as one document each, all of it learned."""
    plain = ArraySource(np.arange(5 * 6, dtype=np.int32).reshape(6, 5), "plain")
    packed = ArraySource(np.stack([np.stack([np.full(5, 9), [1, 1, 2, 2, 0], [0, 1, 1, 1, 0]])] * 6).astype(np.int32),
                         "packed")
    batch = next(MixtureLoader({"plain": plain, "packed": packed}, {"plain": 0.5, "packed": 0.5}, 1, 8, seed=1))
    assert batch.shape == (1, 8, 3, 5)
    rows = batch[0]
    from_plain = rows[rows[:, 0, 0] != 9]
    assert len(from_plain) and (from_plain[:, 1:] == 1).all()  # one segment, all learned
    assert (rows[rows[:, 0, 0] == 9][:, 1] == [1, 1, 2, 2, 0]).all()
