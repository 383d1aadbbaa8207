"""The same model on every mesh shape, really split, and one all-reduce per parallel block."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtj.config import Config
from mtj.lm import LM
from mtj.model import forward, init_params, param_shardings
from mtj.sharding import FSDP_RULES, make_mesh


def small(**kw) -> Config:
    base = dict(layers=2, d_model=64, n_heads=8, pe_rotary_dims=4, n_vocab=1000, seq=32, dtype="float32")
    return Config(**{**base, **kw})


def placed(cfg: Config, dp: int, mp: int):
    mesh = make_mesh(mp=mp, dp=dp)
    shardings = param_shardings(cfg, mesh)
    params = jax.jit(lambda k: init_params(cfg, k), out_shardings=shardings)(jax.random.key(1))
    return LM(cfg, params, mesh, None)


def test_logits_equal_on_all_meshes(rng):
    tokens = rng.randint(0, 1000, (8, 16))
    reference = placed(small(), 1, 1).logits(tokens)
    for dp, mp in [(1, 8), (2, 4), (8, 1)]:
        lm = placed(small(cores_per_replica=mp), dp, mp)
        np.testing.assert_allclose(lm.logits(tokens), reference, atol=1e-5, rtol=0, err_msg=f"dp={dp} mp={mp}")
        if mp > 1:
            split = {"wte": 0, "layers.attn.q": 2, "layers.attn.o": 1, "layers.mlp.fc_in": 2,
                     "layers.mlp.fc_out": 1, "lm_head.kernel": 1}
            for path, axis in split.items():
                leaf = lm.params
                for part in path.split("."):
                    leaf = leaf[part]
                shard = leaf.addressable_shards[0].data
                assert shard.shape[axis] == leaf.shape[axis] // mp, f"{path} is not split over mp"
                assert len({s.device for s in leaf.addressable_shards}) == dp * mp


def test_fsdp_splits_weights_over_dp_too():
    lm = placed(small(cores_per_replica=4, fsdp=True), 2, 4)
    fc_in = lm.params["layers"]["mlp"]["fc_in"]
    assert fc_in.sharding.spec == jax.sharding.PartitionSpec(None, "dp", "mp")
    assert fc_in.addressable_shards[0].data.shape == (2, 32, 64)
    assert FSDP_RULES["embed"] == "dp"


def all_reduces(cfg: Config, dp: int, mp: int) -> list[str]:
    lm = placed(cfg, dp, mp)
    with jax.set_mesh(lm.mesh):
        hlo = jax.jit(lambda p, t: forward(p, t, cfg)).lower(lm.params, jnp.zeros((2, 16), jnp.int32)).compile().as_text()
    return [line for line in hlo.splitlines() if re.search(r"= \S+ all-reduce(-start)?\(", line)]


@pytest.mark.parametrize("layers", [2, 4])
def test_one_all_reduce_per_gptj_layer(layers):
    cfg = small(layers=layers, cores_per_replica=4, scan_layers=False)
    ops = all_reduces(cfg, 1, 4)
    # One per layer plus one for the vocabulary-split embedding lookup; each
    # reduces a single [batch, seq, d_model] tensor (not a tuple of two).
    assert len(ops) == layers + 1, "\n".join(ops)
    for line in ops:
        assert "f32[2,16,64]" in line and "(f32" not in line.split("all-reduce")[0], line
