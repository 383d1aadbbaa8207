"""LoRA adapters against the real `peft` library: mtj's exports load with PeftModel.from_pretrained and give mtj's
logits, adapters made by peft import and give peft's, and the merged export equals the adapted model."""

import json

import numpy as np
import pytest

from conftest import SHARP, assert_logits_close, random_vectors
from mtj import checkpoint, lora, model
from mtj.adapters import PeftError
from mtj.config import ConfigError
from mtj.sharding import make_mesh
from mtj.train import train
from mtj.workflows import export_hf, import_hf, import_peft
from test_lora import ALL_TARGETS
from test_train import config

VOCAB = 50257  # the demo text's tokenizer (gpt2), so that mtj-train can train the adapters
HF = {  # small random models of each family, sharp attention
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=64, num_layers=2, num_heads=4, window_size=5,
                                                          attention_types=[[["global", "local"], 1]],
                                                          max_position_embeddings=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                             intermediate_size=128, max_position_embeddings=64,
                                                             use_parallel_residual=False)),
}
PEFT_TARGETS = {"gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
                "gpt_neo": ["q_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
                "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}


def hf_base(path, family: str):
    import torch
    import transformers

    config_cls, model_cls, kw = HF[family]
    torch.manual_seed(len(family))
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **SHARP, **kw)).eval()
    random_vectors(hf)
    hf.save_pretrained(path)
    return path


def torch_logits(module, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.tensor(tokens)).logits.numpy()


def peft_model(base_dir, adapter_dir):
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def adapted_logits(ckpt, tokens: np.ndarray) -> np.ndarray:
    """mtj's logits of a checkpoint of adapters, unmerged: the base with the adapters beside its kernels."""
    step = checkpoint.latest(ckpt)
    cfg = checkpoint.read_config(step).replace(dtype="float32")  # (an import keeps the base's bf16 compute)
    mesh = make_mesh(1, 1)
    trained = checkpoint.restore_adapters(step, cfg, mesh)
    base = checkpoint.restore_recorded_base(checkpoint.lora_base_of(step), cfg, mesh, "float32", str(step))
    return np.asarray(model.forward(lora.combine(base, trained), tokens, cfg))[..., :VOCAB]


@pytest.mark.parametrize("family", HF)
def test_adapters_go_to_peft_and_come_back(tmp_path, family, rng):
    import peft

    hf_dir = hf_base(tmp_path / "hf", family)
    base = import_hf(hf_dir, tmp_path / "base", tokenizer="gpt2")
    tokens = rng.randint(0, VOCAB, (2, 24))
    rel = 2e-5 if family == "gpt_neo" else 1e-5  # (GPT-Neo's unscaled sharp attention rounds the most: 1.2e-5 seen)

    # mtj-trained adapters (a few large steps, so that B is far from zero) -> PEFT's files -> peft's logits
    cfg = checkpoint.read_config(base).replace(
        train_set=config(tmp_path).train_set, model_dir=str(tmp_path / "run"), dtype="float32", total_steps=3,
        per_replica_batch=2, lr=5e-2, warmup_steps=0, lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS)
    train(cfg, tune_model_path=str(base), mesh=make_mesh(1, 1), progress=False)
    ours = adapted_logits(tmp_path / "run", tokens)
    assert np.abs(ours - torch_logits(_hf(hf_dir), tokens)).max() > 1e-2  # the adapters matter
    export_hf(tmp_path / "run", tmp_path / "adapter", lora_export="peft")
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["r"] == 4
    assert_logits_close(torch_logits(peft_model(hf_dir, tmp_path / "adapter"), tokens), ours, rel=rel)

    # the merged export is the adapted model
    export_hf(tmp_path / "run", tmp_path / "merged", lora_export="merge")
    assert_logits_close(torch_logits(_hf(tmp_path / "merged"), tokens), ours, rel=rel)

    # adapters made by peft (random B, per-module ranks and scales) -> mtj -> peft's logits
    made = peft.get_peft_model(_hf(hf_dir), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=PEFT_TARGETS[family], init_lora_weights=False,
        rank_pattern={PEFT_TARGETS[family][-1]: 2}, alpha_pattern={PEFT_TARGETS[family][0]: 3}))
    made.save_pretrained(tmp_path / "made")
    expected = torch_logits(made.eval(), tokens)
    import_peft(tmp_path / "made", base, tmp_path / "imported")
    assert_logits_close(adapted_logits(tmp_path / "imported", tokens), expected, rel=rel)
    loaded = checkpoint.restore_model(tmp_path / "imported", make_mesh(1, 1))  # what sampling and serving load
    fp32 = loaded.cfg.replace(dtype="float32")
    assert_logits_close(np.asarray(model.forward(loaded.params, tokens, fp32))[..., :VOCAB], expected, rel=rel)


def _hf(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_what_cannot_be_exported_or_imported_is_refused(tmp_path):
    hf_dir = hf_base(tmp_path / "hf", "gptj")
    base = import_hf(hf_dir, tmp_path / "base", tokenizer="gpt2")
    with pytest.raises(ConfigError, match="holds a whole model"):
        export_hf(base, tmp_path / "out", lora_export="peft")
    adapter = tmp_path / "dora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(PeftError, match="DoRA"):
        import_peft(adapter, base, tmp_path / "imported")
