"""Packed sequences: several documents in one row, each attending within itself with positions restarting at
its first token, and loss masks. The loss and gradients of a packed batch are those of its documents computed
alone, unpadded (token-weighted: every counted target counts once), for the three families, through the einsum
path and the fused kernels' references, sharded and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
