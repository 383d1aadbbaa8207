"""The fused attention kernels (cuDNN through jax.nn, Pallas splash in interpret mode) against the einsum path,
and the remat policies: same losses and gradients for every family, sharded and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtj.attention import cudnn_takes, implementation
from mtj.config import Config, ConfigError
from mtj.model import forward, init_params, param_shardings
from mtj.sharding import make_mesh
from mtj.train import loss_fn

FAMILIES = {  # windows shorter than the sequence; scaled and unscaled scores; both rotary styles
    "gptj": dict(model_type="gptj", pe_rotary_dims=4),
    "gpt_neo": dict(model_type="gpt_neo", window_size=37, attention_layers=["global", "local", "local"], layers=3),
    "gpt_neox": dict(model_type="gpt_neox", pe_rotary_dims=4, parallel_residual=False),
}


def small(family: str, **kw) -> Config:
    base = dict(layers=2, d_model=32, n_heads=4, n_vocab=96, seq=128, dtype="float32", remat=False)
    return Config(**{**base, **FAMILIES[family], **kw})


def loss_and_grads(cfg: Config, params, batch):
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, cfg)[0]))(params)


def close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
def test_a_fused_kernel_gives_the_einsum_paths_loss_and_gradients(family, kernel):
    cfg = small(family, attention="xla")
    params = init_params(cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, cfg.seq + 1), 0, cfg.n_vocab)
    expected = loss_and_grads(cfg, params, batch)
    close(loss_and_grads(cfg.replace(attention=kernel), params, batch), expected, 2e-5)
    # bf16 compute: within bf16's rounding of the same
    bf16 = cfg.replace(dtype="bfloat16")
    tokens = batch[:, :-1]
    np.testing.assert_allclose(forward(params, tokens, bf16.replace(attention=kernel)), forward(params, tokens, bf16),
                               atol=0.05, rtol=0)


def test_splash_sharded_over_dp_and_mp_equals_one_device():
    cfg = small("gpt_neo", attention="splash", n_heads=8, cores_per_replica=4)
    batch = jax.random.randint(jax.random.key(1), (4, cfg.seq + 1), 0, cfg.n_vocab)
    params = init_params(cfg, jax.random.key(0))
    expected = loss_and_grads(cfg.replace(attention="xla"), params, batch)
    mesh = make_mesh(mp=4, dp=2)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, param_shardings(cfg, mesh))
        close(loss_and_grads(cfg, placed, batch), expected, 2e-5)


def test_auto_is_the_einsum_path_on_cpu_and_the_choice_is_checked():
    cfg = small("gptj")
    assert cfg.attention == "auto" and implementation(cfg, 128) == "xla"
    assert implementation(cfg.replace(attention="splash"), 96) == "xla"  # no 128-multiple tile divides 96
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(64).reshape(2, 32)
    np.testing.assert_array_equal(forward(params, tokens, cfg), forward(params, tokens, cfg.replace(attention="xla")))
    with pytest.raises(ConfigError, match="'attention' must be one of"):
        small("gptj", attention="flash")
    with pytest.raises(ConfigError, match="'remat_policy' must be one of"):
        small("gptj", remat_policy="most")


@pytest.mark.parametrize("head_dim", [64, 100, 128, 136, 256])
def test_auto_picks_cudnn_only_for_shapes_that_jax_lets_through(head_dim):
    # JAX's own check before it calls cuDNN; without a CUDA device it applies its pre-Hopper limits, which is
    # how an A100 sees GPT-J-6B's head dim of 256 (our Hopper limit is the same check's other branch).
    from jax._src.cudnn.fused_attention_stablehlo import AttentionLayout, check_is_flash_attention

    q = jax.ShapeDtypeStruct((2, 256, 4, head_dim), jnp.bfloat16)
    try:
        check_is_flash_attention(q, q, q, AttentionLayout.BTNH.value, 91000, has_bias=False, is_training=True)
        jax_takes = True
    except NotImplementedError:
        jax_takes = False
    assert cudnn_takes(head_dim, "bfloat16", "8.0") == jax_takes
    assert cudnn_takes(head_dim, "bfloat16", "9.0") == (head_dim % 8 == 0)  # Hopper and later: up to 256
    assert not cudnn_takes(head_dim, "float32", "9.0") and not cudnn_takes(head_dim, "bfloat16", None)


@pytest.mark.parametrize("policy", ["full", "minimal", "save_qkv_proj", "none"])
def test_every_remat_policy_gives_the_same_gradients(policy):
    cfg = small("gptj", attention="xla")
    params = init_params(cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, cfg.seq + 1), 0, cfg.n_vocab)
    close(loss_and_grads(cfg.replace(remat=True, remat_policy=policy), params, batch),
          loss_and_grads(cfg, params, batch), 1e-6)
