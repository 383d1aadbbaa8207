"""GPT-J (and its GPT-Neo / GPT-NeoX siblings) as pure functions of a parameter tree.

The parameters are a nested dict of arrays; every layer's weights are stacked
along a leading 'layers' axis so the blocks run under one `lax.scan` and
compile time does not grow with depth. `param_specs` is the single source of
truth for names, shapes, logical sharding axes and initialisation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtj.config import Config
from mtj.ops import einsum_f32
from mtj.sharding import constrain, row_parallel_sum

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, see mtj.sharding.RULES
    init: str  # "normal", "out" (normal scaled by depth), "zeros", "ones"


def param_specs(cfg: Config) -> Params:
    """Names, shapes and logical axes of every parameter, per model family."""
    L, D, V = cfg.layers, cfg.d_model, cfg.padded_vocab
    HD, F = cfg.n_heads * cfg.head_dim, cfg.ff_dim
    family = cfg.family

    def norm() -> dict[str, ParamSpec]:
        return {"scale": ParamSpec((L, D), ("layers", "norm"), "ones"), "bias": ParamSpec((L, D), ("layers", "norm"), "zeros")}

    attn = {
        "q": ParamSpec((L, D, HD), ("layers", "embed", "heads"), "normal"),
        "k": ParamSpec((L, D, HD), ("layers", "embed", "heads"), "normal"),
        "v": ParamSpec((L, D, HD), ("layers", "embed", "heads"), "normal"),
        "o": ParamSpec((L, HD, D), ("layers", "heads", "embed"), "out"),
    }
    if family.qkv_bias:
        for name in "qkv":
            attn[f"{name}_bias"] = ParamSpec((L, HD), ("layers", "heads"), "zeros")
    if family.o_bias:
        attn["o_bias"] = ParamSpec((L, D), ("layers", "norm"), "zeros")
    layer = {
        "ln_1": norm(),
        "attn": attn,
        "mlp": {
            "fc_in": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "fc_in_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros"),
            "fc_out": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "out"),
            "fc_out_bias": ParamSpec((L, D), ("layers", "norm"), "zeros"),
        },
    }
    if family.second_norm:
        layer["ln_2"] = norm()
    specs: Params = {
        "wte": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layer,
        "ln_f": {"scale": ParamSpec((D,), ("norm",), "ones"), "bias": ParamSpec((D,), ("norm",), "zeros")},
    }
    if family.rotary is None:  # learned positions
        specs["wpe"] = ParamSpec((cfg.seq, D), (None, "embed"), "normal")
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((D, V), ("embed", "vocab"), "normal")}
        if family.head_bias:
            specs["lm_head"]["bias"] = ParamSpec((V,), ("vocab",), "zeros")
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple)


def param_axes(cfg: Config) -> Params:
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg: Config, key: jax.Array) -> Params:
    """Random parameters (std 0.02, output projections scaled by 1/sqrt(2*layers))."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def make(s: ParamSpec, k: jax.Array) -> jax.Array:
        if s.init == "zeros":
            return jnp.zeros(s.shape, dtype)
        if s.init == "ones":
            return jnp.ones(s.shape, dtype)
        std = 0.02 / math.sqrt(2 * cfg.layers) if s.init == "out" else 0.02
        return (std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def count_params(cfg: Config) -> int:
    """Parameter count of an abstract init (nothing allocated), with the real
    (unpadded) vocabulary, as transformers counts it."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    total = 0
    for leaf, axes in zip(jax.tree.leaves(shapes), jax.tree.leaves(param_axes(cfg), is_leaf=_is_axes)):
        total += math.prod(cfg.n_vocab if a == "vocab" else n for n, a in zip(leaf.shape, axes))
    return total


# --- layers -------------------------------------------------------------------

def scale_shift(x: jax.Array, scale: jax.Array | None, shift: jax.Array) -> jax.Array:
    """x * scale + shift in fp32 over the last axis (scale None: no scaling)."""
    y = x.astype(jnp.float32)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y + shift.astype(jnp.float32)


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return scale_shift((xf - mean) * jax.lax.rsqrt(var + eps), p["scale"], p["bias"]).astype(x.dtype)


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    # fp32 accumulation (bf16 in, fp32 out is also the fastest CPU matmul).
    y = einsum_f32("...i,io->...o", x, w.astype(x.dtype))
    if b is not None:
        y = scale_shift(y, None, b)
    return y.astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, dims: int, base: float, interleaved: bool) -> jax.Array:
    """Rotary position embedding on the first `dims` features of each head.

    GPT-J rotates interleaved pairs (x0,x1),(x2,x3)...; GPT-NeoX rotates the
    two halves (x[:d/2], x[d/2:]).
    """
    rot, rest = x[..., :dims].astype(jnp.float32), x[..., dims:]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dims, 2, dtype=jnp.float32) / dims))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dims/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = jnp.split(rot, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


KV = tuple[jax.Array, jax.Array]  # one layer's key/value cache, each [B, H, S, Dh]


def attention(h: jax.Array, p: Params, positions: jax.Array, mask: jax.Array, cfg: Config,
              kv: KV | None = None, index: jax.Array | int = 0) -> tuple[tuple[jax.Array, jax.Array], KV | None]:
    """((attention output, output projection), updated cache). With a cache the new
    keys/values are written at slot `index` and the queries attend to all S slots."""
    B, T, _ = h.shape
    H, Dh = cfg.n_heads, cfg.head_dim

    def project(name: str) -> jax.Array:
        y = dense(h, p[name], p.get(f"{name}_bias")).reshape(B, T, H, Dh)
        return constrain(y, "batch", "seq", "heads", "head_dim")

    if "qkv" in p:  # fused by unstack_layers: one matmul instead of three
        y = dense(h, p["qkv"], p.get("qkv_bias")).reshape(B, T, 3, H, Dh)
        q, k, v = y[:, :, 0], y[:, :, 1], y[:, :, 2]
    else:
        q, k, v = project("q"), project("k"), project("v")
    if cfg.family.rotary:
        interleaved = cfg.family.rotary == "interleaved"
        q = rotary(q, positions, cfg.rotary_dims, cfg.rotary_base, interleaved)
        k = rotary(k, positions, cfg.rotary_dims, cfg.rotary_base, interleaved)
    if kv is not None and jnp.ndim(index) == 1:  # one slot per row (T == 1): rows of a decode engine
        rows = jnp.arange(B)
        kv = (kv[0].at[rows, :, index].set(k[:, 0].astype(kv[0].dtype)),
              kv[1].at[rows, :, index].set(v[:, 0].astype(kv[1].dtype)))
        span = mask.shape[-1]  # the rows attend to the cache's first `span` slots only
        k, v = kv[0][:, :, :span].astype(q.dtype), kv[1][:, :, :span].astype(q.dtype)  # (the cache may be wider)
    elif kv is not None:  # the cache is heads-major, [B, H, S, Dh], so attention reads it without a transpose
        k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.transpose(0, 2, 1, 3).astype(kv[0].dtype), index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.transpose(0, 2, 1, 3).astype(kv[1].dtype), index, axis=2)
        kv = (k, v)
    else:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    if cfg.family.scale_scores:
        scores = scores / jnp.sqrt(jnp.float32(Dh))
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # an add: no select in the backward
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # softmax in fp32
    out = jnp.einsum("bhts,bhsd->bthd", probs, v.astype(probs.dtype)).reshape(B, T, H * Dh)
    return (out, p["o"]), kv  # the output projection is applied by the block


def mlp(h: jax.Array, p: Params, cfg: Config) -> tuple[jax.Array, jax.Array]:
    y = ACTIVATIONS[cfg.activation](dense(h, p["fc_in"], p["fc_in_bias"]))
    y = constrain(y, "batch", "seq", "mlp")
    return y, p["fc_out"]  # the output projection is applied by the block


def block(x: jax.Array, p: Params, positions: jax.Array, mask: jax.Array, cfg: Config,
          kv: KV | None = None, index: jax.Array | int = 0) -> tuple[jax.Array, KV | None]:
    eps = cfg.layer_norm_eps
    attn_bias = p["attn"].get("o_bias", jnp.zeros(x.shape[-1:], jnp.float32))
    mlp_bias = p["mlp"]["fc_out_bias"]
    h = layer_norm(x, p["ln_1"], eps)
    if cfg.family.is_parallel(cfg):
        # Both branches' output projections are reduced over mp together:
        # one all-reduce per layer, not two.
        h2 = layer_norm(x, p["ln_2"], eps) if cfg.family.second_norm else h
        attn, kv = attention(h, p["attn"], positions, mask, cfg, kv, index)
        y = row_parallel_sum([attn, mlp(h2, p["mlp"], cfg)])
        x = x + scale_shift(y, None, attn_bias + mlp_bias).astype(x.dtype)
    else:  # sequential residual (GPT-Neo, NeoX with parallel_residual=false)
        attn, kv = attention(h, p["attn"], positions, mask, cfg, kv, index)
        x = x + scale_shift(row_parallel_sum([attn]), None, attn_bias).astype(x.dtype)
        y = row_parallel_sum([mlp(layer_norm(x, p["ln_2"], eps), p["mlp"], cfg)])
        x = x + scale_shift(y, None, mlp_bias).astype(x.dtype)
    return constrain(x, "batch", "seq", "embed"), kv


def local_layers(cfg: Config) -> np.ndarray:
    """Per layer: True where attention is local (GPT-Neo's sliding window)."""
    return np.array(cfg.family.layer_is_local(cfg), bool)


def run_layers(params: Params, tokens: jax.Array, cfg: Config, positions: jax.Array | None = None,
               key_valid: jax.Array | None = None, cache: KV | None = None,
               index: jax.Array | int = 0) -> tuple[jax.Array, KV | None]:
    """Final hidden states [B, T, d_model] (after ln_f) and the updated cache.

    Query i sits in slot index+i of S key slots (`index` [B]: a slot per row, for T = 1) (S = T without a cache; with a
    cache, S is its length: stacked (k, v) of [layers, B, H, S, Dh], or a list
    of per-layer (k, v) of [B, H, S, Dh]; with a slot per row, key_valid may cover a prefix of it). params["layers"] may also be a list
    of per-layer trees (see `unstack_layers`).
    `positions` default to 0..T-1; `key_valid` [B, S] marks slots holding real
    (not left-padding) tokens.
    """
    B, T = tokens.shape
    S = T if cache is None else cache[0][0].shape[-2]
    if key_valid is not None:  # a decode engine's rows may attend to a prefix of the cache
        S = key_valid.shape[-1]
    dtype = jnp.dtype(cfg.dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    if jnp.ndim(index) == 1:  # a slot per row: [B, T, S]
        distance = jnp.asarray(index)[:, None, None] + jnp.arange(T)[:, None] - jnp.arange(S)
        causal = distance >= 0
    else:  # [1, T, S]
        distance = index + jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
        causal = (distance >= 0)[None]
    if key_valid is not None:
        causal = causal & key_valid[:, None, :]
    window = distance < cfg.window_size

    # Gather, then cast: casting the whole table would cost a pass over it each step, and
    # its gradient would be scattered in the compute dtype.
    x = params["wte"][tokens].astype(dtype)
    if "wpe" in params:
        x = x + params["wpe"][positions].astype(dtype)
    x = constrain(x, "batch", "seq", "embed")

    def step(x: jax.Array, layer: tuple) -> tuple[jax.Array, KV | None]:
        p, is_local, kv = layer
        mask = jnp.where(is_local, causal & window, causal)
        return block(x, p, positions, mask, cfg, kv, index)

    if cfg.remat:
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
    local = jnp.asarray(local_layers(cfg))
    if isinstance(cache, list) or not cfg.scan_layers:
        # Unrolled: a list cache holds one (k, v) per layer, updated in place by
        # decoding (slicing a stacked cache would copy it every step).
        layers = params["layers"]
        kvs = []
        for i in range(cfg.layers):
            kv = cache[i] if isinstance(cache, list) else (None if cache is None else jax.tree.map(lambda a: a[i], cache))
            p = layers[i] if isinstance(layers, list) else jax.tree.map(lambda a: a[i], layers)
            x, kv = step(x, (p, local[i], kv))
            kvs.append(kv)
        if cache is not None and not isinstance(cache, list):
            kvs = jax.tree.map(lambda *a: jnp.stack(a), *kvs)
        cache = kvs if cache is not None else None
    else:
        x, cache = jax.lax.scan(step, x, (params["layers"], local, cache))
    return layer_norm(x, params["ln_f"], cfg.layer_norm_eps), cache


def unstack_layers(params: Params, cfg: Config) -> Params:
    """params with "layers" as a list of per-layer trees, for a decode loop.

    XLA:CPU copies a slice of a stacked weight at every use, so the loop should
    slice once, before it. Without model parallelism the q, k and v kernels are
    also joined into one "qkv" kernel (one small matmul instead of three)."""
    mesh = jax.sharding.get_abstract_mesh()
    fuse = mesh.empty or mesh.shape.get("mp", 1) == 1
    layers = []
    for i in range(cfg.layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        if fuse:
            attn = dict(layer["attn"])
            attn["qkv"] = jnp.concatenate([attn.pop(n) for n in ("q", "k", "v")], axis=-1)
            if "q_bias" in attn:
                attn["qkv_bias"] = jnp.concatenate([attn.pop(f"{n}_bias") for n in ("q", "k", "v")], axis=-1)
            layer = {**layer, "attn": attn}
        layers.append(layer)
    return {**params, "layers": layers}


def hidden(params: Params, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Final hidden states [B, T, d_model] of unpadded sequences (training)."""
    return run_layers(params, tokens, cfg)[0]


def logits_of(params: Params, x: jax.Array, cfg: Config) -> jax.Array:
    """fp32 logits [..., padded_vocab] of hidden states; padded vocabulary columns are -1e30."""
    kernel, bias = output_head(params, cfg)
    logits = jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    return scale_shift(logits, None, bias)


def output_head(params: Params, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """The LM head as (kernel [d_model, V], bias [V]); the bias pushes padded vocabulary columns to -1e30."""
    kernel = params["lm_head"]["kernel"] if "lm_head" in params else params["wte"].T  # tied embeddings
    bias = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.n_vocab, 0.0, -1e30)
    if "lm_head" in params and "bias" in params["lm_head"]:
        bias = params["lm_head"]["bias"].astype(jnp.float32) + bias
    return kernel, bias


def forward(params: Params, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Logits [B, T, padded_vocab] in fp32; padded vocabulary columns are -1e30."""
    return constrain(logits_of(params, hidden(params, tokens, cfg), cfg), "batch", "seq", "vocab")
