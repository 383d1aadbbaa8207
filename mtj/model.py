"""GPT-J (and its GPT-Neo / GPT-NeoX siblings) as Flax NNX modules.

Each module declares its parameters beside the `__call__` that uses them, with
logical axis names as their `out_sharding` metadata; `mtj.sharding.RULES` maps
those names onto the mesh (`param_shardings`). The blocks' weights are stacked
along a leading 'layers' axis (`nnx.vmap` at creation) and run under one
`lax.scan`, so compile time does not grow with depth.

The jitted steps hold the parameters as a plain nested dict (the NNX state as
a pure dict, which is also the checkpoint layout) and rebuild the modules
inside the traced function with `nnx.merge` (`bind`): no Python object work per
step. `forward`, `run_layers`, `logits_of` and friends are those entry points.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from mtj import cpu_matmul, lora, quantize
from mtj.attention import Segments, fused, implementation
from mtj.config import Config
from mtj.ops import matmul_f32
from mtj.sharding import constrain, rules, row_parallel_sum

Params = dict[str, Any]
KV = tuple[jax.Array, jax.Array]  # one layer's key/value cache, each [B, H, S, Dh]


# --- parameters -----------------------------------------------------------------

def _param(rngs: nnx.Rngs, cfg: Config, shape: tuple[int, ...], axes: tuple[str | None, ...], init: str) -> nnx.Param:
    """A parameter initialised as `init` ("normal": std 0.02; "out": the residual branch's output projections,
    scaled by 1/sqrt(2*layers); "zeros"; "ones"; "lora_a", "lora_b": an adapter's, fp32, see `mtj.lora`),
    annotated with its logical axes (placed by `param_shardings`, not when created)."""
    dtype = jnp.dtype(jnp.float32 if init.startswith("lora") else cfg.param_dtype)
    if init in ("zeros", "ones", "lora_b"):
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    elif init == "lora_a":  # PEFT's draw (kaiming-uniform, a=sqrt(5)): uniform in +-1/sqrt(fan_in)
        value = jax.random.uniform(rngs.params(), shape, dtype, -1.0, 1.0) / math.sqrt(shape[0])
    else:
        std = 0.02 / math.sqrt(2 * cfg.layers) if init == "out" else 0.02
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def scale_shift(x: jax.Array, scale: jax.Array | None, shift: jax.Array) -> jax.Array:
    """x * scale + shift in fp32 over the last axis (scale None: no scaling)."""
    y = x.astype(jnp.float32)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y + shift.astype(jnp.float32)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None, adapter: jax.Array | None = None) -> jax.Array:
    # fp32 accumulation (bf16 in, fp32 out is also the fastest CPU matmul).
    y = matmul_f32(x, w)
    if adapter is not None:
        y = y + adapter
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


def _add_adapters(module: nnx.Module, cfg: Config, rngs: nnx.Rngs, kernel: str, rows: tuple[int, str],
                  cols: tuple[int, str]) -> None:
    """`kernel`'s LoRA adapters (`mtj.lora`) on `module` when the config targets it: A [rows, rank], B [rank, cols]."""
    if kernel in lora.adapted_kernels(cfg):
        r = cfg.lora_rank
        setattr(module, f"{kernel}_lora_a", _param(rngs, cfg, (rows[0], r), (rows[1], "lora"), "lora_a"))
        setattr(module, f"{kernel}_lora_b", _param(rngs, cfg, (r, cols[0]), ("lora", cols[1]), "lora_b"))


def _adapter(module: nnx.Module, cfg: Config, kernel: str, x: jax.Array, layer: jax.Array | int | None
             ) -> jax.Array | None:
    """`kernel`'s adapter term for input x (fp32), None where it has none."""
    a = getattr(module, f"{kernel}_lora_a", None)
    return None if a is None else lora.delta(x, a[...], getattr(module, f"{kernel}_lora_b")[...], cfg, kernel, layer)


REMAT_POLICIES = {  # mtj.config.REMAT_POLICIES
    "full": jax.checkpoint_policies.nothing_saveable,
    # (by name: the projections run in einsum_f32, whose custom VJP hides its dots from dot-based policies)
    "minimal": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj", "mlp_in", "out_proj"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
}

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# --- modules --------------------------------------------------------------------

class LayerNorm(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.eps = cfg.layer_norm_eps
        self.scale = _param(rngs, cfg, (cfg.d_model,), ("norm",), "ones")
        self.bias = _param(rngs, cfg, (cfg.d_model,), ("norm",), "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return scale_shift((xf - mean) * jax.lax.rsqrt(var + self.eps), self.scale[...], self.bias[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with the family's rotary style and score scaling. `fused_qkv` holds q, k and v
    as one [d_model, 3 * heads * head_dim] kernel (decoding without model parallelism: one small matmul, not
    three)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, fused_qkv: bool = False):
        self.cfg = cfg
        D, HD = cfg.d_model, cfg.n_heads * cfg.head_dim
        names = ("qkv",) if fused_qkv else ("q", "k", "v")
        width = 3 * HD if fused_qkv else HD
        for name in names:
            setattr(self, name, _param(rngs, cfg, (D, width), ("embed", "heads"), "normal"))
            if cfg.family.qkv_bias:
                setattr(self, f"{name}_bias", _param(rngs, cfg, (width,), ("heads",), "zeros"))
            if not fused_qkv:
                _add_adapters(self, cfg, rngs, name, (D, "embed"), (HD, "heads"))
        self.o = _param(rngs, cfg, (HD, D), ("heads", "embed"), "out")
        _add_adapters(self, cfg, rngs, "o", (HD, "heads"), (D, "embed"))
        if cfg.family.o_bias:
            self.o_bias = _param(rngs, cfg, (D,), ("norm",), "zeros")

    def _bias(self, name: str) -> jax.Array | None:
        bias = getattr(self, f"{name}_bias", None)
        return None if bias is None else bias[...]

    def __call__(self, h: jax.Array, positions: jax.Array, mask: jax.Array | Segments | None, kv: KV | None = None,
                 index: jax.Array | int = 0, is_local: jax.Array | bool = False, layer: jax.Array | int | None = None
                 ) -> tuple[tuple[jax.Array, jax.Array], KV | None]:
        """((attention output, output projection), updated cache): the block applies the projection, so that
        a parallel block reduces both branches over mp at once. With a cache the new keys/values are written
        at slot `index` and the queries attend to its first mask.shape[-1] slots; `layer`: the cache is every
        layer's, stacked, and this is layer `layer` (written in place: no copy of the layer's cache per step).
        Without a mask (a full causal sequence, or packed documents' Segments) a fused kernel attends
        (`mtj.attention`), windowed where `is_local`."""
        cfg = self.cfg
        B, T, _ = h.shape
        H, Dh = cfg.n_heads, cfg.head_dim
        if hasattr(self, "qkv"):
            y = dense(h, self.qkv[...], self._bias("qkv")).reshape(B, T, 3, H, Dh)
            q, k, v = y[:, :, 0], y[:, :, 1], y[:, :, 2]
        else:
            q, k, v = (constrain(checkpoint_name(dense(h, getattr(self, n)[...], self._bias(n),
                                                       _adapter(self, cfg, n, h, layer)), f"{n}_proj")
                                 .reshape(B, T, H, Dh), "batch", "seq", "heads", "head_dim") for n in "qkv")
        if cfg.family.rotary:
            interleaved = cfg.family.rotary == "interleaved"
            q = rotary(q, positions, cfg.rotary_dims, cfg.rotary_base, interleaved)
            k = rotary(k, positions, cfg.rotary_dims, cfg.rotary_base, interleaved)
        if mask is None or isinstance(mask, Segments):
            kernel, scale = implementation(cfg, T), 1 / math.sqrt(Dh) if cfg.family.scale_scores else 1.0
            attend = lambda window: fused(q, k, v, kernel, scale, window, mask).reshape(B, T, H * Dh)  # noqa: E731
            out = (jax.lax.cond(is_local, lambda: attend(cfg.window_size), lambda: attend(None))
                   if cfg.family.local_attention else attend(None))
            return (out, self.o[...]), None
        if kv is not None:  # the cache is heads-major, [B, H, S, Dh], so attention reads it without a transpose
            kv = (_cache_write(kv[0], k, index, layer), _cache_write(kv[1], v, index, layer))
            span = mask.shape[-1]  # the rows may attend to a prefix of the cache
            k, v = ((c if layer is None else c[layer])[:, :, :span].astype(q.dtype) for c in kv)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
        if cfg.family.scale_scores:
            scores = scores / jnp.sqrt(jnp.float32(Dh))
        scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # an add: no select in the backward
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # softmax in fp32
        out = jnp.einsum("bhts,bhsd->bthd", probs, v.astype(probs.dtype)).reshape(B, T, H * Dh)
        return (out, self.o[...]), kv


def _cache_write(cache: jax.Array, new: jax.Array, index: jax.Array | int, layer: jax.Array | int | None) -> jax.Array:
    """`cache` [(layers,) B, H, S, Dh] with `new` [B, T, H, Dh] written from slot `index` (a scalar, or one slot
    per row [B]: slots past S are dropped), in layer `layer` of a stacked cache."""
    new, lead = new.astype(cache.dtype), () if layer is None else (layer,)
    if jnp.ndim(index) == 1 and new.shape[1] == 1:
        return cache.at[(*lead, jnp.arange(new.shape[0]), slice(None), index)].set(new[:, 0])
    if jnp.ndim(index) == 1:  # (a speculative step: each row's token and drafts)
        slots = index[:, None] + jnp.arange(new.shape[1])
        return cache.at[(*lead, jnp.arange(new.shape[0])[:, None], slice(None), slots)].set(new, mode="drop")
    new = new.transpose(0, 2, 1, 3)
    return jax.lax.dynamic_update_slice(cache, new.reshape((1,) * len(lead) + new.shape), (*lead, 0, 0, index, 0))


class MLP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.activation = cfg.activation
        D, F = cfg.d_model, cfg.ff_dim
        self.cfg = cfg
        self.fc_in = _param(rngs, cfg, (D, F), ("embed", "mlp"), "normal")
        self.fc_in_bias = _param(rngs, cfg, (F,), ("mlp",), "zeros")
        self.fc_out = _param(rngs, cfg, (F, D), ("mlp", "embed"), "out")
        self.fc_out_bias = _param(rngs, cfg, (D,), ("norm",), "zeros")
        _add_adapters(self, cfg, rngs, "fc_in", (D, "embed"), (F, "mlp"))
        _add_adapters(self, cfg, rngs, "fc_out", (F, "mlp"), (D, "embed"))

    def __call__(self, h: jax.Array, layer: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
        """(hidden activations, output projection): the block applies the projection (see Attention)."""
        y = dense(h, self.fc_in[...], self.fc_in_bias[...], _adapter(self, self.cfg, "fc_in", h, layer))
        y = ACTIVATIONS[self.activation](checkpoint_name(y, "mlp_in"))
        return constrain(y, "batch", "seq", "mlp"), self.fc_out[...]


class Block(nnx.Module):
    """One transformer layer: parallel (GPT-J, NeoX by default) or sequential (GPT-Neo) residual."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, fused_qkv: bool = False):
        self.parallel = cfg.family.is_parallel(cfg)
        self.ln_1 = LayerNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs, fused_qkv)
        self.mlp = MLP(cfg, rngs)
        if cfg.family.second_norm:
            self.ln_2 = LayerNorm(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | Segments | None, kv: KV | None = None,
                 index: jax.Array | int = 0, is_local: jax.Array | bool = False,
                 layer: jax.Array | int | None = None) -> tuple[jax.Array, KV | None]:
        attn_bias = self.attn.o_bias[...] if hasattr(self.attn, "o_bias") else jnp.zeros(x.shape[-1:], jnp.float32)
        mlp_bias = self.mlp.fc_out_bias[...]
        h = self.ln_1(x)
        if self.parallel:
            # Both branches' output projections are reduced over mp together: one all-reduce per layer, not two.
            h2 = self.ln_2(x) if hasattr(self, "ln_2") else h
            attn, kv = self.attn(h, positions, mask, kv, index, is_local, layer)
            y = checkpoint_name(self._project(attn, self.mlp(h2, layer), layer=layer), "out_proj")
            x = x + scale_shift(y, None, attn_bias + mlp_bias).astype(x.dtype)
        else:
            attn, kv = self.attn(h, positions, mask, kv, index, is_local, layer)
            y = checkpoint_name(self._project(attn, layer=layer), "out_proj")
            x = x + scale_shift(y, None, attn_bias).astype(x.dtype)
            y = checkpoint_name(self._project(mlp=self.mlp(self.ln_2(x), layer), layer=layer), "out_proj")
            x = x + scale_shift(y, None, mlp_bias).astype(x.dtype)
        return constrain(x, "batch", "seq", "embed"), kv

    def _project(self, attn: tuple | None = None, mlp: tuple | None = None,
                 layer: jax.Array | int | None = None) -> jax.Array:
        """The branches' output projections ((input, kernel) pairs) summed in fp32 (`row_parallel_sum`), with
        the adapters of those kernels that have them."""
        branches = [(pair, module, kernel) for pair, module, kernel in ((attn, self.attn, "o"), (mlp, self.mlp, "fc_out"))
                    if pair is not None]
        y = row_parallel_sum([pair for pair, _, _ in branches])
        for (x, _), module, kernel in branches:
            extra = _adapter(module, module.cfg, kernel, x, layer)
            y = y if extra is None else y + extra
        return y


class Head(nnx.Module):
    """The untied LM head (GPT-NeoX's and GPT-J's; GPT-J's carries a bias)."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.kernel = _param(rngs, cfg, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), "normal")
        if cfg.family.head_bias:
            self.bias = _param(rngs, cfg, (cfg.padded_vocab,), ("vocab",), "zeros")


class Transformer(nnx.Module):
    """The language model. `stacked`: the layers' weights share one leading 'layers' axis (training, storage);
    otherwise `layers` is a list of blocks (a decode loop, see `unstack_layers`). `tied` (default: the
    config's) reads the head from the embedding table; a decode loop may give a tied model its own head."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, stacked: bool = True, fused_qkv: bool = False,
                 tied: bool | None = None):
        self.cfg = cfg
        D = cfg.d_model
        self.wte = _param(rngs, cfg, (cfg.padded_vocab, D), ("vocab", "embed"), "normal")
        if cfg.family.rotary is None:  # learned positions
            self.wpe = _param(rngs, cfg, (cfg.seq, D), (None, "embed"), "normal")
        if stacked:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs, fused_qkv)
            self.layers = make_blocks(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs, fused_qkv) for _ in range(cfg.layers)])
        self.ln_f = LayerNorm(cfg, rngs)
        if not (cfg.tie_embeddings if tied is None else tied):
            self.lm_head = Head(cfg, rngs)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, key_valid: jax.Array | None = None,
               cache: KV | list[KV] | None = None, index: jax.Array | int = 0,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """Final hidden states [B, T, d_model] (after ln_f) and the updated cache.

        Query i sits in slot index+i of S key slots (`index` [B]: a slot per row, for T = 1). S = T without a
        cache; with one, S is its length: stacked (k, v) of [layers, B, H, S, Dh], or a list of per-layer (k, v)
        of [B, H, S, Dh]; with a slot per row, key_valid may cover a prefix of it. `positions` default to 0..T-1;
        `key_valid` [B, S] marks slots holding real (not left-padding) tokens. `segment_ids` [B, T] (training on
        packed documents, no cache): each token's document; tokens attend within it, and positions restart at
        each document's first token.
        """
        cfg = self.cfg
        B, T = tokens.shape
        S = T if cache is None else cache[0][0].shape[-2]
        if key_valid is not None:  # a decode engine's rows may attend to a prefix of the cache
            S = key_valid.shape[-1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if segment_ids is None else document_positions(segment_ids)
        causal, window = self._masks(T, S, index, key_valid)
        if segment_ids is not None:
            causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
        x = self._embed(tokens, positions)
        # A full causal sequence may go to a fused kernel, which builds its own mask (from segment ids if packed).
        plain = cache is None and key_valid is None and isinstance(index, int) and index == 0
        use_mask = not plain or implementation(cfg, T) == "xla"
        segments = Segments(segment_ids) if segment_ids is not None else None

        def block(x: jax.Array, layer: tuple, graph: Any) -> tuple[jax.Array, KV | None]:
            """One layer; `kv`: its own cache, or (with index `i`) the stacked cache it writes its layer of."""
            state, is_local, kv, i = layer
            mask = jnp.where(is_local, causal & window, causal) if use_mask else segments
            return nnx.merge(graph, state)(x, positions, mask, kv, index, is_local, i)

        x, cache = self._run_blocks(x, block, cache)
        return self.ln_f(x), cache

    def _masks(self, T: int, S: int, index: jax.Array | int, key_valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(causal [B or 1, T, S] with key_valid applied, local window [.., T, S]) for queries in slots index+i."""
        if jnp.ndim(index) == 1:  # a slot per row: [B, T, S]
            distance = jnp.asarray(index)[:, None, None] + jnp.arange(T)[:, None] - jnp.arange(S)
            causal = distance >= 0
        else:  # [1, T, S]
            distance = index + jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
            causal = (distance >= 0)[None]
        if key_valid is not None:
            causal = causal & key_valid[:, None, :]
        return causal, distance < self.cfg.window_size

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        # Gather, then cast: casting the whole table would cost a pass over it each step, and
        # its gradient would be scattered in the compute dtype.
        dtype = jnp.dtype(self.cfg.dtype)
        table = self.wte[...]
        x = (quantize.embed(table, tokens) if quantize.is_quantized(table) else table[tokens]).astype(dtype)
        if hasattr(self, "wpe"):
            x = x + self.wpe[...][positions].astype(dtype)
        return constrain(x, "batch", "seq", "embed")

    def _run_blocks(self, x: jax.Array, block: Callable, cache: KV | list[KV] | None) -> tuple[jax.Array, Any]:
        """x through every block (`block(x, (state, is_local, kv, i), graph)`, remat as configured): per-layer
        caches one by one; stacked weights scanned (compile time flat in depth) or unrolled."""
        cfg = self.cfg
        # The blocks run from their state (arrays), so that scan and remat see plain pytrees.
        if isinstance(self.layers, nnx.List):
            graph, states = nnx.split(self.layers[0])[0], [nnx.split(b)[1] for b in self.layers]
        else:
            graph, stacked = nnx.split(self.layers)
            scanned = cfg.scan_layers and not isinstance(cache, list)
            states = None if scanned else [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.layers)]
        def step(x: jax.Array, layer: tuple) -> tuple[jax.Array, Any]:
            return block(x, layer, graph)

        if cfg.remat and cfg.remat_policy != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat_policy])
        local = jnp.asarray(local_layers(cfg))
        if isinstance(cache, list):  # per-layer caches
            kvs = []
            for state, is_local, kv in zip(states, local, cache):
                x, kv = step(x, (state, is_local, kv, None))
                kvs.append(kv)
            return x, kvs
        # A stacked cache is carried whole and each layer writes its slots into it: scanning over it as
        # xs/ys would copy every layer's cache every step (measured: 4.5x slower decoding, 24 layers).
        if states is None:
            def carried(carry: tuple, layer: tuple) -> tuple[tuple, None]:
                x, cache = carry
                state, is_local, i = layer
                return step(x, (state, is_local, cache, i)), None

            (x, cache), _ = jax.lax.scan(carried, (x, cache), (stacked, local, jnp.arange(cfg.layers)))
        else:
            for i, state in enumerate(states):
                x, cache = step(x, (state, local[i], cache, i))
        return x, cache

    def head(self) -> tuple[jax.Array, jax.Array]:
        """The LM head as (kernel [d_model, V], fp32 bias [V]); see `head_weights`."""
        if hasattr(self, "lm_head"):
            bias = getattr(self.lm_head, "bias", None)
            return head_weights(self.cfg, self.lm_head.kernel[...], None if bias is None else bias[...])
        return head_weights(self.cfg, self.wte[...].T, None)  # tied embeddings

    def logits(self, x: jax.Array) -> jax.Array:
        """fp32 logits [..., padded_vocab] of hidden states; padded vocabulary columns are -1e30."""
        kernel, bias = self.head()
        if quantize.is_quantized(kernel) or cpu_matmul.is_packed(kernel):  # inference kernels
            logits = matmul_f32(x, kernel)
        else:
            logits = jnp.einsum("...d,dv->...v", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        return scale_shift(logits, None, bias)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [B, T, padded_vocab] in fp32 of unpadded sequences."""
        return constrain(self.logits(self.hidden(tokens)[0]), "batch", "seq", "vocab")


def head_weights(cfg: Config, kernel: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(kernel, fp32 bias) of the LM head, the bias pushing padded vocabulary columns to -1e30."""
    padding = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.n_vocab, 0.0, -1e30)
    return kernel, padding if bias is None else bias.astype(jnp.float32) + padding


def local_layers(cfg: Config) -> np.ndarray:
    """Per layer: True where attention is local (GPT-Neo's sliding window)."""
    return np.array(cfg.family.layer_is_local(cfg), bool)


# --- the model's state as a plain dict ----------------------------------------------

_GRAPHS: dict[tuple, tuple[nnx.GraphDef, nnx.State]] = {}


def _logical_rules(cfg: Config) -> Any:
    """Flax's logical-axis context for the rules table (`cfg.fsdp` adds dp)."""
    return nnx.logical_axis_rules(list(rules(cfg.fsdp).items()))


def abstract_model(cfg: Config, stacked: bool = True, fused_qkv: bool = False,
                   tied: bool | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """The module graph and its abstract state (shapes, dtypes and sharding annotations; nothing allocated)."""
    key = (repr(cfg), stacked, fused_qkv, tied)
    if key not in _GRAPHS:
        with _logical_rules(cfg):  # (under a mesh eval_shape places by them)
            _GRAPHS[key] = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), stacked, fused_qkv, tied)))
    return _GRAPHS[key]


class Layout(NamedTuple):
    """How a weights dict is arranged, as `Transformer` was built for it: the layers stacked on a leading axis
    (training, checkpoints) or one tree per layer ({0: ..., 1: ...}: decoding, `unstack_layers`); q, k and v
    apart or joined into "qkv" (`join_qkv`); the head tied to the embedding (no "lm_head"). `of` is the one
    place that reads it from the dict's keys."""
    stacked: bool
    fused_qkv: bool
    tied: bool

    @staticmethod
    def of(params: Params) -> Layout:
        stacked = 0 not in params["layers"]
        first = params["layers"] if stacked else params["layers"][0]
        return Layout(stacked, "qkv" in first["attn"], _tied(params))


def _tied(params: Params) -> bool:
    """(Also of a dict holding the head alone, as the CPU screen's.)"""
    return "lm_head" not in params


def bind(params: Params, cfg: Config) -> Transformer:
    """The modules holding `params` (inside a traced function: no copies), built for the dict's Layout."""
    graph, _ = abstract_model(cfg, *Layout.of(params))
    return nnx.merge(graph, params)


def init_params(cfg: Config, key: jax.Array) -> Params:
    """Random parameters (std 0.02, output projections scaled by 1/sqrt(2*layers))."""
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(key))))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, see mtj.sharding.RULES


def param_specs(cfg: Config) -> Params:
    """Shape and logical axes of every parameter, from the modules' annotations."""
    _, state = abstract_model(cfg)
    return nnx.to_pure_dict(state, lambda v: ParamSpec(v.shape, tuple(v.get_metadata("out_sharding"))))


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: Config) -> Params:
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: Config, mesh: Mesh) -> Params:
    """Every parameter's NamedSharding on `mesh`: its annotation through the rules table (`cfg.fsdp` adds dp)."""
    _, state = abstract_model(cfg)
    with _logical_rules(cfg):
        return nnx.to_pure_dict(nnx.get_named_sharding(state, mesh))


def count_params(cfg: Config) -> int:
    """Parameter count with the real (unpadded) vocabulary, as transformers counts it (nothing allocated)."""
    specs = jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)
    return sum(math.prod(cfg.n_vocab if a == "vocab" else n for n, a in zip(s.shape, s.axes)) for s in specs)


def unstack_layers(params: Params, cfg: Config) -> Params:
    """params with "layers" as per-layer trees ({0: ..., 1: ...}), for a decode loop.

    XLA:CPU copies a slice of a stacked weight at every use, so the loop should
    slice once, before it. Without model parallelism the q, k and v kernels are
    also joined (`join_qkv`). Per-layer params come back as they are."""
    if not Layout.of(params).stacked:
        return params
    layers = {i: jax.tree.map(lambda a: a[i], params["layers"]) for i in range(cfg.layers)}
    if joins_qkv():
        layers = {i: {**layer, "attn": join_qkv(layer["attn"])} for i, layer in layers.items()}
    return {**params, "layers": layers}


def joins_qkv() -> bool:
    """Whether decoding on the current mesh joins q, k and v: only without model parallelism, where the
    joined kernel is not split over heads."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.shape.get("mp", 1) == 1


def join_qkv(attn: Params) -> Params:
    """A layer's attention weights with the q, k and v kernels (and biases) as one "qkv" kernel: one small
    matmul instead of three."""
    attn = dict(attn)
    # (quantized kernels too: their integers and per-output-channel scales join along the outputs alike)
    attn["qkv"] = jax.tree.map(lambda *a: jnp.concatenate(a, axis=-1), *[attn.pop(n) for n in ("q", "k", "v")])
    if "q_bias" in attn:
        attn["qkv_bias"] = jnp.concatenate([attn.pop(f"{n}_bias") for n in ("q", "k", "v")], axis=-1)
    return attn


def run_layers(params: Params, tokens: jax.Array, cfg: Config, positions: jax.Array | None = None,
               key_valid: jax.Array | None = None, cache: Any = None, index: jax.Array | int = 0,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """`Transformer.hidden` of `params`."""
    return bind(params, cfg).hidden(tokens, positions, key_valid, cache, index, segment_ids)


def hidden(params: Params, tokens: jax.Array, cfg: Config, segment_ids: jax.Array | None = None) -> jax.Array:
    """Final hidden states [B, T, d_model] of unpadded sequences (training), of packed documents with
    `segment_ids`."""
    return run_layers(params, tokens, cfg, segment_ids=segment_ids)[0]


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Each token's position in its document [B, T]: 0 at every token whose segment id differs from the one
    before it."""
    T = segment_ids.shape[-1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jnp.arange(T) - jax.lax.cummax(jnp.where(starts, jnp.arange(T), 0), axis=1)


def output_head(params: Params, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """`Transformer.head` of `params` (which may hold the head alone)."""
    if not _tied(params):
        return head_weights(cfg, params["lm_head"]["kernel"], params["lm_head"].get("bias"))
    return head_weights(cfg, params["wte"].T, None)


def logits_of(params: Params, x: jax.Array, cfg: Config) -> jax.Array:
    """`Transformer.logits` of `params`."""
    return bind(params, cfg).logits(x)


def forward(params: Params, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Logits [B, T, padded_vocab] in fp32; padded vocabulary columns are -1e30."""
    return bind(params, cfg)(tokens)
