"""What distinguishes GPT-J, GPT-Neo and GPT-NeoX: one record per `model_type`.

The model, the config checks and the Hugging Face converters read these fields; nothing else
asks which family a model is. `Family.config_keys` maps our config keys to the HF config.json
keys; `Family.weights` maps each HF tensor to our parameter path (`{i}` in an HF key is the
layer index: those tensors are stacked along our leading 'layers' axis; torch Linear weights
are [out, in] and ours [in, out], hence `transpose`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Weight:
    hf: str  # HF state-dict key; "{i}" marks a per-layer tensor
    ours: str  # our parameter path, dot-separated
    transpose: bool = False
    fused: tuple[int, int] | None = None  # (part, parts): one of `parts` per-head slices of the HF output dim


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    hf_architecture: str
    rotary: str | None  # "interleaved" pairs (GPT-J), "halves" (NeoX), None: learned positions (Neo)
    scale_scores: bool  # attention scores / sqrt(d_head) (the released GPT-Neo models do not scale)
    parallel_residual: bool | None  # attention and MLP from the same input; None: the config's key decides
    second_norm: bool  # a LayerNorm of its own in front of the MLP (ln_2)
    qkv_bias: bool  # the q, k, v projections carry biases
    o_bias: bool  # the attention output projection carries a bias
    head_bias: bool  # an untied LM head carries a bias
    local_attention: bool  # layers may attend within a window (`attention_layers`, `window_size`)
    tokenizer: str  # the usual tokenizer (a name of mtj.tokenizer.KNOWN)
    config_keys: dict[str, str]  # our config key -> HF config.json key
    weights: tuple[Weight, ...]

    def layer_is_local(self, cfg: Any) -> list[bool]:
        """Per layer: whether its attention is local (GPT-Neo alternates global, local by default)."""
        if not self.local_attention:
            return [False] * cfg.layers
        kinds = cfg.attention_layers or [("global", "local")[i % 2] for i in range(cfg.layers)]
        return [k == "local" for k in kinds]

    def is_parallel(self, cfg: Any) -> bool:
        return cfg.parallel_residual if self.parallel_residual is None else self.parallel_residual

    def config_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Our config keys from an HF config.json of this family."""
        values: dict[str, Any] = {"model_type": self.model_type}
        for ours, theirs in self.config_keys.items():
            if hf.get(theirs) is not None:
                values[ours] = hf[theirs]
        if self.rotary is None:
            values["pe"] = "learned"
        if self.rotary == "halves":  # rotary settings: rope_parameters (transformers 5) or the older flat keys
            rope = hf.get("rope_parameters") or {}
            pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
            values["pe_rotary_dims"] = int(values["d_model"] // values["n_heads"] * pct)
            values["rotary_base"] = float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        return values

    def config_to_hf(self, cfg: Any) -> dict[str, Any]:
        """The HF config.json keys of this family for `cfg` (identity and token ids aside)."""
        derived = {"pe_rotary_dims": cfg.rotary_dims, "d_ff": cfg.ff_dim, "attention_layers": None}
        out = {theirs: derived.get(ours, getattr(cfg, ours)) for ours, theirs in self.config_keys.items()}
        if self.local_attention:
            kinds = ["local" if local else "global" for local in self.layer_is_local(cfg)]
            out.update(attention_layers=kinds, attention_types=_attention_types(kinds))
        if self.rotary == "halves":
            pct = cfg.rotary_dims / cfg.head_dim
            out.update(rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base,
                                        "partial_rotary_factor": pct},
                       rotary_pct=pct, rotary_emb_base=cfg.rotary_base, attention_bias=True)
        return out


def _attention_types(kinds: list[str]) -> list:
    """GPT-Neo's run-length form of per-layer attention kinds."""
    if len(kinds) % 2 == 0 and kinds == ["global", "local"] * (len(kinds) // 2):
        return [[["global", "local"], len(kinds) // 2]]
    return [[[k], 1] for k in kinds]


def _neox_qkv(kind: str) -> list[Weight]:
    # query_key_value packs [q_h, k_h, v_h] per head h along its output dimension.
    hf = f"gpt_neox.layers.{{i}}.attention.query_key_value.{kind}"
    suffix = "" if kind == "weight" else "_bias"
    return [Weight(hf, f"layers.attn.{n}{suffix}", transpose=kind == "weight", fused=(j, 3)) for j, n in enumerate("qkv")]


GPTJ = Family(
    model_type="gptj", hf_architecture="GPTJForCausalLM", rotary="interleaved", scale_scores=True,
    parallel_residual=True, second_norm=False, qkv_bias=False, o_bias=False, head_bias=True, local_attention=False,
    tokenizer="gpt2",
    config_keys={
        "layers": "n_layer", "d_model": "n_embd", "n_heads": "n_head", "n_vocab": "vocab_size",
        "pe_rotary_dims": "rotary_dim", "d_ff": "n_inner", "seq": "n_positions",
        "layer_norm_eps": "layer_norm_epsilon", "activation": "activation_function",
        "tie_embeddings": "tie_word_embeddings",
    },
    weights=(
        Weight("transformer.wte.weight", "wte"),
        Weight("transformer.h.{i}.ln_1.weight", "layers.ln_1.scale"),
        Weight("transformer.h.{i}.ln_1.bias", "layers.ln_1.bias"),
        Weight("transformer.h.{i}.attn.q_proj.weight", "layers.attn.q", transpose=True),
        Weight("transformer.h.{i}.attn.k_proj.weight", "layers.attn.k", transpose=True),
        Weight("transformer.h.{i}.attn.v_proj.weight", "layers.attn.v", transpose=True),
        Weight("transformer.h.{i}.attn.out_proj.weight", "layers.attn.o", transpose=True),
        Weight("transformer.h.{i}.mlp.fc_in.weight", "layers.mlp.fc_in", transpose=True),
        Weight("transformer.h.{i}.mlp.fc_in.bias", "layers.mlp.fc_in_bias"),
        Weight("transformer.h.{i}.mlp.fc_out.weight", "layers.mlp.fc_out", transpose=True),
        Weight("transformer.h.{i}.mlp.fc_out.bias", "layers.mlp.fc_out_bias"),
        Weight("transformer.ln_f.weight", "ln_f.scale"),
        Weight("transformer.ln_f.bias", "ln_f.bias"),
        Weight("lm_head.weight", "lm_head.kernel", transpose=True),
        Weight("lm_head.bias", "lm_head.bias"),
    ),
)

GPT_NEO = Family(
    model_type="gpt_neo", hf_architecture="GPTNeoForCausalLM", rotary=None, scale_scores=False,
    parallel_residual=False, second_norm=True, qkv_bias=False, o_bias=True, head_bias=False, local_attention=True,
    tokenizer="gpt2",
    config_keys={
        "layers": "num_layers", "d_model": "hidden_size", "n_heads": "num_heads", "n_vocab": "vocab_size",
        "d_ff": "intermediate_size", "seq": "max_position_embeddings", "window_size": "window_size",
        "attention_layers": "attention_layers", "layer_norm_eps": "layer_norm_epsilon",
        "activation": "activation_function", "tie_embeddings": "tie_word_embeddings",
    },
    weights=(
        Weight("transformer.wte.weight", "wte"),
        Weight("transformer.wpe.weight", "wpe"),
        Weight("transformer.h.{i}.ln_1.weight", "layers.ln_1.scale"),
        Weight("transformer.h.{i}.ln_1.bias", "layers.ln_1.bias"),
        Weight("transformer.h.{i}.attn.attention.q_proj.weight", "layers.attn.q", transpose=True),
        Weight("transformer.h.{i}.attn.attention.k_proj.weight", "layers.attn.k", transpose=True),
        Weight("transformer.h.{i}.attn.attention.v_proj.weight", "layers.attn.v", transpose=True),
        Weight("transformer.h.{i}.attn.attention.out_proj.weight", "layers.attn.o", transpose=True),
        Weight("transformer.h.{i}.attn.attention.out_proj.bias", "layers.attn.o_bias"),
        Weight("transformer.h.{i}.ln_2.weight", "layers.ln_2.scale"),
        Weight("transformer.h.{i}.ln_2.bias", "layers.ln_2.bias"),
        Weight("transformer.h.{i}.mlp.c_fc.weight", "layers.mlp.fc_in", transpose=True),
        Weight("transformer.h.{i}.mlp.c_fc.bias", "layers.mlp.fc_in_bias"),
        Weight("transformer.h.{i}.mlp.c_proj.weight", "layers.mlp.fc_out", transpose=True),
        Weight("transformer.h.{i}.mlp.c_proj.bias", "layers.mlp.fc_out_bias"),
        Weight("transformer.ln_f.weight", "ln_f.scale"),
        Weight("transformer.ln_f.bias", "ln_f.bias"),
        Weight("lm_head.weight", "lm_head.kernel", transpose=True),  # absent when tied (the usual case)
    ),
)

GPT_NEOX = Family(
    model_type="gpt_neox", hf_architecture="GPTNeoXForCausalLM", rotary="halves", scale_scores=True,
    parallel_residual=None, second_norm=True, qkv_bias=True, o_bias=True, head_bias=False, local_attention=False,
    tokenizer="gpt-neox-20b",
    config_keys={
        "layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
        "n_vocab": "vocab_size", "d_ff": "intermediate_size", "seq": "max_position_embeddings",
        "parallel_residual": "use_parallel_residual", "layer_norm_eps": "layer_norm_eps",
        "activation": "hidden_act", "tie_embeddings": "tie_word_embeddings",
    },
    weights=(
        Weight("gpt_neox.embed_in.weight", "wte"),
        Weight("gpt_neox.layers.{i}.input_layernorm.weight", "layers.ln_1.scale"),
        Weight("gpt_neox.layers.{i}.input_layernorm.bias", "layers.ln_1.bias"),
        Weight("gpt_neox.layers.{i}.post_attention_layernorm.weight", "layers.ln_2.scale"),
        Weight("gpt_neox.layers.{i}.post_attention_layernorm.bias", "layers.ln_2.bias"),
        *_neox_qkv("weight"),
        *_neox_qkv("bias"),
        Weight("gpt_neox.layers.{i}.attention.dense.weight", "layers.attn.o", transpose=True),
        Weight("gpt_neox.layers.{i}.attention.dense.bias", "layers.attn.o_bias"),
        Weight("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", "layers.mlp.fc_in", transpose=True),
        Weight("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", "layers.mlp.fc_in_bias"),
        Weight("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", "layers.mlp.fc_out", transpose=True),
        Weight("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", "layers.mlp.fc_out_bias"),
        Weight("gpt_neox.final_layer_norm.weight", "ln_f.scale"),
        Weight("gpt_neox.final_layer_norm.bias", "ln_f.bias"),
        Weight("embed_out.weight", "lm_head.kernel", transpose=True),
    ),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPTJ, GPT_NEO, GPT_NEOX)}
