"""The optimiser of GPT-J's run: clipped AdamW with linear warm-up and cosine annealing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtj import lora
from mtj.config import Config
from mtj.model import Params, param_axes


def schedule(cfg: Config) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, cosine to end_lr over anneal_steps, then flat."""
    def lr(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * step / max(cfg.warmup_steps, 1)
        t = jnp.clip((step - cfg.warmup_steps) / max(cfg.anneal_steps, 1), 0.0, 1.0)
        cosine = cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1 + jnp.cos(jnp.pi * t))
        return jnp.where(step < cfg.warmup_steps, warm, cosine)

    return lr


def decay_mask(cfg: Config) -> Params:
    """Weight decay on matrices only: not on biases or LayerNorm parameters (with LoRA: of the adapters,
    which are all that is trained)."""
    mask = jax.tree.map(lambda axes: len([a for a in axes if a != "layers"]) >= 2, param_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
    return lora.split(mask)[1] if lora.enabled(cfg) else mask


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """Direction of the update without the learning rate; the train step scales by -lr(step).

    Keeping the schedule outside the optimizer state lets fine-tuning restart
    the schedule at step 0 while keeping Adam's moments.
    """
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(cfg)),
    )
