"""HF weights files through the safetensors library: damaged files are refused by name, exports shard."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import mtj
from conftest import hf_gptj, hf_logits
from mtj.workflows import export_hf, import_hf

TENSOR = "transformer.h.0.mlp.fc_in.bias"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return hf_gptj(tmp_path_factory.mktemp("st") / "hf", vocab_size=1000, n_embd=32, n_head=4, rotary_dim=4, n_layer=2)


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: object, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def damaged_copy(hf_dir: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(hf_dir, copy)
    header, data = header_and_data(copy / "model.safetensors")
    header, data = damage(header, data)
    write_raw(copy / "model.safetensors", header, data)
    return copy


def past_the_end(header, data):
    header[TENSOR]["data_offsets"][1] = len(data) + 64
    return header, data


def overlapping(header, data):
    other = next(k for k in header if k not in (TENSOR, "__metadata__"))
    header[TENSOR]["data_offsets"] = list(header[other]["data_offsets"])
    header[TENSOR]["shape"] = [(header[other]["data_offsets"][1] - header[other]["data_offsets"][0]) // 4]
    return header, data


def unknown_dtype(header, data):
    header[TENSOR]["dtype"] = "F99"
    return header, data


def not_an_object(header, data):
    return [1, 2, 3], data


@pytest.mark.parametrize("damage", [past_the_end, overlapping, unknown_dtype, not_an_object])
def test_a_damaged_weights_file_is_refused_by_name(hf_dir, tmp_path, damage):
    copy = damaged_copy(hf_dir, tmp_path, damage)
    with pytest.raises(ValueError) as error:
        import_hf(copy, tmp_path / "ckpt")
    message = str(error.value)
    assert str(copy / "model.safetensors") in message, message
    if damage is not not_an_object:  # (no tensor to name)
        assert TENSOR in message, message
    assert not (tmp_path / "ckpt").exists()  # nothing half-written


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(hf_dir, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    with safetensors.safe_open(str(copy / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[TENSOR] = tensors[TENSOR][:-1]
    safetensors.numpy.save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{TENSOR}' has shape \[127\], but config.json "
                                         r"implies \[128\]"):
        mtj.load(copy)


def test_a_sharded_export_loads_in_transformers_and_imports_back(hf_dir, tmp_path):
    import_hf(hf_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "one")
    export_hf(tmp_path / "ckpt", tmp_path / "two", max_shard_size="100KB")
    index = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    contents = [header_and_data(p) for p in (tmp_path / "two").glob("*.safetensors")]
    # tensor bytes per shard within the limit (a single tensor over it would get a shard of its own)
    assert all(len(data) <= 100_000 for header, data in contents if len(header) > 2)
    assert index["metadata"]["total_size"] == sum(len(data) for _, data in contents)
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    tokens = np.random.RandomState(0).randint(0, 1000, (2, 12))
    np.testing.assert_array_equal(hf_logits(tmp_path / "two", tokens), hf_logits(tmp_path / "one", tokens))
    import_hf(tmp_path / "two", tmp_path / "back")  # follows the index
    np.testing.assert_array_equal(mtj.load(tmp_path / "back", dtype="float32").logits(tokens),
                                  mtj.load(tmp_path / "ckpt", dtype="float32").logits(tokens))
