"""Local file hashes: remembered across processes, computed once at a time within one, and
started for a merge's inputs before torch loads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from lora_adapters import write_adapter

from mergeflow.errors import StorageError
from mergeflow.file_hashes import (
    LOCAL_PIECE,
    local_file_sha256,
    local_model_files,
    read_json_cache,
    start_hashing_inputs,
)
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file-hashes.json"


@pytest.fixture(scope="module")
def sharded_zoo(tmp_path_factory):
    spec = GeneratedZooSpec(num_experts=3, shard_bytes=40_000, seed=2)
    return build_generated_zoo(tmp_path_factory.mktemp("zoo"), spec)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("size", [0, 1, LOCAL_PIECE - 1, LOCAL_PIECE, 2 * LOCAL_PIECE + 12345])
def test_a_file_hashed_piece_by_piece_has_its_sha256(tmp_path, size):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(size))
    assert local_file_sha256(str(path), remember=False) == sha256(path)


def test_a_file_that_cannot_be_hashed_is_named_in_one_line(tmp_path):
    for path, reason in [(tmp_path / "gone.safetensors", "No such file"), (tmp_path, "Is a directory")]:
        with pytest.raises(StorageError, match=f"^{re.escape(str(path))}: cannot hash it: {reason}"):
            local_file_sha256(str(path))


def test_threads_hashing_one_file_at_once_all_get_its_hash(tmp_path, hash_cache):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(48 << 20))  # several hash blocks: the threads overlap
    results: list[str] = []

    def hash_it() -> None:
        results.append(local_file_sha256(str(path)))

    threads = [threading.Thread(target=hash_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [sha256(path)] * 4
    assert list(read_json_cache(hash_cache).values()) == [sha256(path)]


def test_a_merge_config_names_the_local_files_to_hash(sharded_zoo, tmp_path, monkeypatch):
    config = {
        "merge_method": "ties",
        "base_model": sharded_zoo["base"],
        "models": [
            {"model": f"file://{sharded_zoo['expert_0']}"},
            {"model": os.path.relpath(sharded_zoo["expert_1"], tmp_path)},  # from the working dir
            {"model": "s3://bucket/expert"},  # hashed by the merge, not before
            {"model": str(tmp_path / "missing")},
            {"model": f"{sharded_zoo['expert_2']}+{tmp_path / 'lora'}"},  # mergekit's model+adapter
        ],
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    files = local_model_files("merge.yaml")
    for name in ("base", "expert_0", "expert_1", "expert_2"):
        folder = Path(sharded_zoo[name]).resolve()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted({str(folder / shard) for shard in index["weight_map"].values()})
        assert len(shards) > 1
        of_folder = [f for f in files if f.startswith(f"{folder}{os.sep}")]
        assert of_folder == [str(folder / "config.json"), *shards]
    assert len(files) == 4 * (1 + len(shards))
    # and the adapter's files, which the lineage hash of model+adapter covers too
    adapter = write_adapter(tmp_path / "lora", sharded_zoo["expert_2"], ["model.layers.0.mlp.up_proj"])
    adapter_files = [str(adapter.resolve() / n) for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert local_model_files("merge.yaml") == files + adapter_files

    # mergekit's slerp examples list the models as the sources of a slice
    sources = [{"model": sharded_zoo[name], "layer_range": [0, 2]} for name in ("base", "expert_0")]
    sliced = {"merge_method": "slerp", "base_model": sharded_zoo["base"], "slices": [{"sources": sources}]}
    (tmp_path / "slerp.yaml").write_text(yaml.safe_dump(sliced))
    base_and_first = [f for f in files if "expert_1" not in f and "expert_2" not in f]
    assert local_model_files("slerp.yaml") == base_and_first
    # and a slice's own base
    with_base = sliced | {"slices": [{"sources": sources, "base_model": sharded_zoo["expert_1"]}]}
    (tmp_path / "slice-base.yaml").write_text(yaml.safe_dump(with_base))
    assert local_model_files("slice-base.yaml") == files[: len(base_and_first) + 1 + len(shards)]

    # a file of several merges (mergekit-multi's): every document's models, a merge's name not
    later = {"name": "stage", "merge_method": "linear", "models": [{"model": sharded_zoo["expert_1"]}]}
    final = {"merge_method": "linear", "models": [{"model": "stage"}, {"model": sharded_zoo["base"]}]}
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump_all([sliced, later, final]))
    expert_1 = [f for f in files if "expert_1" in f]
    assert local_model_files("multi.yaml") == base_and_first + expert_1

    (tmp_path / "broken.yaml").write_text("models: [")
    assert local_model_files("broken.yaml") == []


def test_hashes_started_before_a_merge_are_the_files_hashes(sharded_zoo, tmp_path, hash_cache):
    config = tmp_path / "merge.yaml"
    models = [{"model": sharded_zoo["expert_0"]}]
    config.write_text(yaml.safe_dump({"base_model": sharded_zoo["base"], "models": models}))
    start_hashing_inputs(config)
    for thread in threading.enumerate():
        if thread.name == "mergeflow-prehash":
            thread.join()
    hashed = {key.split("|")[0]: digest for key, digest in read_json_cache(hash_cache).items()}
    assert hashed == {path: sha256(path) for path in local_model_files(config)}


def test_the_merge_command_loads_no_torch_before_it_starts_hashing(tmp_path):
    script = (
        "import sys; from mergeflow.file_hashes import start_hashing_inputs;"
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
