"""A real S3 server (SeaweedFS on loopback, no mocks) and a tiny generated zoo for tests that
merge through S3: tests/test_s3.py and tests/reliability/test_bad_s3.py.

The fixtures reach every test through `pytest_plugins` in tests/conftest.py; each module that
uses them gets its own server and zoo, uploaded once to s3://BUCKET/zoo/. S3 settings reach mergeflow
through environment variables set with monkeypatch, so nothing leaks out.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeflow.checkpoint import INDEX, MANIFEST
from mergeflow.config import parse_config
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Server, start_s3_server  # noqa: E402

BUCKET = "mergeflow-tests"
ZOO_SPEC = GeneratedZooSpec(num_experts=3, shard_bytes=50_000)
EXPERTS = [f"expert_{i}" for i in range(ZOO_SPEC.num_experts)]
SHARD_BYTES = 100_000  # output shard size: the tiny merged model still gets several shards
FAKE_SECRET = "mergeflow-FAKE-secret-7c1e94d2b0"
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"  # late in the order: earlier shards are staged


@dataclass
class S3:
    """The running server, its credentials, the test bucket and an independent client."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    fs: s3fs.S3FileSystem

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str) -> list[str]:
        """Object names under `prefix`, relative to it."""
        self.fs.invalidate_cache()
        root = f"{self.bucket}/{prefix.strip('/')}/"
        return sorted(p[len(root) :] for p in self.fs.find(root.rstrip("/")))

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.bucket}/{key}")

    def env(self, secret_key: str | None = None) -> dict[str, str]:
        return {
            "MERGEFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
        }


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> S3Server:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_module(s3_server) -> S3:
    fs = s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        endpoint_url=s3_server.endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    return S3(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, BUCKET, fs)


@pytest.fixture
def s3(s3_module, monkeypatch, tmp_path) -> S3:
    """The server, with mergeflow's S3 environment pointing at it for this test only."""
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_module.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "hash-cache"))
    return s3_module


@pytest.fixture(scope="module")
def local_zoo(tmp_path_factory) -> dict[str, str]:
    """A generated zoo on local disk: {'base': path, 'expert_0': path, ...}; every model is sharded."""
    root = tmp_path_factory.mktemp("zoo")
    paths = build_generated_zoo(root, ZOO_SPEC)
    for path in paths.values():
        assert (Path(path) / INDEX).exists(), "the test zoo should be sharded"
    return paths


@pytest.fixture(scope="module")
def s3_zoo(s3_module, local_zoo) -> dict[str, str]:
    """The local zoo uploaded to s3://BUCKET/zoo/ (recursive put): {'base': uri, ...}."""
    root = Path(local_zoo["base"]).parent
    s3_module.fs.put(f"{root}/", f"{BUCKET}/zoo", recursive=True)
    local_files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert s3_module.keys("zoo") == local_files
    return {name: s3_module.uri(f"zoo/{name}") for name in local_zoo}


def ties_config(models: dict[str, str], experts: list[str] | None = None):
    experts = experts or [models[name] for name in EXPERTS]
    return parse_config(
        {
            "merge_method": "ties",
            "base_model": models["base"],
            "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in experts],
            "parameters": {"density": 0.5},
        }
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_complete_s3_model(s3: S3, prefix: str) -> dict:
    """The manifest exists, lists exactly the other objects, and each matches its hash and
    size. Returns the manifest."""
    keys = s3.keys(prefix)
    assert MANIFEST in keys, f"no manifest under {prefix}: {keys}"
    manifest = json.loads(s3.read(f"{prefix}/{MANIFEST}"))
    listed = {f["path"]: f for f in manifest["files"]}
    assert sorted([*listed, MANIFEST]) == keys
    for path, entry in listed.items():
        data = s3.read(f"{prefix}/{path}")
        assert s3.fs.info(f"{s3.bucket}/{prefix}/{path}")["size"] == entry["bytes"] == len(data), path
        assert sha256(data) == entry["sha256"], path
    return manifest


def break_expert(source: str, target: Path) -> str:
    """Copy an expert folder and write one NaN into NAN_TENSOR; returns the shard's name."""
    shutil.copytree(source, target)
    shard = json.loads((target / INDEX).read_text())["weight_map"][NAN_TENSOR]
    tensors = load_file(target / shard)
    tensors[NAN_TENSOR].view(-1)[7] = float("nan")
    save_file(tensors, target / shard, metadata={"format": "pt"})
    return shard


def mergeflow_cli() -> str:
    script = Path(sys.executable).parent / "mergeflow"
    return str(script) if script.exists() else shutil.which("mergeflow") or "mergeflow"


def run_cli(config: dict, out: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [mergeflow_cli(), "merge", str(path), "--out", out, "-q", "--shard-size", "100KB"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_config(base: str, experts: list[str]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in experts],
        "parameters": {"density": 0.5},
    }
