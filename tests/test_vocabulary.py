"""Models with different tokenizers, merged as mergekit's `tokenizer_source` asks: the output's
vocabulary (union, base or a model's), every model's embeddings and output head realigned to
it, checked against a plain reference written from mergekit's rules (tokenizer/embed.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_folder
from lora_adapters import write_adapter
from reference_merge import reference_merge
from safetensors.torch import save_file
from vocabulary_zoo import (
    BASE,
    EXPERT_0,
    TOKENS,
    UNION,
    VOCAB_TENSORS,
    VOCABS,
    with_paths,
    write_model,
    write_zoo,
)

from mergeflow import realigned_tensor
from mergeflow.checkpoint import open_checkpoint
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.realigned_tensor import realign, row_spans
from mergeflow.safetensors_io import TensorFileReader
from mergeflow.vocabulary import plan_vocabulary


@pytest.fixture(
    scope="module",
    params=[torch.float32, torch.bfloat16, torch.float64],
    ids=["float32", "bfloat16", "float64"],
)
def zoo(request, tmp_path_factory) -> dict[str, str]:
    return write_zoo(tmp_path_factory.mktemp("vocab"), request.param)


def reference_realigned(
    zoo: dict[str, str],
    names: list[str],
    out_words: list[str],
    rows: int,
    base: str | None,
    tokens: dict | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """mergekit's rules, whole tensors in torch: a token a model lacks takes the row its entry
    in `tokens` gives (mergekit's tokenizer.tokens, with the models by name), else the only
    holder's row, else the base's, else the holders' mean (in the models' dtype, as mergekit
    sums); a forced entry replaces every model's row; pad rows are the mean of the model's rows
    (float64, mergeflow's convention)."""
    states = {n: load_folder(zoo[n]) for n in names}
    ids = {n: {w: i for i, w in enumerate(VOCABS[n])} for n in names}
    realigned = {n: dict(states[n]) for n in names}
    tokens = tokens or {}
    for tensor in VOCAB_TENSORS:
        defaults = {}
        for word in out_words:
            rows_of = {n: states[n][tensor][ids[n][word]] for n in names if word in ids[n]}
            given = tokens.get(word)
            if given is not None and (given.get("force") or len(rows_of) < len(names)):
                source = given["source"]
                if source == {"kind": "zero"}:
                    defaults[word] = torch.zeros_like(states[names[0]][tensor][0])
                elif isinstance(source, str):
                    defaults[word] = states[source][tensor][ids[source][word]]
                else:
                    model = source["model"]
                    at = source["token_id"] if "token_id" in source else ids[model][source["token"]]
                    defaults[word] = states[model][tensor][at]
                continue
            if len(rows_of) == len(names):
                continue
            if len(rows_of) == 1:
                defaults[word] = next(iter(rows_of.values()))
            elif base in rows_of:
                defaults[word] = rows_of[base]
            else:
                total = torch.zeros_like(next(iter(rows_of.values())))
                for row in rows_of.values():
                    total = total + row
                defaults[word] = total / len(rows_of)
        for n in names:
            old = states[n][tensor]
            new = torch.zeros((rows, old.shape[1]), dtype=old.dtype)
            for i, word in enumerate(out_words):
                forced = tokens.get(word, {}).get("force", False)
                new[i] = old[ids[n][word]] if word in ids[n] and not forced else defaults[word]
            new[len(out_words) :] = new[: len(out_words)].double().mean(0).to(old.dtype)
            realigned[n][tensor] = new
    return realigned


def opened_and_realigned(zoo, names, source, tokenizer="base", pad=None):
    checkpoints = [open_checkpoint(zoo[n]) for n in names]
    tokenizer_checkpoint = checkpoints[names.index(tokenizer)] if tokenizer in names else None
    vocabulary = plan_vocabulary(source, checkpoints, checkpoints[0], tokenizer_checkpoint, pad)
    base = checkpoints[0] if names[0] == "base" else None
    realign(checkpoints, vocabulary, lambda tensor: base)
    return checkpoints, vocabulary


@pytest.mark.parametrize("pad", [None, 4, 16])
@pytest.mark.parametrize("span_gap_bytes", [256 << 10, 1], ids=["spans", "runs"])
def test_union_realigns_every_model_as_mergekit_does(zoo, pad, span_gap_bytes, monkeypatch):
    monkeypatch.setattr(realigned_tensor, "SPAN_GAP_BYTES", span_gap_bytes)  # rows read together, or runs
    names = ["base", "expert_0", "expert_1"]
    checkpoints, vocabulary = opened_and_realigned(zoo, names, "union", pad=pad)
    rows = len(UNION) if pad is None else -(-len(UNION) // pad) * pad
    assert (vocabulary.tokens, vocabulary.rows) == (len(UNION), rows)
    expected = reference_realigned(zoo, names, UNION, rows, base="base")
    reader = TensorFileReader()
    for name, checkpoint in zip(names, checkpoints, strict=True):
        assert checkpoint.config["vocab_size"] == rows
        for tensor in VOCAB_TENSORS:
            entry = checkpoint.tensors[tensor]
            whole = torch.from_numpy(reader.read(entry, 0, entry.numel).copy()).view(
                expected[name][tensor].dtype
            )
            assert torch.equal(whole.reshape(entry.shape), expected[name][tensor]), (name, tensor)
            # any range, read alone, has the same bits: rows cut anywhere
            for start, count in [(5, 17), (16 * 3 - 1, 16 * 4 + 2), (entry.numel - 20, 20)]:
                part = torch.from_numpy(reader.read(entry, start, count).copy()).view(whole.dtype)
                assert torch.equal(part, whole.reshape(-1)[start : start + count]), (name, tensor, start)
    reader.close()


def test_rows_near_each_other_are_read_together_in_any_order():
    spans = row_spans(np.array([7, 3, 4, 5, 40, 6, 41, 100]), gap=4)
    assert [(low, high) for low, high, _ in spans] == [(3, 8), (40, 42), (100, 101)]
    assert [list(taken) for _, _, taken in spans] == [[1, 2, 3, 5, 0], [4, 6], [7]]
    reversed_rows = np.arange(1000)[::-1]  # a vocabulary in the opposite order: one read
    assert [(low, high) for low, high, _ in row_spans(reversed_rows, gap=1)] == [(0, 1000)]
    assert row_spans(np.array([], dtype=np.int64), gap=4) == []


def test_without_a_base_a_token_two_models_hold_takes_their_mean(zoo):
    names = ["expert_0", "expert_1"]
    checkpoints, vocabulary = opened_and_realigned(zoo, names, "union", tokenizer="expert_0")
    out_words = [*EXPERT_0, "f"]  # the foundation (expert_0) keeps its own ids
    expected = reference_realigned(zoo, names, out_words, len(out_words), base=None)
    reader = TensorFileReader()
    for name, checkpoint in zip(names, checkpoints, strict=True):
        entry = checkpoint.tensors["lm_head.weight"]
        whole = torch.from_numpy(reader.read(entry, 0, entry.numel).copy()).view(
            expected[name]["lm_head.weight"].dtype
        )
        assert torch.equal(whole.reshape(entry.shape), expected[name]["lm_head.weight"]), name
    reader.close()


def union_config(zoo: dict[str, str], **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}],
        "parameters": {"lambda": 0.5},
        "tokenizer_source": "union",
    } | extra


def test_a_union_merge_matches_the_reference_and_loads_with_its_tokenizer(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge(parse_config(union_config(zoo)), str(out))
    names = ["base", "expert_0", "expert_1"]
    realigned = reference_realigned(zoo, names, UNION, len(UNION), base="base")
    expected = reference_merge(
        "task_arithmetic", realigned["base"], [realigned["expert_0"], realigned["expert_1"]], lam=0.5
    )
    merged = load_folder(out)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.float(), expected[name], rtol=1e-2, atol=1e-2, msg=name)
        if tensor.dtype == torch.float32:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == {w: i for i, w in enumerate(UNION)}
    assert tokenizer.added_tokens_decoder[len(UNION) - 1].special  # <|im_start|> stays special
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(UNION)
    assert model(**tokenizer("a e f <|im_start|>", return_tensors="pt")).logits.shape[-1] == len(UNION)


def test_a_slice_of_its_own_base_fills_the_rows_from_it(zoo, tmp_path):
    # mergekit's rule: the embeddings (first slice) and the head (last slice) take a token the
    # others share from that slice's base
    sources = [{"model": zoo[m], "layer_range": [0, 1]} for m in ("expert_0", "expert_1", "base")]
    config = union_config(zoo, models=[], slices=[{"base_model": zoo["expert_0"], "sources": sources}])
    merge(parse_config(config), str(tmp_path / "out"))
    names = ["base", "expert_0", "expert_1"]
    realigned = reference_realigned(zoo, names, UNION, len(UNION), base="expert_0")
    assert any(  # a token whose row the base decides: the rule is tested
        not torch.equal(realigned[n][t], by_global[n][t])
        for by_global in [reference_realigned(zoo, names, UNION, len(UNION), base="base")]
        for n in names
        for t in VOCAB_TENSORS
    )
    expected = reference_merge(
        "task_arithmetic", realigned["expert_0"], [realigned["expert_1"], realigned["base"]], lam=0.5
    )
    from transformers import AutoTokenizer

    # the union takes the models' new tokens in the order the config names them: rows by token
    ids = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    order = [ids[word] for word in UNION]
    merged = load_folder(tmp_path / "out")
    for name in VOCAB_TENSORS:
        tensor = merged[name][order]
        torch.testing.assert_close(tensor.float(), expected[name], rtol=1e-2, atol=1e-2, msg=name)
        if tensor.dtype == torch.float32:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_base_and_a_model_as_source_keep_their_vocabulary(zoo, tmp_path):
    """`base`: the experts' extra tokens are dropped and expert_1's rows reordered; a model as
    source: its tokenizer files are the output's, as they are."""
    for source, words, files_of in [
        ("base", BASE, "base"),
        ("model:" + zoo["expert_0"], EXPERT_0, "expert_0"),
    ]:
        out = tmp_path / source.replace("/", "_")
        merge(parse_config(union_config(zoo, tokenizer_source=source)), str(out))
        assert load_folder(out)["lm_head.weight"].shape[0] == len(words)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == len(words)
        assert (out / "tokenizer.json").read_bytes() == (Path(zoo[files_of]) / "tokenizer.json").read_bytes()


def test_models_sharing_a_tokenizer_are_not_realigned(zoo, tmp_path):
    """union, base or a model over experts of one tokenizer: the same bits as no source at all,
    and the base's tokenizer files."""
    same = {"base": zoo["base"]}
    for seed, name in enumerate(["expert_0", "expert_1"], start=7):
        write_model(tmp_path / name, BASE, seed, torch.float32)
        same[name] = str(tmp_path / name)
    plain = tmp_path / "plain"
    merge(parse_config(union_config(same, tokenizer_source=None)), str(plain))
    for source in ["union", "base", {"source": "union", "pad_to_multiple_of": 2}]:
        out = tmp_path / json.dumps(source).strip('"{}').replace(" ", "_").replace(":", "")
        extra = (
            {"tokenizer": source, "tokenizer_source": None}
            if isinstance(source, dict)
            else {"tokenizer_source": source}
        )
        merge(parse_config(union_config(same, **extra)), str(out))
        for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]:
            assert (out / name).read_bytes() == (plain / name).read_bytes(), (source, name)


def test_union_realigns_slices_and_adapted_heads_too(zoo, tmp_path):
    """A sliced config merges the realigned embeddings as the whole-model one does; an expert
    given as model+adapter (a LoRA on lm_head) is realigned with its adapter applied."""
    whole = tmp_path / "whole"
    merge(parse_config(union_config(zoo)), str(whole))
    sources = [{"model": zoo[n], "layer_range": [0, 1]} for n in ("expert_0", "expert_1")]
    sliced = tmp_path / "sliced"
    merge(parse_config(union_config(zoo, models=[], slices=[{"sources": sources}])), str(sliced))
    assert load_folder(sliced).keys() == load_folder(whole).keys()
    for name, tensor in load_folder(sliced).items():
        assert torch.equal(tensor, load_folder(whole)[name]), name

    adapter = write_adapter(tmp_path / "adapter", zoo["expert_0"], ["lm_head"], seed=3)
    applied = tmp_path / "expert_0_applied"
    shutil.copytree(zoo["expert_0"], applied)
    state = load_folder(applied)
    factors = load_folder(adapter)
    lora_a = factors["base_model.model.lm_head.lora_A.weight"]
    lora_b = factors["base_model.model.lm_head.lora_B.weight"]
    head = state["lm_head.weight"]
    state["lm_head.weight"] = (head.float() + (lora_b @ lora_a) * 2.0).to(head.dtype)  # s = 8 / 4
    save_file(state, applied / "model.safetensors", metadata={"format": "pt"})
    outputs = {}
    for label, expert in [("adapter", f"{zoo['expert_0']}+{adapter}"), ("applied", str(applied))]:
        models = [{"model": expert}, {"model": zoo["expert_1"]}]
        merge(parse_config(union_config(zoo, models=models)), str(tmp_path / f"merged-{label}"))
        outputs[label] = load_folder(tmp_path / f"merged-{label}")
    if head.dtype == torch.float32:  # bf16: PEFT rounds once, this reference twice
        for name, tensor in outputs["adapter"].items():
            assert torch.equal(tensor, outputs["applied"][name]), name
    assert not torch.equal(outputs["adapter"]["lm_head.weight"], load_folder(whole)["lm_head.weight"])


def test_a_union_of_one_tokenizer_does_not_parse_it(zoo, tmp_path):
    """The files' bytes decide it: transformers (seconds to import) is not loaded."""
    same = {"base": zoo["base"]}
    for seed, name in enumerate(["expert_0", "expert_1"], start=7):
        write_model(tmp_path / name, BASE, seed, torch.float32)
        same[name] = str(tmp_path / name)
    (tmp_path / "merge.yaml").write_text(json.dumps(union_config(same)))
    script = (
        "import sys; from mergeflow.config import load_config; from mergeflow.engine import merge; "
        f"merge(load_config({str(tmp_path / 'merge.yaml')!r}), {str(tmp_path / 'out')!r}); "
        "print('transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        Path(zoo["base"]) / "tokenizer.json"
    ).read_bytes()


def test_token_sources_place_the_rows_they_name(zoo, tmp_path):
    out = tmp_path / "merged"
    block = {"source": "union", "tokens": with_paths(TOKENS, zoo)}
    merge(parse_config(union_config(zoo, tokenizer_source=None, tokenizer=block)), str(out))
    words = [*UNION, "<tool>"]  # a token the config names and no model has comes last
    names = ["base", "expert_0", "expert_1"]
    realigned = reference_realigned(zoo, names, words, len(words), base="base", tokens=TOKENS)
    expected = reference_merge(
        "task_arithmetic", realigned["base"], [realigned["expert_0"], realigned["expert_1"]], lam=0.5
    )
    merged = load_folder(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.float(), expected[name], rtol=1e-2, atol=1e-2, msg=name)
        if tensor.dtype == torch.float32:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert merged["lm_head.weight"][words.index("e")].abs().max() == 0  # forced to zero
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).get_vocab() == {w: i for i, w in enumerate(words)}
