"""fetch_model: manifests are verified file by file; bad references fail with the name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import load_folder
from lora_adapters import write_adapter

from mergeflow.checkpoint import MANIFEST, open_checkpoint
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError
from mergeflow.fetch import fetch_model
from mergeflow.methods.primitives import to_float32
from mergeflow.safetensors_io import TensorFileReader


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("fetch") / "merged"
    experts = [{"model": zoo[f"expert_{i}"]} for i in range(2)]
    merge(MergeConfig(merge_method="task_arithmetic", base_model=zoo["base"], models=experts), str(out))
    return out


def test_a_verified_folder_gives_its_content_hash(merged):
    first, second = fetch_model(str(merged)), fetch_model(f"file://{merged}")
    assert first.path == merged and first.sha256 == second.sha256 and len(first.sha256) == 64


def test_a_changed_shard_is_refused_naming_it(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    shard = json.loads((copy / MANIFEST).read_text())["files"][0]["path"]
    data = bytearray((copy / shard).read_bytes())
    data[-1] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard} sha256 .* does not match the manifest"):
        fetch_model(str(copy))


def test_a_missing_listed_file_is_refused(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is listed in mergeflow-manifest.json but missing"):
        fetch_model(str(copy))


def test_a_missing_model_names_the_reference(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        fetch_model(str(tmp_path / "nowhere"))


def test_a_model_with_a_lora_adapter_is_fetched_as_the_whole_adapted_model(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = write_adapter(tmp_path / "lora", zoo["base"], ["model.layers.0.self_attn.q_proj"])
    ref = f"{zoo['base']}+{adapter}"
    fetched = fetch_model(ref)
    assert fetched.ref == ref and fetched.path.is_dir()
    # The folder holds exactly the adapted weights the merge engine reads for that reference.
    checkpoint, reader = open_checkpoint(ref), TensorFileReader()
    try:
        expected = {
            n: to_float32(reader.read(e, 0, e.numel)).reshape(e.shape) for n, e in checkpoint.tensors.items()
        }
    finally:
        reader.close()
        checkpoint.close()
    got = {name: value.numpy() for name, value in load_folder(fetched.path).items()}
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert np.array_equal(value, expected[name]), name
    base = load_folder(zoo["base"])["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(got["model.layers.0.self_attn.q_proj.weight"], base)
    AutoModelForCausalLM.from_pretrained(fetched.path)  # a whole model, config included
    again = fetch_model(ref)  # cached
    assert again.path == fetched.path and again.sha256 == fetched.sha256
