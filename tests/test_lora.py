"""LoRA and QLoRA (mtj.lora): the adapters' arithmetic, training that touches only them, small checkpoints that
name their base, exact resume, and mesh independence."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import mtj
from mtj import checkpoint, lora, model, quantize
from mtj.checkpoint import CheckpointError
from mtj.config import ConfigError, from_dict
from mtj.sharding import make_mesh
from mtj.tokenizer import load_tokenizer
from mtj.train import Trainer, train
from test_train import config, metrics

ALL_TARGETS = ["q", "k", "v", "out", "ff_in", "ff_out"]
SMALL = dict(layers=2, d_model=64, n_heads=4, n_vocab=100, seq=32, dtype="float32")
FAMILIES = {"gptj": dict(pe_rotary_dims=8), "gpt_neo": dict(pe="learned"),
            "gpt_neox": dict(pe_rotary_dims=8, parallel_residual=False)}


def random_adapters(params: dict, seed: int) -> dict:
    """`params` with every adapter drawn at random (B too: the merged model must then differ from the base)."""
    base, adapters = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return lora.combine(base, jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape), adapters))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_merged_kernels_compute_what_the_adapters_do(family, rng):
    cfg = from_dict(dict(SMALL, model_type=family, lora_rank=4, lora_targets=ALL_TARGETS, **FAMILIES[family]))
    params = model.init_params(cfg, jax.random.key(0))
    base = lora.split(params)[0]
    tokens = jnp.asarray(rng.randint(0, 100, (2, 16)))
    # B starts at zero: the adapted model is its base
    np.testing.assert_array_equal(model.forward(params, tokens, cfg), model.forward(base, tokens, lora.base_config(cfg)))
    adapted = random_adapters(params, 1)
    real = slice(0, cfg.n_vocab)  # (the padded vocabulary's columns are -1e30)
    ours = np.asarray(model.forward(adapted, tokens, cfg))[..., real]
    merged = np.asarray(model.forward(lora.merged(adapted, cfg), tokens, lora.base_config(cfg)))[..., real]
    plain = np.asarray(model.forward(base, tokens, lora.base_config(cfg)))[..., real]
    assert np.abs(ours - plain).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(merged, ours, rtol=0, atol=2e-5 * np.abs(ours).max())


def test_adapters_are_where_the_targets_say_and_fp32():
    cfg = from_dict(dict(SMALL, lora_rank=3, lora_targets=["k", "ff_out"], param_dtype="bfloat16"))
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    adapters = lora.split(shapes)[1]["layers"]
    assert {k: (v.shape, v.dtype) for k, v in adapters["attn"].items()} == {
        "k_lora_a": ((2, 64, 3), jnp.float32), "k_lora_b": ((2, 3, 64), jnp.float32)}
    assert set(adapters["mlp"]) == {"fc_out_lora_a", "fc_out_lora_b"} and adapters["mlp"]["fc_out_lora_a"].shape == (2, 256, 3)
    assert shapes["layers"]["attn"]["q"].dtype == jnp.bfloat16


@pytest.mark.parametrize("values, message", [
    (dict(lora_rank=-1), "lora_rank"), (dict(lora_rank=4, lora_targets=["q", "qkv"]), "lora_targets"),
    (dict(lora_rank=4, lora_targets=[]), "lora_targets"), (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout"),
    (dict(base_quant="int8"), "set lora_rank"), (dict(lora_rank=4, base_quant="int4"), "base_quant")])
def test_bad_lora_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(dict(SMALL, **values))


# --- training ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small GPT-J trained a little on the demo text: the frozen base of the tests below."""
    tmp = tmp_path_factory.mktemp("base")
    train(config(tmp, total_steps=30, model_dir=str(tmp / "base"), per_replica_batch=4), mesh=make_mesh(mp=1, dp=1),
          progress=False)
    return tmp / "base"


def lora_config(tmp_path, **kw):
    return config(tmp_path, **{**dict(lora_rank=8, lora_alpha=16.0, lora_targets=ALL_TARGETS, lr=3e-3, end_lr=3e-4,
                                      warmup_steps=0, per_replica_batch=4, total_steps=40), **kw})


def test_training_touches_only_the_adapters_and_the_loss_falls(tmp_path, base_run):
    cfg = lora_config(tmp_path, ckpt_every=10)
    base_before = checkpoint.restore_params(checkpoint.latest(base_run), lora.base_config(cfg), make_mesh(1, 1))
    mesh = make_mesh(mp=1, dp=1)
    state = train(cfg, tune_model_path=str(base_run), mesh=mesh, progress=False)
    # what is trained and what the optimizer holds: the adapters only
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names and all(lora.is_adapter(n) for n in names)
    moments = [path for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0] if leaf.ndim > 0]
    assert moments and all(lora.is_adapter(path[-1].key) for path in moments)
    # the loss falls below the frozen base's on the same batches (lr 0: the adapters stay zero)
    train(cfg.replace(lr=0.0, end_lr=0.0, model_dir=str(tmp_path / "frozen")), tune_model_path=str(base_run), mesh=mesh,
          progress=False)
    ours, frozen = ([metrics(tmp_path / run)[s]["loss"] for s in range(31, 41)] for run in ("run", "frozen"))
    assert np.mean(ours) < np.mean(frozen) - 0.04, (ours, frozen)
    # a small checkpoint that names its base
    step = tmp_path / "run" / "step_40"
    record = checkpoint.lora_base_of(step)
    assert record["path"] == str(checkpoint.latest(base_run)) and len(record["fingerprint"]) == 32
    size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())  # noqa: E731
    assert size(step) < size(checkpoint.latest(base_run)) / 20, (size(step), size(checkpoint.latest(base_run)))
    # loading it gives the merged model
    # loading it gives the merged model: the base it started from, bitwise, with the adapters folded in
    loaded = checkpoint.restore_model(tmp_path / "run", mesh)
    assert loaded.cfg.lora_rank == 0 and not lora.split(loaded.params)[1]
    expected = jax.jit(lambda b, a: lora.merged(lora.combine(b, a), cfg))(base_before, state["params"])
    jax.tree.map(np.testing.assert_array_equal, loaded.params, expected)
    assert np.asarray(loaded.params["wte"]).tobytes() == np.asarray(base_before["wte"]).tobytes()  # (what no adapter touches is the base's)
    # sampling, serving and evaluation load it so (mtj.load), on one device or two
    tokens = np.random.RandomState(0).randint(0, cfg.n_vocab, (2, 12))
    merged_logits = np.asarray(model.forward(expected, tokens, lora.base_config(cfg)))[..., : cfg.n_vocab]
    for mp in (1, 2):
        lm = mtj.load(tmp_path / "run", mp=mp, dtype="float32")
        np.testing.assert_allclose(lm.logits(tokens), merged_logits, rtol=0, atol=2e-5 * np.abs(merged_logits).max())
    assert lm.generate_tokens([tokens[0].tolist()], max_new_tokens=4)


@pytest.mark.parametrize("base_quant", ["int8", "nf4"])
def test_qlora_trains_on_a_quantized_base(tmp_path, base_run, base_quant):
    cfg = lora_config(tmp_path, base_quant=base_quant, lr=1e-2)
    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    trainer.set_base(*checkpoint.restore_lora_base(base_run, cfg, trainer.mesh, cfg.dtype))
    assert all(quantize.is_quantized(trainer.base["layers"]["attn"][k]) for k in "qkvo")
    assert not quantize.is_quantized(trainer.base["wte"])  # the embedding and head stay as they are (QLoRA's choice)
    state = trainer.init()
    batch = np.asarray(next(trainer.loader(cfg.train_set, load_tokenizer("gpt2"))))
    losses = []
    for _ in range(20):  # one batch again and again: the adapters learn it
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.15, losses  # (measured: -0.24 for both; a tiny model learns slowly with LoRA)


def test_resume_is_exact_with_dropout(tmp_path, base_run):
    whole = lora_config(tmp_path, total_steps=6, lora_dropout=0.2, model_dir=str(tmp_path / "whole"))
    train(whole, tune_model_path=str(base_run), mesh=make_mesh(1, 1), progress=False)
    parts = whole.replace(model_dir=str(tmp_path / "parts"), total_steps=3)
    train(parts, tune_model_path=str(base_run), mesh=make_mesh(1, 1), progress=False)
    train(parts.replace(total_steps=6), mesh=make_mesh(1, 1), progress=False)  # resumes: the base from the checkpoint
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    adapters = [checkpoint.restore_items(tmp_path / run, params=ocp.args.StandardRestore())["params"]
                for run in ("whole", "parts")]
    jax.tree.map(np.testing.assert_array_equal, *adapters)
    # dropout is on: the same run without it differs
    train(whole.replace(lora_dropout=0.0, model_dir=str(tmp_path / "nodrop")), tune_model_path=str(base_run),
          mesh=make_mesh(1, 1), progress=False)
    assert metrics(tmp_path / "nodrop")[2]["loss"] != a[2]["loss"]


def test_resume_in_a_bucket_is_exact(tmp_path, base_run, gcs_dir):
    bucket, prefix = gcs_dir[len("gs://"):].split("/", 1)
    whole = lora_config(tmp_path, total_steps=4, lora_dropout=0.2, model_dir=str(tmp_path / "whole"))
    train(whole, tune_model_path=str(base_run), mesh=make_mesh(1, 1), progress=False)
    parts = whole.replace(bucket=bucket, model_dir=f"{prefix}/parts", total_steps=2)
    train(parts, tune_model_path=str(base_run), mesh=make_mesh(1, 1), progress=False)
    train(parts.replace(total_steps=4), mesh=make_mesh(1, 1), progress=False)
    a, b = metrics(tmp_path / "whole"), metrics(epath.Path(gcs_dir) / "parts")
    assert [a[s]["loss"] for s in range(1, 5)] == [b[s]["loss"] for s in range(1, 5)]
    assert checkpoint.lora_base_of(f"{gcs_dir}/parts")["path"] == str(checkpoint.latest(base_run))


def test_sharded_lora_training_equals_one_device(tmp_path, base_run):
    losses = {}
    for dp, mp in [(1, 1), (2, 4)]:
        cfg = lora_config(tmp_path, total_steps=4, cores_per_replica=mp, per_replica_batch=8 // dp,
                          model_dir=str(tmp_path / f"dp{dp}mp{mp}"))
        train(cfg, tune_model_path=str(base_run), mesh=make_mesh(mp=mp, dp=dp), progress=False)
        losses[dp, mp] = [metrics(tmp_path / f"dp{dp}mp{mp}")[s]["loss"] for s in range(1, 5)]
    for key, value in losses.items():
        np.testing.assert_allclose(value, losses[1, 1], atol=1e-4, rtol=0, err_msg=str(key))
    assert losses[1, 1][-1] < losses[1, 1][0]


def test_the_base_must_be_the_one_the_adapters_name(tmp_path, base_run):
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    cfg = lora_config(tmp_path, total_steps=2, ckpt_every=0)
    with pytest.raises(ConfigError, match="--tune-model-path"):
        train(cfg, mesh=make_mesh(1, 1), progress=False)
    train(cfg, tune_model_path=str(base), mesh=make_mesh(1, 1), progress=False)
    with pytest.raises(ConfigError, match="holds LoRA adapters"):  # adapters are not a base
        train(cfg.replace(model_dir=str(tmp_path / "other")), tune_model_path=str(tmp_path / "run"),
              mesh=make_mesh(1, 1), progress=False)
    with pytest.raises(ConfigError, match="holds LoRA adapters"):  # nor resumed as a whole model
        train(cfg.replace(lora_rank=0, total_steps=4), mesh=make_mesh(1, 1), progress=False)
    # the base changes under the adapters: one more training step of it put where its step 30 was
    train(config(tmp_path, total_steps=31, model_dir=str(base), per_replica_batch=4), mesh=make_mesh(1, 1),
          progress=False)
    shutil.rmtree(base / "step_30")
    (base / "step_31").rename(base / "step_30")
    with pytest.raises(CheckpointError, match="not the base model the adapters .* were trained on"):
        checkpoint.restore_model(tmp_path / "run", make_mesh(1, 1))
    with pytest.raises(CheckpointError, match="fingerprint"):
        train(cfg.replace(total_steps=4), mesh=make_mesh(1, 1), progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora_rank"] == 8
