"""Merging from and into S3, against a real SeaweedFS server on loopback (tests/s3_zoo.py).
Bad S3 input (missing models and buckets, wrong credentials, failed merges) is in
tests/reliability/test_bad_s3.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import but_the_model_card
from lora_adapters import write_adapter
from s3_zoo import (
    EXPERTS,
    SHARD_BYTES,
    assert_complete_s3_model,
    cli_config,
    load_folder,
    run_cli,
    ties_config,
)
from safetensors.torch import load
from vocabulary_zoo import write_zoo

from mergeflow.checkpoint import INDEX, MANIFEST, open_checkpoint
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import StorageError
from mergeflow.model_card import MODEL_CARD

# --- merging through S3 -----------------------------------------------------------------


def test_ties_merge_from_s3_into_s3_is_complete_and_matches_local(s3, local_zoo, s3_zoo, tmp_path):
    out = s3.uri("merged/ties")
    result = merge(ties_config(s3_zoo), out, max_shard_bytes=SHARD_BYTES)
    assert result.output == out

    manifest = assert_complete_s3_model(s3, "merged/ties")
    assert manifest == result.manifest
    keys = s3.keys("merged/ties")
    shards = [k for k in keys if k.endswith(".safetensors")]
    assert len(shards) > 1 and INDEX in keys and "config.json" in keys
    index = json.loads(s3.read(f"merged/ties/{INDEX}"))
    assert sorted(set(index["weight_map"].values())) == shards
    assert [m["ref"] for m in manifest["inputs"]["models"]] == [s3_zoo[e] for e in EXPERTS]
    assert manifest["inputs"]["base"]["ref"] == s3_zoo["base"]

    # The same merge read from local disk into a local folder gives the same bytes.
    local_out = tmp_path / "ties-local"
    merge(ties_config(local_zoo), str(local_out), max_shard_bytes=SHARD_BYTES)
    assert sorted(p.name for p in local_out.iterdir()) == keys
    for name in [*shards, INDEX, "config.json"]:
        assert s3.read(f"merged/ties/{name}") == (local_out / name).read_bytes(), name
    local_manifest = json.loads((local_out / MANIFEST).read_text())
    assert but_the_model_card(local_manifest) == but_the_model_card(manifest)
    assert s3_zoo["expert_0"] in s3.read(f"merged/ties/{MODEL_CARD}").decode()
    # Input hashes do not depend on where the inputs were read from.
    assert local_manifest["inputs"]["base"]["sha256"] == manifest["inputs"]["base"]["sha256"]
    local_hashes = [m["sha256"] for m in local_manifest["inputs"]["models"]]
    assert [m["sha256"] for m in manifest["inputs"]["models"]] == local_hashes

    merged = {}
    for shard in shards:
        merged.update(load(s3.read(f"merged/ties/{shard}")))
    local = load_folder(local_out)
    assert merged.keys() == local.keys() == set(index["weight_map"])
    for name, tensor in merged.items():
        assert torch.equal(tensor, local[name]), name
    base = load_folder(Path(local_zoo["base"]))
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert len(changed) > len(merged) // 2, "the merge should move most tensors away from the base"


def test_existing_s3_output_needs_overwrite_and_is_fully_replaced(s3, local_zoo):
    out = s3.uri("merged/overwrite")
    merge(ties_config(local_zoo), out, max_shard_bytes=SHARD_BYTES)
    before = s3.keys("merged/overwrite")
    old_shards = [k for k in before if k.startswith("model-")]
    assert len(old_shards) > 1 and INDEX in before
    old_manifest = s3.read(f"merged/overwrite/{MANIFEST}")

    with pytest.raises(StorageError) as err:
        merge(ties_config(local_zoo), out)
    message = str(err.value)
    assert out in message and "overwrite" in message and "\n" not in message
    assert s3.keys("merged/overwrite") == before, "a refused merge must not touch the old model"
    assert s3.read(f"merged/overwrite/{MANIFEST}") == old_manifest

    # With overwrite, a one-shard task_arithmetic merge replaces everything: no stale shards or index.
    config = parse_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": local_zoo["base"],
            "models": [{"model": local_zoo[e], "parameters": {"weight": 0.5}} for e in EXPERTS],
        }
    )
    result = merge(config, out, overwrite=True)
    assert s3.keys("merged/overwrite") == sorted(["config.json", "model.safetensors", "README.md", MANIFEST])
    manifest = assert_complete_s3_model(s3, "merged/overwrite")
    assert manifest == result.manifest and manifest["method"] == "task_arithmetic"


def test_output_prefix_is_not_confused_with_a_sibling_prefix(s3, local_zoo):
    """s3://b/merged/sib and s3://b/merged/sib-keep share a key prefix but are different
    folders: neither the existence check nor the overwrite may touch the sibling."""
    sibling = "merged/sib-keep"
    merge(ties_config(local_zoo), s3.uri(sibling), max_shard_bytes=SHARD_BYTES)
    sibling_keys = s3.keys(sibling)

    merge(ties_config(local_zoo), s3.uri("merged/sib"))  # no overwrite needed: the prefix is empty
    merge(ties_config(local_zoo), s3.uri("merged/sib"), overwrite=True)
    assert s3.keys("merged/sib") == sorted(["config.json", "model.safetensors", "README.md", MANIFEST])
    assert s3.keys(sibling) == sibling_keys
    assert_complete_s3_model(s3, sibling)


@pytest.mark.parametrize("emptied", ["objects-deleted", "folder-marker"])
def test_empty_s3_prefix_is_not_an_existing_output(s3, s3_server, local_zoo, emptied):
    """A prefix that holds no object is no output, as an empty local folder is none: the
    merge must not ask for overwrite. SeaweedFS keeps a folder entry after its objects are
    deleted one by one (as `aws s3 rm --recursive` does), and the AWS console's "Create
    folder" writes a zero-byte 'prefix/' marker; both make s3fs report the prefix as existing."""
    prefix = f"merged/emptied-{emptied}"
    client = s3_server.client()
    if emptied == "objects-deleted":
        merge(ties_config(local_zoo), s3.uri(prefix), max_shard_bytes=SHARD_BYTES)
        for key in s3.keys(prefix):
            client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")
    else:
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/", Body=b"")
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/").get("Contents", [])
    assert [o for o in listed if not o["Key"].endswith("/")] == [], "setup: no object left"

    result = merge(ties_config(local_zoo), s3.uri(prefix))  # no overwrite: there is nothing to replace
    assert assert_complete_s3_model(s3, prefix) == result.manifest


def test_aws_endpoint_url_is_used_when_mergeflow_endpoint_is_unset(s3, local_zoo, s3_zoo, monkeypatch):
    monkeypatch.delenv("MERGEFLOW_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    remote, local = open_checkpoint(s3_zoo["expert_0"]), open_checkpoint(local_zoo["expert_0"])
    assert remote.file_names == local.file_names
    assert {n: (e.shape, e.dtype) for n, e in remote.tensors.items()} == {
        n: (e.shape, e.dtype) for n, e in local.tensors.items()
    }


# --- CLI -------------------------------------------------------------------------------


def test_cli_merges_from_s3_into_s3(s3, s3_zoo, tmp_path):
    out = s3.uri("cli/ties")
    proc = run_cli(cli_config(s3_zoo["base"], [s3_zoo[e] for e in EXPERTS]), out, tmp_path, s3.env())
    assert proc.returncode == 0, proc.stderr
    assert out in proc.stdout
    manifest = assert_complete_s3_model(s3, "cli/ties")
    assert manifest["method"] == "ties"
    assert len([f for f in manifest["files"] if f["path"].endswith(".safetensors")]) > 1


def test_a_model_with_a_lora_adapter_both_in_s3_merges_as_from_local_disk(s3, local_zoo, s3_zoo, tmp_path):
    adapter = write_adapter(tmp_path / "lora", local_zoo["base"], ["model.layers.1.mlp.down_proj"])
    s3.fs.put(f"{adapter}/", f"{s3.bucket}/adapters/lora", recursive=True)
    outputs = {}
    for where, zoo, adapter_ref in (
        ("local", local_zoo, str(adapter)),
        ("s3", s3_zoo, s3.uri("adapters/lora")),
    ):
        experts = [zoo["expert_0"], f"{zoo['expert_1']}+{adapter_ref}"]
        out = tmp_path / where
        merge(ties_config(zoo, experts), str(out), max_shard_bytes=SHARD_BYTES)
        outputs[where] = json.loads((out / MANIFEST).read_text())
    assert but_the_model_card(outputs["s3"]) == but_the_model_card(outputs["local"])  # the same bytes
    assert outputs["s3"]["inputs"]["models"][1]["ref"] == f"{s3_zoo['expert_1']}+{s3.uri('adapters/lora')}"
    assert outputs["s3"]["inputs"]["models"][1]["sha256"] == outputs["local"]["inputs"]["models"][1]["sha256"]


def test_an_adapter_expert_published_to_s3_merges_as_its_adapted_model(s3, local_zoo, tmp_path):
    from mergeflow.experts import list_experts, publish_expert

    store = s3.uri("expert-store")
    adapter = write_adapter(tmp_path / "lora", local_zoo["base"], ["model.layers.1.mlp.down_proj"])
    published = publish_expert(adapter, "fam", "topic", store, base_model=Path(local_zoo["base"]))
    assert [e.ref for e in list_experts(store, "fam")] == [published.ref]
    stored = s3.keys(f"expert-store/experts/fam/topic/{published.sha256[:12]}")
    assert stored == sorted(["adapter_config.json", "adapter_model.safetensors", MANIFEST])
    outputs = {}
    for where, ref in (("s3", published.ref), ("local", f"{local_zoo['base']}+{adapter}")):
        config = ties_config(local_zoo, [local_zoo["expert_0"], ref])
        outputs[where] = merge(config, str(tmp_path / where), max_shard_bytes=SHARD_BYTES).manifest
    assert but_the_model_card(outputs["s3"]) == but_the_model_card(outputs["local"])
    assert outputs["s3"]["inputs"]["models"][1]["sha256"] == published.sha256
    assert outputs["local"]["inputs"]["models"][1]["sha256"] == published.sha256


def test_a_file_of_several_merges_keeps_its_named_ones_in_s3_and_reuses_them(s3, s3_zoo, tmp_path):
    import yaml

    from mergeflow.multimerge import plan_merges, run_merges

    stage = {
        "name": "stage",
        "merge_method": "slerp",
        "base_model": s3_zoo["base"],
        "models": [{"model": s3_zoo["expert_0"]}],
        "parameters": {"t": 0.4},
    }
    final = {"merge_method": "linear", "models": [{"model": "stage"}, {"model": s3_zoo["expert_1"]}]}
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all([stage, final]))
    plan = plan_merges(path, str(tmp_path / "out"), s3.uri("mid"))
    assert plan[0].out == s3.uri("mid/stage")
    assert all(run_merges(plan))
    assert_complete_s3_model(s3, "mid/stage")
    final_manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert final_manifest["inputs"]["models"][0]["ref"] == s3.uri("mid/stage")
    assert run_merges(plan_merges(path, str(tmp_path / "out"), s3.uri("mid"))) == [None, None]


def test_models_with_different_tokenizers_in_s3_merge_as_from_local_disk(s3, tmp_path):
    """tokenizer_source union: tokenizer files read from S3, embeddings realigned as they stream."""
    local = write_zoo(tmp_path / "vocab", torch.float32)
    s3.fs.put(f"{tmp_path / 'vocab'}/", f"{s3.bucket}/vocab", recursive=True)
    outputs = {}
    for where, zoo in (("local", local), ("s3", {name: s3.uri(f"vocab/{name}") for name in local})):
        config = {
            "merge_method": "task_arithmetic",
            "base_model": zoo["base"],
            "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}],
            "tokenizer_source": "union",
        }
        merge(parse_config(config), str(tmp_path / where))
        outputs[where] = {p.name: p.read_bytes() for p in (tmp_path / where).iterdir() if p.suffix != ".md"}
        outputs[where].pop(MANIFEST)  # names the inputs where they are
    assert outputs["s3"] == outputs["local"]
    assert len(json.loads(outputs["s3"]["tokenizer.json"])["added_tokens"]) == 6  # the union's
