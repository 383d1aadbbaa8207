"""Checkpoints written by earlier mtj versions still restore, to the same logits."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import mtj

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_pre_nnx_checkpoints import CONFIGS, TOKENS  # noqa: E402


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_checkpoint_from_before_the_nnx_model_restores_to_the_same_logits(name, tmp_path):
    ckpt = shutil.copytree(FIXTURES / "pre_nnx" / name, tmp_path / name)  # restoring must not touch the fixture
    lm = mtj.load(ckpt)
    assert lm.config.to_dict() == CONFIGS[name].to_dict()
    expected = np.load(FIXTURES / "pre_nnx" / f"{name}_logits.npy")
    np.testing.assert_allclose(lm.logits(TOKENS), expected, rtol=1e-5, atol=1e-5)
