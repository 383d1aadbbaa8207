"""Whole-directory workflows over the mechanisms below them: import a Hugging Face directory or an
original (v1) checkpoint into an mtj checkpoint, export one to Hugging Face, slim one for serving.
Every write is atomic (a temporary directory renamed into place) and refuses to overwrite.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from etils import epath

from mtj import adapters, checkpoint, lora
from mtj.config import QUANTIZE, ConfigError, load_config
from mtj.convert import (EXPORT_DTYPES, HFTensors, config_from_hf, config_to_hf, hf_shapes, hf_to_params, is_hf_dir,
                         params_to_hf, read_hf_config, spec_at, write_shards)
from mtj.families import GPTJ
from mtj.model import param_shardings
from mtj.mtj_v1 import V1Shards, v1_to_params
from mtj.paths import PathLike, local_copy, published_dir, refuse_overwrite, user_path
from mtj.quantize import is_quantized, is_weight, quantize_weights
from mtj.sharding import make_mesh, place
from mtj.tokenizer import find_tokenizer_files, load_tokenizer


def import_hf(hf_dir: PathLike, out: PathLike, allow_pickle: bool = False, **overrides: Any) -> epath.Path:
    """HF directory -> our checkpoint `out/step_0` (tokenizer included when the directory has one)."""
    if not is_hf_dir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (config.json + *.safetensors)")
    refuse_overwrite(out)
    with local_copy(hf_dir) as local:  # safetensors are memory-mapped: a bucket's directory is downloaded
        cfg = config_from_hf(read_hf_config(local), cores_per_replica=1, **overrides)
        tensors = HFTensors(local, cfg, allow_pickle=allow_pickle)
        params = place(hf_to_params(tensors, cfg), param_shardings(cfg, make_mesh(mp=1, dp=1)), cfg.param_dtype)
        tok = find_tokenizer_files(local)
    step_dir = checkpoint.save(out, 0, params, cfg, tok)
    cfg.save(user_path(out) / "config.json")
    return step_dir


def export_hf(ckpt: PathLike, out: PathLike, dtype: str = "fp32", max_shard_size: int | str = "50GB",
              lora_export: str = "none") -> epath.Path:
    """Our checkpoint -> HF directory: config.json, the weights (sharded past `max_shard_size`, whose
    default is transformers'), generation_config.json, tokenizer. A checkpoint of LoRA adapters exports
    merged into its base (`lora_export` "merge") or as PEFT's adapter files ("peft")."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(EXPORT_DTYPES)}, got '{dtype}'")
    step_dir = checkpoint.latest(ckpt)
    checkpoint.refuse_quantized(step_dir, "export to Hugging Face")
    record = checkpoint.lora_base_of(step_dir)
    if record is None and lora_export != "none":
        raise ConfigError(f"--{'merge-lora' if lora_export == 'merge' else 'peft'} exports LoRA adapters, and "
                          f"{step_dir} holds a whole model (no lora_rank in its training)")
    if record is not None and lora_export == "none":
        raise ConfigError(f"{step_dir} holds LoRA adapters on {record['path']}: export them with --merge-lora (one "
                          "model with the adapters merged) or --peft (adapter files for peft.PeftModel)")
    if lora_export == "peft":
        return export_peft(step_dir, out, record)
    with published_dir(out) as tmp:
        model = checkpoint.restore_model(ckpt, make_mesh(mp=1, dp=1))
        cfg, params, tokenizer = model.cfg, model.params, model.tokenizer

        def get(path: str) -> np.ndarray:
            return np.asarray(spec_at(params, path))

        np_dtype = np.dtype(EXPORT_DTYPES[dtype])
        write_shards(tmp, hf_shapes(cfg), np_dtype, params_to_hf(get, cfg, np_dtype), max_shard_size)
        eos = tokenizer.eos_id if tokenizer is not None else None
        hf_config = config_to_hf(cfg, eos)
        hf_config["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}, indent=2))  # no max_length: transformers
        # warns when a generate call's max_new_tokens meets one (the context is config.json's)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp, model_max_length=cfg.seq)
    return user_path(out)


def export_peft(step_dir: epath.Path, out: PathLike, record: dict) -> epath.Path:
    """A step of LoRA adapters -> PEFT's adapter_config.json + adapter_model.safetensors (fp32), which
    `peft.PeftModel.from_pretrained` loads onto the base's HF export."""
    cfg = checkpoint.read_config(step_dir)
    trained = checkpoint.restore_adapters(step_dir, cfg.replace(cores_per_replica=1), make_mesh(mp=1, dp=1))
    with published_dir(out) as tmp:
        safetensors.numpy.save_file(dict(adapters.to_peft(trained, cfg)), str(tmp / adapters.WEIGHTS_FILE),
                                    metadata={"format": "pt"})
        (tmp / adapters.CONFIG_FILE).write_text(json.dumps(adapters.peft_config(cfg, record["path"]), indent=2))
    return user_path(out)


def import_peft(peft_dir: PathLike, base: PathLike, out: PathLike) -> epath.Path:
    """PEFT adapter files + the mtj checkpoint of their base -> a checkpoint of mtj LoRA adapters `out/step_0`
    that names that base (as training would have written it)."""
    refuse_overwrite(out)
    with local_copy(peft_dir) as local:
        if not (local / adapters.CONFIG_FILE).is_file() or not (local / adapters.WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{peft_dir} is not a PEFT adapter directory ({adapters.CONFIG_FILE} + "
                                    f"{adapters.WEIGHTS_FILE})")
        config = adapters.read_config(local)
        adapters.check_peft_config(config, str(peft_dir))
        tensors = {k: v.astype(np.float32) for k, v in safetensors.numpy.load_file(str(local / adapters.WEIGHTS_FILE)).items()}
    base_step = checkpoint.latest(base)
    cfg, trained = adapters.from_peft(tensors, config, checkpoint.read_config(base_step).replace(cores_per_replica=1),
                                      str(peft_dir))
    mesh = make_mesh(mp=1, dp=1)
    _, record = checkpoint.restore_lora_base(base_step, cfg, mesh, cfg.param_dtype)
    shardings = lora.split(param_shardings(cfg, mesh))[1]
    placed = jax.tree.map(lambda a, sh: jax.device_put(a, sh), trained, shardings)
    step = checkpoint.save(out, 0, placed, cfg, checkpoint.read_tokenizer(base_step), meta={"lora_base": record})
    cfg.save(user_path(out) / "config.json")
    return step


def import_v1(step_dir: PathLike, config: PathLike, out: PathLike, **overrides: Any) -> epath.Path:
    """A v1 step directory + its original config JSON -> our checkpoint `out/step_0` (params only)."""
    out = user_path(out)
    refuse_overwrite(out)
    original = load_config(config)  # validation rejects what a GPT-J cannot be (pe, norm)
    if original.family is not GPTJ:
        raise ValueError(f"v1 checkpoints are GPT-J models; {config} sets model_type '{original.model_type}'")
    shards = V1Shards(step_dir, original.cores_per_replica)
    cfg = original.replace(cores_per_replica=1, **overrides)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model_type)  # before the long read: fails fast
    params = place(v1_to_params(shards, cfg), param_shardings(cfg, make_mesh(mp=1, dp=1)), cfg.param_dtype)
    step = checkpoint.save(out, 0, params, cfg, tokenizer)
    cfg.save(out / "config.json")
    return step


def slim(ckpt: PathLike, out: PathLike, dtype: str = "bf16", quantize: str = "none") -> epath.Path:
    """A params-only copy of a checkpoint in a smaller dtype (no optimizer state), for sampling and serving;
    with `quantize` ("int8", "int4") its matmul kernels and embedding table are stored quantized (`mtj.quantize`:
    integers and their scales), as `mtj.load(quantize=...)` would make them, and the step's meta says so."""
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype not in names:
        raise ValueError(f"--dtype must be one of {sorted(names)}, got '{dtype}'")
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {QUANTIZE}, got '{quantize}'")
    refuse_overwrite(out)
    checkpoint.refuse_quantized(checkpoint.latest(ckpt), "slimming")
    model = checkpoint.restore_model(ckpt, make_mesh(mp=1, dp=1))
    # quantized from the stored values (as mtj.load quantizes), not from the smaller dtype's
    params = model.params if quantize == "none" else quantize_weights(model.params, quantize)
    small = jax.tree.map(lambda a: a if is_quantized(a) else a.astype(names[dtype]), params, is_leaf=is_weight)
    return checkpoint.save(out, checkpoint.step_number(model.step_dir), small,
                           model.cfg.replace(param_dtype=names[dtype], quantize=quantize), model.tokenizer,
                           meta={"quantized": quantize} if quantize != "none" else None)
