"""Training gradients against transformers': one batch's cross-entropy gradient for every weight, per family
(GPT-J's untied head with a bias, GPT-Neo's tied embeddings, GPT-NeoX's untied head and fused qkv)."""

import jax
import numpy as np
import pytest

from conftest import SHARP, hf_gptj
from mtj import convert
from mtj.train import loss_fn
from test_neo_neox import NEO, NEOX, hf_model

CASES = {"gptj": None, "neo_alternating": ("neo", NEO["neo_alternating"]),
         "neox_sequential": ("neox", NEOX["neox_sequential"])}

# transformers 5 calls GPT-NeoX's head `lm_head` in the module and `embed_out` in its files (our table's name)
FILE_NAMES = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_transformers(tmp_path, rng, name):
    import torch
    import transformers

    if CASES[name] is None:
        hf_gptj(tmp_path / "hf", n_embd=64, n_head=4, rotary_dim=8, vocab_size=1001, **SHARP)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    else:
        family, kw = CASES[name]
        model = hf_model(tmp_path / "hf", family, 1, **SHARP, **kw)
    cfg = convert.config_from_hf(convert.read_hf_config(tmp_path / "hf"), dtype="float32", z_loss=0.0)
    batch = rng.randint(0, cfg.n_vocab, (2, 25))
    names = FILE_NAMES.get(cfg.model_type, {})

    tensors = {names.get(k, k): v.detach().numpy() for k, v in model.state_dict().items()}
    params = nest(dict(convert.hf_to_params(tensors.__getitem__, cfg)))
    ours = jax.jit(jax.grad(lambda p: loss_fn(p, batch, cfg)[1]))(params)

    ids = torch.tensor(batch, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    # transformers' gradients in our layout, converted as the weights are (a tied head's gradient is in wte's)
    grads = {names.get(k, k): p.grad.numpy() for k, p in model.named_parameters()}
    expected = nest(dict(convert.hf_to_params(lambda k: grads[k], cfg)))

    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for (path, got), want in zip(jax.tree.leaves_with_path(ours), jax.tree.leaves(expected)):
        scale = float(np.abs(want).max())
        assert scale > 0, jax.tree_util.keystr(path)  # (GPT-Neo's unscaled attention: q within 1.6e-4 of it)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=5e-4 * scale, err_msg=jax.tree_util.keystr(path))
