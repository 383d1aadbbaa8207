"""Checkpoints written by earlier mtj versions still restore, to the same logits."""

import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtj
from conftest import assert_greedy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_pre_nnx_checkpoints import CONFIGS, TOKENS  # noqa: E402


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_checkpoint_from_before_the_nnx_model_restores_to_the_same_logits(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MTJ_CPU_KERNELS", "0")  # the fixture's logits are XLA's (mtj's CPU matmul: test_cpu_matmul)
    ckpt = shutil.copytree(FIXTURES / "pre_nnx" / name, tmp_path / name)  # restoring must not touch the fixture
    lm = mtj.load(ckpt)
    assert lm.config.to_dict() == CONFIGS[name].to_dict()
    expected = np.load(FIXTURES / "pre_nnx" / f"{name}_logits.npy")
    np.testing.assert_allclose(lm.logits(TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_a_model_loads_with_its_weights_in_the_compute_dtype(tmp_path, monkeypatch):
    # What loading defaults to on accelerators (mtj.lm.inference_config); on CPU it is asked for (and
    # without mtj's CPU matmul, which would hold a bf16 model's kernels packed in bf16 either way).
    monkeypatch.setenv("MTJ_CPU_KERNELS", "0")
    ckpt = shutil.copytree(FIXTURES / "pre_nnx" / "gptj", tmp_path / "gptj")
    masters = mtj.load(ckpt, dtype="bfloat16")
    compact = mtj.load(ckpt, dtype="bfloat16", param_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(masters.params)} == {np.dtype("float32")}
    assert {a.dtype for a in jax.tree.leaves(compact.params)} == {np.dtype(jnp.bfloat16)}
    # The matmuls read the same bf16 weights either way; only the LayerNorm and bias parameters round.
    np.testing.assert_allclose(compact.logits(TOKENS), masters.logits(TOKENS), atol=0.03, rtol=0)
    new = compact.generate_tokens(TOKENS[:, :4].tolist(), 6, temperature=0)  # decoding runs on bf16 weights
    assert [len(n) for n in new] == [6, 6]
    for prompt, tokens in zip(TOKENS[:, :4].tolist(), new):
        assert_greedy(compact, prompt, tokens, rel=0.01)
