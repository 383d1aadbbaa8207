import json

import pytest

from mtj.config import Config, ConfigError, from_dict, load_config, parse_overrides
from mtj.model import count_params
from conftest import REPO


@pytest.mark.parametrize("name", ["6B_roto_256.json", "example_config.json"])
def test_original_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert (cfg.layers, cfg.d_model, cfg.n_heads, cfg.n_vocab, cfg.rotary_dims) == (28, 4096, 16, 50400, 64)
    assert cfg.mp == 8 and cfg.head_dim == 256 and cfg.ff_dim == 16384


def test_gptj_6b_parameter_count():
    # transformers' GPTJForCausalLM(GPTJConfig()) has this many parameters (vocab 50400).
    assert count_params(load_config(REPO / "configs" / "6B_roto_256.json")) == 6_050_882_784


def test_overrides_parse_json_then_string(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"layers": 2, "d_model": 64, "n_heads": 4}))
    cfg = load_config(path, ["layers=3", "lr=3e-4", "name=my run", "val_set={\"a\": \"b.index\"}", "fsdp=true"])
    assert (cfg.layers, cfg.lr, cfg.name, cfg.val_set, cfg.fsdp) == (3, 3e-4, "my run", {"a": "b.index"}, True)
    assert parse_overrides(["x=[1, 2]"]) == {"x": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["layers"])


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'n_head'.*did you mean 'n_heads'"):
        from_dict({"n_head": 4})
    with pytest.raises(ConfigError, match="'pe_rotary_dim'.*'pe_rotary_dims'"):
        from_dict({"pe_rotary_dim": 4})


@pytest.mark.parametrize("key,value,expected", [
    ("layers", "28", "int"), ("lr", "fast", "float"), ("fsdp", 1, "bool"),
    ("val_set", ["a"], "dict"), ("eval_harness_tasks", "lambada", "list"),
])
def test_wrong_type_names_key_and_type(key, value, expected):
    with pytest.raises(ConfigError, match=rf"'{key}' must be .*{expected}"):
        from_dict({key: value})


@pytest.mark.parametrize("values,keys", [
    ({"d_model": 100, "n_heads": 16}, ["n_heads", "d_model"]),
    ({"n_heads": 12, "cores_per_replica": 8, "d_model": 768}, ["n_heads", "cores_per_replica"]),
    ({"d_model": 512, "n_heads": 8, "pe_rotary_dims": 80}, ["pe_rotary_dims", "d_head"]),
    ({"pe_rotary_dims": 63}, ["pe_rotary_dims"]),
    ({"model_type": "llama"}, ["model_type"]),
    ({"layers": 2, "model_type": "gpt_neo", "attention_layers": ["global"]}, ["attention_layers", "layers"]),
])
def test_inconsistent_shapes_name_keys(values, keys):
    with pytest.raises(ConfigError) as e:
        from_dict(values)
    for key in keys:
        assert key in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("lr", float("nan")), ("lr", -1e-4), ("end_lr", float("inf")), ("total_steps", -1), ("warmup_steps", -5),
    ("keep_last", -1), ("weight_decay", -0.1), ("z_loss", -1.0), ("layer_norm_eps", 0.0), ("layer_norm_eps", -1e-5),
    ("rotary_base", 0.0), ("d_model", 0), ("seq", -2048), ("d_ff", 0), ("d_head", -64), ("tpu_size", 0),
])
def test_out_of_range_values_name_key_and_range(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be (positive|0 or more), got {value}"):
        from_dict({key: value})


def test_odd_vocab_is_padded_for_the_mesh():
    assert Config(n_vocab=50257, cores_per_replica=1).padded_vocab == 50304
    assert Config(n_vocab=50257, cores_per_replica=8).padded_vocab == 50304
    assert Config(n_vocab=50400).padded_vocab == 50432
    assert Config(n_vocab=1001, n_heads=12, d_model=768, cores_per_replica=3).padded_vocab % 3 == 0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{layers: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_dtypes_take_the_command_lines_spellings():
    from mtj.config import from_dict

    cfg = from_dict({"dtype": "bf16", "param_dtype": "fp32", "grad_accum_dtype": "fp16"})
    assert (cfg.dtype, cfg.param_dtype, cfg.grad_accum_dtype) == ("bfloat16", "float32", "float16")
    assert cfg.replace(dtype="fp32").dtype == "float32"


def test_docs_config_md_lists_every_key_with_its_type_and_default():
    import dataclasses
    import json
    import re
    import types
    import typing

    from conftest import REPO
    from mtj.config import Config

    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| `(.+?)` \| (.+) \|$", (REPO / "docs" / "config.md").read_text(), re.M)
    documented = {key: (kind.replace("\\|", "|"), default, meaning) for key, kind, default, meaning in rows}
    assert len(documented) == len(rows)  # each key once
    hints = typing.get_type_hints(Config)

    def type_name(tp) -> str:  # as the table writes it: "int | null", "dict[str, str]"
        parts = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        return " | ".join("null" if t is type(None) else str(t) if typing.get_args(t) else t.__name__ for t in parts)

    fields = dataclasses.fields(Config)
    assert sorted(documented) == sorted(f.name for f in fields), "docs/config.md and mtj.config.Config differ"
    for f in fields:
        kind, default, meaning = documented[f.name]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert kind == type_name(hints[f.name]), (f.name, kind)
        assert json.loads(default) == value, (f.name, default, value)
        assert len(meaning) > 5, f.name
