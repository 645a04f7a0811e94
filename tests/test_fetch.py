"""fetch_model: manifests are verified file by file; bad references fail with the name."""

from __future__ import annotations

import json
import shutil

import pytest

from mergeflow.checkpoint import MANIFEST
from mergeflow.config import MergeConfig
from mergeflow.engine import merge
from mergeflow.errors import CheckpointError
from mergeflow.fetch import fetch_model


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
