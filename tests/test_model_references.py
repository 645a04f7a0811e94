"""Models named as mergekit configs name them: by Hugging Face repo id, found in the local
Hugging Face cache (never downloaded, their weight files' sha256 taken from the cache's blob
names), alone or with a LoRA adapter in mergekit's model+adapter form."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import but_the_model_card
from huggingface_hub import ModelCard
from lora_adapters import write_adapter

from mergeflow.checkpoint import HUB_REPO_ID
from mergeflow.hashing import model_sha256_at
from mergeflow.model_card import MODEL_CARD

ORG = "mergeflow-test"


def hub_cache_copy(
    folder: Path, cache: Path, weight_names: dict[str, str] | None = None, repo: str = "org/expert"
) -> Path:
    """`folder` laid out as huggingface_hub caches a download of `repo` at main: a snapshot of
    links into blobs/ named by sha256 (large files) or a 40-digit git blob id (small files).
    `weight_names` maps a weight file to the blob name to give it (default: its sha256).
    Returns the snapshot folder."""
    repo_folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot, blobs = repo_folder / "snapshots" / commit, repo_folder / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        content = file.read_bytes()
        if file.suffix == ".safetensors":
            blob = (weight_names or {}).get(file.name) or hashlib.sha256(content).hexdigest()
        else:
            blob = hashlib.sha1(content).hexdigest()
        shutil.copyfile(file, blobs / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_a_hugging_face_cache_names_the_sha256_of_its_weight_files(zoo, tmp_path):
    expert = Path(zoo["expert_0"])
    weights = sorted(expert.glob("*.safetensors"))
    true_names = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in weights}
    snapshot = hub_cache_copy(expert, tmp_path / "hub", true_names)
    assert model_sha256_at(str(snapshot)) == model_sha256_at(str(expert))
    # The name is taken, not the content hashed again: a blob named by another sha256 gives
    # another model hash, and no weight file of the snapshot enters the hash cache.
    other_names = true_names | {weights[0].name: "0" * 64}
    renamed = hub_cache_copy(expert, tmp_path / "hub-renamed", other_names)
    assert model_sha256_at(str(renamed)) != model_sha256_at(str(expert))
    cache = json.loads((Path(os.environ["MERGEFLOW_CACHE_DIR"]) / "file-hashes.json").read_text())
    hashed = [key for key in cache if key.startswith((str(snapshot), str(renamed)))]
    assert hashed and not [key for key in hashed if ".safetensors" in key]


def test_repo_ids_are_told_from_paths_as_mergekit_writes_them():
    assert HUB_REPO_ID.fullmatch("mistralai/Mistral-7B-v0.1")
    assert HUB_REPO_ID.fullmatch("org/name@main")["revision"] == "main"
    assert HUB_REPO_ID.fullmatch("org/name@" + "a" * 40)["repo"] == "org/name"
    for not_a_repo_id in ("base", "/models/base", "./org/name", "models/org/name", "s3://bucket/model"):
        assert not HUB_REPO_ID.fullmatch(not_a_repo_id)


def run_merge(config: dict, out: Path, hub_cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    path = cwd / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mergeflow.cli", "merge", str(path), "--out", str(out), "-q"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def test_a_merge_config_names_models_in_the_local_hugging_face_cache_by_repo_id(zoo, tmp_path):
    cache = tmp_path / "hub"
    for name in ("base", "expert_0", "expert_1"):
        hub_cache_copy(Path(zoo[name]), cache, repo=f"{ORG}/{name}")
    pinned = hashlib.sha1(f"{ORG}/expert_0".encode()).hexdigest()
    by_path = {"merge_method": "ties", "base_model": zoo["base"], "parameters": {"density": 0.5}}
    by_path["models"] = [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]
    by_repo_id = by_path | {"base_model": f"{ORG}/base"}
    by_repo_id["models"] = [{"model": f"{ORG}/expert_0@{pinned}"}, {"model": f"{ORG}/expert_1"}]
    manifests = []
    for config, out in ((by_path, tmp_path / "by-path"), (by_repo_id, tmp_path / "by-repo-id")):
        run = run_merge(config, out, cache, tmp_path)
        assert run.returncode == 0, run.stderr
        manifests.append(json.loads((out / "mergeflow-manifest.json").read_text()))
    by_path_manifest, by_repo_id_manifest = manifests
    assert but_the_model_card(by_repo_id_manifest) == but_the_model_card(by_path_manifest)
    cards = [ModelCard.load(out / MODEL_CARD) for out in (tmp_path / "by-path", tmp_path / "by-repo-id")]
    assert cards[0].data.base_model is None  # paths are no hub links
    assert cards[1].data.base_model == [f"{ORG}/base", f"{ORG}/expert_0", f"{ORG}/expert_1"]
    assert f"`{ORG}/expert_0@{pinned}`" in cards[1].text
    # The same models, named as the config names them with the commit each name resolved to;
    # the model hashes match, taken from the cache's blob names instead of hashing the weights.
    inputs, path_inputs = by_repo_id_manifest["inputs"], by_path_manifest["inputs"]
    refs = [m["ref"] for m in [inputs["base"], *inputs["models"]]]
    assert refs == [f"{ORG}/base", f"{ORG}/expert_0@{pinned}", f"{ORG}/expert_1"]
    commits = [m["hub_commit"] for m in [inputs["base"], *inputs["models"]]]
    assert commits == [
        hashlib.sha1(f"{ORG}/{name}".encode()).hexdigest() for name in ("base", "expert_0", "expert_1")
    ]
    assert "hub_commit" not in path_inputs["base"]
    hashes = [m["sha256"] for m in [inputs["base"], *inputs["models"]]]
    assert hashes == [m["sha256"] for m in [path_inputs["base"], *path_inputs["models"]]]


def test_a_repo_id_not_in_the_cache_is_refused_in_one_line_naming_the_cache(zoo, tmp_path):
    cache = tmp_path / "hub"
    hub_cache_copy(Path(zoo["base"]), cache, repo=f"{ORG}/base")
    config = {"merge_method": "average", "models": [{"model": f"{ORG}/base"}, {"model": f"{ORG}/absent"}]}
    run = run_merge(config, tmp_path / "out", cache, tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"error: model '{ORG}/absent': not found or not a folder (give a local path, file:// or s3:// "
        "URI of an HF checkpoint folder, or the repo id of a model in the local Hugging Face cache, "
        f"{cache}; mergeflow never downloads from a hub)"
    )
    assert not (tmp_path / "out").exists()


def test_a_model_and_its_lora_adapter_are_named_by_repo_id_as_mergekit_writes_them(zoo, tmp_path):
    cache = tmp_path / "hub"
    adapter = write_adapter(tmp_path / "lora", zoo["base"], ["model.layers.0.self_attn.q_proj"])
    hub_cache_copy(Path(zoo["base"]), cache, repo=f"{ORG}/base")
    hub_cache_copy(adapter, cache, repo=f"{ORG}/lora")
    outs = {}
    for name, ref in (("by-path", f"{zoo['base']}+{adapter}"), ("by-repo-id", f"{ORG}/base+{ORG}/lora")):
        config = {"merge_method": "average", "models": [{"model": zoo["expert_0"]}, {"model": ref}]}
        run = run_merge(config, tmp_path / name, cache, tmp_path)
        assert run.returncode == 0, run.stderr
        outs[name] = json.loads((tmp_path / name / "mergeflow-manifest.json").read_text())
    assert but_the_model_card(outs["by-repo-id"]) == but_the_model_card(outs["by-path"])
    assert outs["by-repo-id"]["inputs"]["models"][1]["ref"] == f"{ORG}/base+{ORG}/lora"
    card = ModelCard.load(tmp_path / "by-repo-id" / MODEL_CARD)
    assert card.data.base_model == [f"{ORG}/base", f"{ORG}/lora"]
    # Without the adapter the output differs: it was applied.
    plain = {"merge_method": "average", "models": [{"model": zoo["expert_0"]}, {"model": zoo["base"]}]}
    assert run_merge(plain, tmp_path / "plain", cache, tmp_path).returncode == 0
    plain_manifest = json.loads((tmp_path / "plain" / "mergeflow-manifest.json").read_text())
    assert but_the_model_card(plain_manifest) != but_the_model_card(outs["by-path"])


def test_an_adapter_repo_id_not_in_the_cache_is_refused_in_one_line(zoo, tmp_path):
    config = {
        "merge_method": "average",
        "models": [{"model": zoo["base"]}, {"model": f"{zoo['base']}+{ORG}/lora"}],
    }
    run = run_merge(config, tmp_path / "out", tmp_path / "hub", tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"error: model '{zoo['base']}+{ORG}/lora': adapter '{ORG}/lora': not found or not a folder (give a "
        "local path, file:// or s3:// URI of a PEFT adapter folder, or the repo id of one in the local "
        "Hugging Face cache)"
    )
    assert not (tmp_path / "out").exists()
