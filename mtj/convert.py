"""Hugging Face <-> mtj conversion as tables of names, not code.

`CONFIG_KEYS` maps our config keys to the HF config.json keys of each family;
`WEIGHTS` maps each HF tensor to our parameter path. `{i}` in an HF key is the
layer index: those tensors are stacked along our leading 'layers' axis.
torch Linear weights are [out, in]; ours are [in, out], hence `transpose`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
from etils import epath

from mtj.config import Config, from_dict
from mtj.model import Params, local_layers, param_specs
from mtj.paths import PathLike, local_copy, published_dir, refuse_overwrite, user_path
from mtj.safetensors_io import SafetensorsFile, write_safetensors
from mtj.tokenizer import Tokenizer, find_tokenizer_files

CONFIG_KEYS: dict[str, dict[str, str]] = {
    "gptj": {
        "layers": "n_layer", "d_model": "n_embd", "n_heads": "n_head", "n_vocab": "vocab_size",
        "pe_rotary_dims": "rotary_dim", "d_ff": "n_inner", "seq": "n_positions",
        "layer_norm_eps": "layer_norm_epsilon", "activation": "activation_function",
        "tie_embeddings": "tie_word_embeddings",
    },
    "gpt_neo": {
        "layers": "num_layers", "d_model": "hidden_size", "n_heads": "num_heads", "n_vocab": "vocab_size",
        "d_ff": "intermediate_size", "seq": "max_position_embeddings", "window_size": "window_size",
        "attention_layers": "attention_layers", "layer_norm_eps": "layer_norm_epsilon",
        "activation": "activation_function", "tie_embeddings": "tie_word_embeddings",
    },
    "gpt_neox": {
        "layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
        "n_vocab": "vocab_size", "d_ff": "intermediate_size", "seq": "max_position_embeddings",
        "parallel_residual": "use_parallel_residual", "layer_norm_eps": "layer_norm_eps",
        "activation": "hidden_act", "tie_embeddings": "tie_word_embeddings",
    },
}

HF_ARCHITECTURES = {"gptj": "GPTJForCausalLM", "gpt_neo": "GPTNeoForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Weight:
    hf: str  # HF state-dict key; "{i}" marks a per-layer tensor
    ours: str  # our parameter path, dot-separated
    transpose: bool = False
    fused: tuple[int, int] | None = None  # (part, parts): one of `parts` per-head slices of the HF output dim


def _neox_qkv(kind: str) -> list[Weight]:
    # query_key_value packs [q_h, k_h, v_h] per head h along its output dimension.
    hf = f"gpt_neox.layers.{{i}}.attention.query_key_value.{kind}"
    suffix = "" if kind == "weight" else "_bias"
    return [Weight(hf, f"layers.attn.{n}{suffix}", transpose=kind == "weight", fused=(j, 3)) for j, n in enumerate("qkv")]


WEIGHTS: dict[str, list[Weight]] = {
    "gptj": [
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
    ],
    "gpt_neo": [
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
    ],
    "gpt_neox": [
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
    ],
}


# --- configs -------------------------------------------------------------------

def _attention_types(kinds: list[str]) -> list:
    """GPT-Neo's run-length form of per-layer attention kinds."""
    if len(kinds) % 2 == 0 and kinds == ["global", "local"] * (len(kinds) // 2):
        return [[["global", "local"], len(kinds) // 2]]
    return [[[k], 1] for k in kinds]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> Config:
    family = hf.get("model_type")
    if family not in CONFIG_KEYS:
        raise ValueError(f"HF model_type '{family}' is not supported; supported: {sorted(CONFIG_KEYS)}")
    values: dict[str, Any] = {"model_type": family}
    for ours, theirs in CONFIG_KEYS[family].items():
        if hf.get(theirs) is not None:
            values[ours] = hf[theirs]
    if family == "gpt_neox":  # rotary settings: rope_parameters (transformers 5) or the older flat keys
        rope = hf.get("rope_parameters") or {}
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        values["pe_rotary_dims"] = int(values["d_model"] // values["n_heads"] * pct)
        values["rotary_base"] = float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    if family == "gpt_neo":
        values["pe"] = "learned"
    values.update(overrides)
    return from_dict(values)


def config_to_hf(cfg: Config, eos_id: int | None = 50256) -> dict[str, Any]:
    derived = {"pe_rotary_dims": cfg.rotary_dims, "d_ff": cfg.ff_dim, "attention_layers": None}
    out: dict[str, Any] = {
        "model_type": cfg.model_type,
        "architectures": [HF_ARCHITECTURES[cfg.model_type]],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "dtype": "float32",
    }
    for ours, theirs in CONFIG_KEYS[cfg.model_type].items():
        out[theirs] = derived.get(ours, getattr(cfg, ours))
    if cfg.model_type == "gpt_neo":
        kinds = ["local" if k else "global" for k in local_layers(cfg)]
        out.update(attention_layers=kinds, attention_types=_attention_types(kinds))
    if cfg.model_type == "gpt_neox":
        pct = cfg.rotary_dims / cfg.head_dim
        out.update(rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": pct},
                   rotary_pct=pct, rotary_emb_base=cfg.rotary_base, attention_bias=True)
    return out


# --- weights -------------------------------------------------------------------

def spec_at(specs: Params, path: str) -> Any:
    node = specs
    for part in path.split("."):
        node = node[part]
    return node


def _set(tree: Params, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _table(cfg: Config) -> list[Weight]:
    specs = param_specs(cfg)
    table = []
    for w in WEIGHTS[cfg.model_type]:
        try:
            spec_at(specs, w.ours)
        except KeyError:
            continue  # e.g. lm_head when embeddings are tied
        table.append(w)
    return table


def pad_vocab(a: np.ndarray, axes: tuple, cfg: Config) -> np.ndarray:
    for dim, axis in enumerate(axes):
        if axis == "vocab" and a.shape[dim] != cfg.padded_vocab:
            pad = [(0, 0)] * a.ndim
            pad[dim] = (0, cfg.padded_vocab - a.shape[dim])
            a = np.pad(a, pad)
    return a


def _unpad_vocab(a: np.ndarray, axes: tuple, cfg: Config) -> np.ndarray:
    index = tuple(slice(0, cfg.n_vocab) if axis == "vocab" else slice(None) for axis in axes)
    return a[index]


def _unfuse(t: np.ndarray, w: Weight, n_heads: int) -> np.ndarray:
    """Our part of a per-head fused HF tensor: [H * parts * Dh, ...] -> [H * Dh, ...]."""
    if w.fused is None:
        return t
    part, parts = w.fused
    per_head = t.reshape(n_heads, parts, -1, *t.shape[1:])
    return per_head[:, part].reshape(-1, *t.shape[1:])


def _fuse(parts: list[np.ndarray], n_heads: int) -> np.ndarray:
    """Inverse of _unfuse over all parts (HF orientation, output dimension first)."""
    per_head = [p.reshape(n_heads, 1, -1, *p.shape[1:]) for p in parts]
    return np.concatenate(per_head, axis=1).reshape(-1, *parts[0].shape[1:])


def hf_to_params(get: Callable[[str], np.ndarray], cfg: Config, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (our path, array) one parameter at a time from HF tensors fetched by `get(key)`."""
    specs = param_specs(cfg)

    def convert(w: Weight, key: str, axes: tuple) -> np.ndarray:
        t = _unfuse(get(key), w, cfg.n_heads)
        return pad_vocab(t.T if w.transpose else t, axes, cfg)

    for w in _table(cfg):
        spec = spec_at(specs, w.ours)
        if "{i}" in w.hf:
            out = np.empty(spec.shape, dtype)
            for i in range(cfg.layers):
                out[i] = convert(w, w.hf.format(i=i), spec.axes[1:])
        else:
            out = convert(w, w.hf, spec.axes).astype(dtype)
        if out.shape != spec.shape:
            raise ValueError(f"HF tensor {w.hf} converts to shape {out.shape}, expected {spec.shape} for {w.ours}")
        yield w.ours, out


def _groups(cfg: Config) -> list[list[Weight]]:
    """Table rows grouped by HF tensor (several rows for a fused tensor), in table order."""
    groups: dict[str, list[Weight]] = {}
    for w in _table(cfg):
        groups.setdefault(w.hf, []).append(w)
    return list(groups.values())


def params_to_hf(get: Callable[[str], np.ndarray], cfg: Config, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF key, array) from our parameters fetched by `get(path)`, one HF tensor group at a time."""
    specs = param_specs(cfg)
    for group in _groups(cfg):
        ours = [_unpad_vocab(np.asarray(get(w.ours)), spec_at(specs, w.ours).axes, cfg) for w in group]
        layers = range(cfg.layers) if "{i}" in group[0].hf else [None]
        for i in layers:
            parts = [(a if i is None else a[i]) for a in ours]
            parts = [p.T if w.transpose else p for p, w in zip(parts, group)]
            t = _fuse(parts, cfg.n_heads) if group[0].fused else parts[0]
            key = group[0].hf if i is None else group[0].hf.format(i=i)
            yield key, np.ascontiguousarray(t).astype(dtype)


def unflatten(items: Iterator[tuple[str, Any]]) -> Params:
    tree: Params = {}
    for path, value in items:
        _set(tree, path, value)
    return tree


# --- HF directories ------------------------------------------------------------

def is_hf_dir(path: PathLike) -> bool:
    path = user_path(path)
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()


def read_hf_config(path: PathLike) -> dict[str, Any]:
    return json.loads((user_path(path) / "config.json").read_text())


class HFTensors:
    """Random access to the tensors of an HF directory, read lazily one at a time."""

    def __init__(self, path: PathLike, allow_pickle: bool = False):
        path = user_path(path)
        self.files: dict[str, SafetensorsFile] = {}
        for shard in sorted(path.glob("*.safetensors")):
            f = SafetensorsFile(shard)
            self.files.update({key: f for key in f.keys()})
        self.state: dict[str, Any] = {}
        if not self.files:
            bin_path = path / "pytorch_model.bin"
            if not bin_path.is_file():
                raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {path}")
            if not allow_pickle:
                raise ValueError(f"{path} holds only pytorch_model.bin, a pickle that can run code when loaded; "
                                 "pass --allow-pickle if you trust it")
            import torch

            self.state = torch.load(bin_path, map_location="cpu", mmap=True, weights_only=True)

    def __call__(self, key: str) -> np.ndarray:
        if key in self.files:
            return self.files[key].get(key).astype(np.float32)
        if key in self.state:
            return self.state[key].float().numpy()
        raise KeyError(f"tensor '{key}' missing from the HF checkpoint")


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The HF tensors an export writes, with their shapes, derived from the same table."""
    specs = param_specs(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for group in _groups(cfg):
        spec = spec_at(specs, group[0].ours)
        shape = tuple(cfg.n_vocab if a == "vocab" else n for n, a in zip(spec.shape, spec.axes))
        per_layer = "{i}" in group[0].hf
        shape = shape[1:] if per_layer else shape
        shape = shape[::-1] if group[0].transpose else shape
        shape = (shape[0] * len(group), *shape[1:])  # fused parts stack on the output dimension
        for key in ([group[0].hf.format(i=i) for i in range(cfg.layers)] if per_layer else [group[0].hf]):
            shapes[key] = shape
    return shapes


# --- whole-directory conversions -----------------------------------------------

EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def import_hf(hf_dir: PathLike, out: PathLike, allow_pickle: bool = False, **overrides: Any) -> epath.Path:
    """HF directory -> our checkpoint `out/step_0` (tokenizer included when the directory has one)."""
    from mtj import checkpoint
    from mtj.lm import place_params
    from mtj.sharding import make_mesh

    if not is_hf_dir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (config.json + *.safetensors)")
    refuse_overwrite(out)
    with local_copy(hf_dir) as local:  # safetensors are memory-mapped: a bucket's directory is downloaded
        cfg = config_from_hf(read_hf_config(local), cores_per_replica=1, **overrides)
        tensors = HFTensors(local, allow_pickle=allow_pickle)
        params = place_params(hf_to_params(tensors, cfg), cfg, make_mesh(mp=1, dp=1))
        tok = find_tokenizer_files(local)
    step_dir = checkpoint.save(out, 0, params, cfg, Tokenizer(tok) if tok else None)
    cfg.save(user_path(out) / "config.json")
    return step_dir


def export_hf(ckpt: PathLike, out: PathLike, dtype: str = "fp32") -> epath.Path:
    """Our checkpoint -> HF directory: config.json, model.safetensors, generation_config.json, tokenizer."""
    from mtj import checkpoint
    from mtj.sharding import make_mesh

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got '{dtype}'")
    with published_dir(out) as tmp:
        model = checkpoint.restore_model(ckpt, make_mesh(mp=1, dp=1))
        cfg, params, tokenizer = model.cfg, model.params, model.tokenizer

        def get(path: str) -> np.ndarray:
            return np.asarray(spec_at(params, path))

        np_dtype = np.dtype(EXPORT_DTYPES[dtype])
        shapes = {k: (s, np_dtype) for k, s in hf_shapes(cfg).items()}
        write_safetensors(tmp / "model.safetensors", shapes, params_to_hf(get, cfg, np_dtype))
        eos = tokenizer.eos_id if tokenizer is not None else None
        hf_config = config_to_hf(cfg, eos)
        hf_config["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "max_length": cfg.seq}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return user_path(out)
