"""Packed sequences: several documents in one row, each attending within itself with positions restarting at
its first token, and loss masks. The loss and gradients of a packed batch are those of its documents computed
alone, unpadded (token-weighted: every counted target counts once), for the three families, through the einsum
path and the fused kernels' references, sharded and not."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtj.corpus import create_tfrecords
from mtj.data import TFRecordSource
from mtj.tokenizer import load_tokenizer
from mtj.model import document_positions, forward, init_params, param_shardings
from mtj.sharding import make_mesh
from mtj.train import loss_fn
from test_attention import FAMILIES, close, small

ROWS = [[40, 50, 35], [70, 59]]  # documents per row of 129 tokens: padding after the first row, none after the second


def sharp(params, key):
    """Random weights of std 0.3 (attention that depends on what it attends to) and LayerNorms near 1."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([0.3 * jax.random.normal(k, x.shape, x.dtype) if x.ndim > 1
                           else x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def packed(documents: list[list[np.ndarray]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `width` tokens holding the documents one after another, and their segment ids (1, 2, ...; 0 for
    the padding after them)."""
    tokens, segments = np.zeros((len(documents), width), np.int32), np.zeros((len(documents), width), np.int32)
    for r, docs in enumerate(documents):
        at = 0
        for i, doc in enumerate(docs, 1):
            tokens[r, at:at + len(doc)], segments[r, at:at + len(doc)] = doc, i
            at += len(doc)
    return tokens, segments


def value_and_grads(cfg, params, *args, **kw):
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, *args, cfg, **kw)[0]))(params)


def test_document_positions_restart_at_each_document():
    ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_packed_batch_has_its_documents_loss_and_gradients(family):
    cfg = small(family, attention="xla", z_loss=1e-3)
    params = sharp(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    rng = np.random.default_rng(2)
    documents = [[rng.integers(0, cfg.n_vocab, n) for n in row] for row in ROWS]
    # alone: each document a batch of one, unpadded; the packed loss weighs each by its targets (length - 1)
    counts = np.array([len(d) - 1 for row in documents for d in row], np.float64)
    alone = [value_and_grads(cfg, params, jnp.asarray(d[None])) for row in documents for d in row]
    weights = counts / counts.sum()
    want_loss = sum(w * float(loss) for w, (loss, _) in zip(weights, alone))
    want_grads = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)), *[grads for _, grads in alone])
    tokens, segments = packed(documents, cfg.seq + 1)
    for kernel in ("xla", "splash", "cudnn"):
        loss, grads = value_and_grads(cfg.replace(attention=kernel), params, tokens, segment_ids=segments)
        assert float(loss) == pytest.approx(want_loss, abs=1e-5, rel=1e-5), kernel
        close(grads, want_grads, 1e-5)
    # sharded over dp and mp, the einsum path and splash's (whose segment ids are split over dp with the rows)
    sharded, mesh = cfg.replace(cores_per_replica=2), make_mesh(mp=2, dp=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, param_shardings(sharded, mesh))
        for kernel in ("xla", "splash"):
            loss, grads = value_and_grads(sharded.replace(attention=kernel), placed, tokens, segment_ids=segments)
            assert float(loss) == pytest.approx(want_loss, abs=1e-5, rel=1e-5), kernel
            close(grads, want_grads, 1e-5)


def test_a_loss_mask_counts_only_the_targets_it_marks():
    """The loss and gradients with a mask are those of the mean over the marked targets' log-likelihoods, from
    the model's full logits."""
    cfg = small("gptj", attention="xla", z_loss=0.0)
    params = sharp(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    batch = jax.random.randint(jax.random.key(3), (2, cfg.seq + 1), 0, cfg.n_vocab)
    mask = (jax.random.uniform(jax.random.key(4), batch.shape) < 0.3).astype(jnp.int32)
    counted = mask[:, 1:].astype(jnp.float32)

    def marked_mean(p):
        logits = forward(p, batch[:, :-1], cfg)
        token_loss = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch[:, 1:, None], -1)[..., 0]
        return jnp.sum(token_loss * counted) / jnp.sum(counted)

    close(value_and_grads(cfg, params, batch, loss_mask=mask), jax.jit(jax.value_and_grad(marked_mean))(params), 1e-5)
    unmasked, _ = value_and_grads(cfg, params, batch)
    assert abs(float(unmasked) - float(marked_mean(params))) > 1e-3  # (the mask made a difference)


def write_examples(path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_jsonl_examples_become_packed_records_with_masks(tmp_path):
    tok = load_tokenizer("gpt2")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    long = "word " * 40
    write_examples(tmp_path / "ft.jsonl", [
        {"prompt": "Q: two and two?", "completion": " A: four"},
        {"text": "Plain text, all of it learned."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                      {"role": "user", "content": "Bye"}]},
        {"text": long}])
    index = create_tfrecords(str(tmp_path / "ft.jsonl"), "ft", tmp_path / "out", tok, seq=24, preserve_data_order=True,
                             progress=False, fmt="jsonl")
    source = TFRecordSource(index, 24)
    rows = source.read(np.arange(len(source)))
    assert rows.shape[1:] == (3, 25)
    tokens, segments, mask = rows[:, 0], rows[:, 1], rows[:, 2]
    eos = tok.eos_id
    prompt, completion = tok.encode("Q: two and two?"), tok.encode(" A: four")
    first = segments[0] == 1  # the first example opens the first record
    assert tokens[0, first].tolist() == prompt + completion + [eos]
    assert mask[0, first].tolist() == [0] * len(prompt) + [1] * (len(completion) + 1)
    # the conversation: only the assistant's message (and the closing EOS) is learned
    pieces = {tok.decode(tokens[r, segments[r] == k].tolist()): tok.decode(tokens[r, (segments[r] == k) & (mask[r] == 1)].tolist())
              for r in range(len(rows)) for k in range(1, segments[r].max() + 1)}
    assert pieces["<user>Hi\n<assistant>Hello there\n<user>Bye\n<|endoftext|>"] == "<assistant>Hello there\n<|endoftext|>"
    # every record: segments count up from 1 and padding (0) only at the end; the long text is split
    for row in segments:
        used = row[row > 0]
        assert used.tolist() == sorted(used.tolist()) and used[0] == 1 and (row[len(used):] == 0).all()
    assert (mask[segments == 0] == 0).all() and len(source) >= 3
    # old readers see the original "text" feature
    from mtj.tfrecord import decode_example, iter_records
    path = next((tmp_path / "out").glob("*.tfrecords"))
    assert decode_example(next(iter(iter_records(path)))).tolist() == tokens[0].tolist()


def test_prompts_carry_no_loss_and_completions_are_learned(tmp_path):
    """Random prompts (nothing to learn) and one learnable completion: the reported loss, over completions only,
    falls far, and it is the completions' loss from the model's logits; the log reports useful tokens/s."""
    from mtj.train import train
    from test_train import config, metrics

    rng = np.random.default_rng(0)
    words = ["apple", "stone", "river", "cloud", "seven", "green", "table", "night", "glass", "house"]
    write_examples(tmp_path / "qa.jsonl", [{"prompt": " ".join(rng.choice(words, 12)), "completion": " so the answer is yes."}
                                           for _ in range(400)])
    tok = load_tokenizer("gpt2")
    index = create_tfrecords(str(tmp_path / "qa.jsonl"), "qa", tmp_path / "data", tok, seq=64, progress=False, fmt="jsonl")
    train(config(tmp_path, train_set=str(index), seq=64, per_replica_batch=2, total_steps=40, anneal_steps=30), progress=False)
    rows = metrics(tmp_path / "run")
    assert rows[40]["loss"] < 0.3 * rows[1]["loss"], (rows[1]["loss"], rows[40]["loss"])
    assert 0 < rows[40]["useful_tokens_per_sec"] < 0.5 * rows[40]["tokens_per_sec"]  # most targets are prompts
    # the loss counts completion targets only: the masked loss of a batch from the trained model, recomputed
    import mtj
    lm = mtj.load(tmp_path / "run", dtype="float32")
    batch = TFRecordSource(index, 64).read(np.arange(2))
    losses = []  # each example alone: its completion targets' losses
    for tokens, segments, mask in batch:
        for segment in range(1, segments.max() + 1):
            ids, learned = tokens[segments == segment], mask[segments == segment]
            logits = lm.logits(ids[None, :-1])[0].astype(np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            losses += (-logp[np.arange(len(ids) - 1), ids[1:]])[learned[1:] == 1].tolist()
    _, ce = loss_fn(lm.params, jnp.asarray(batch), lm.config.replace(z_loss=0.0))
    assert float(ce) == pytest.approx(np.mean(losses), abs=1e-4)
