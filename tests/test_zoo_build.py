"""A micro zoo trained inside the test: the expert beats its base on its own task, the cache
makes a rebuild instant, and a changed hyper-parameter rebuilds only what depends on it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import MICRO
from safetensors import safe_open

from mergeflow.errors import ZooError
from mergeflow.eval.harness import evaluate
from mergeflow.zoo.build import RECORD, build_preset, built_models, device, load_index
from mergeflow.zoo.training import fast_bfloat16, resolved_precision


def test_an_expert_trained_here_beats_its_base_on_its_task(micro_zoo, monkeypatch):
    folder, index = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    family = index["families"]["tinymicro-pt-trained-here"]
    row = family["table"][0]
    assert row["task"] == "text_genre" and row["gain"] >= MICRO.min_gain
    # On the test split too, which the build never looked at.
    expert = evaluate(family["experts"]["text_genre"], ["text_genre"])["text_genre"]
    base = evaluate(family["base"], ["text_genre"])["text_genre"]
    assert expert > base + 0.05


def test_the_record_holds_the_hyper_parameters(micro_zoo):
    _, index = micro_zoo
    expert = index["families"]["tinymicro-it-trained-here"]["experts"]["text_genre"]
    record = json.loads((Path(expert) / RECORD).read_text())
    # The precision it really trained in: mixed only where the CPU multiplies bfloat16 natively.
    assert record["train"] == resolved_precision(MICRO.expert, device()).as_dict()
    assert record["train"]["precision"] == ("mixed-bfloat16" if fast_bfloat16(device()) else "float32")
    assert record["role"] == "expert" and record["task"] == "text_genre"
    with safe_open(f"{expert}/model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())


def test_a_rebuild_is_served_from_the_cache(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    again = build_preset(MICRO, progress=False)
    assert again["built_now"] == []
    assert load_index("micro-test")["families"].keys() == again["families"].keys()
    roles = sorted(r["role"] for r in built_models())
    # tokenizer, PT and IT bases, an expert and a multitask model per base
    assert roles == ["base", "base", "expert", "expert", "multitask", "multitask", "tokenizer"]


def test_a_changed_hyper_parameter_rebuilds_only_what_depends_on_it(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    changed = dataclasses.replace(MICRO, multitask=dataclasses.replace(MICRO.multitask, steps=10))
    index = build_preset(changed, progress=False)
    assert (
        sorted(index["built_now"]) == sorted(name for name in index["built_now"] if "--multitask-" in name)
        and len(index["built_now"]) == 2
    )


def test_an_expert_that_does_not_beat_its_base_fails_loudly(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    impossible = dataclasses.replace(MICRO, min_gain=1.0)
    with pytest.raises(
        ZooError, match=r"do not beat their base by 1.00: tinymicro-pt-trained-here/text_genre"
    ):
        build_preset(impossible, progress=False)


def test_an_unknown_preset_lists_the_presets():
    with pytest.raises(ZooError, match="presets: demo, smol, tiny"):
        build_preset("huge")


def test_a_task_override_retrains_only_that_tasks_experts_with_its_settings(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    override = dataclasses.replace(MICRO.expert, steps=12, lr=1e-3)
    # A 12-step expert need not beat its base: the gate is off, this test is about the cache.
    changed = dataclasses.replace(MICRO, expert_overrides={"text_genre": override}, min_gain=-1.0)
    index = build_preset(changed, progress=False)
    assert sorted(name.split("--")[1].rsplit("-", 1)[0] for name in index["built_now"]) == ["text_genre"] * 2
    for family in index["families"].values():
        record = json.loads((Path(family["experts"]["text_genre"]) / RECORD).read_text())
        assert record["train"] == dataclasses.asdict(override)
    build_preset(MICRO, progress=False)  # the index other tests read: MICRO's again (all cached)


def test_a_task_added_to_a_preset_with_a_pinned_tokenizer_trains_only_what_it_touches(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    short = dataclasses.replace(MICRO.expert, steps=12)
    # The gate is off: a 12-step expert need not beat its base; this test is about the cache.
    grown = dataclasses.replace(
        MICRO,
        tasks=("text_genre", "dialogue_act"),
        tokenizer_tasks=MICRO.tasks,
        expert_overrides={"dialogue_act": short},
        min_gain=-1.0,
    )
    index = build_preset(grown, progress=False)
    built = sorted(name.split("--")[1].rsplit("-", 1)[0] for name in index["built_now"])
    assert built == ["dialogue_act", "dialogue_act", "multitask", "multitask"]  # no tokenizer, no base
    for family in index["families"].values():
        scores = json.loads((Path(family["base"]) / "mergeflow-zoo-base-accuracy.json").read_text())
        assert set(scores) == {"text_genre", "dialogue_act"}
        assert [row["task"] for row in family["table"]] == ["text_genre", "dialogue_act"]
    build_preset(MICRO, progress=False)  # the index other tests read: MICRO's again (all cached)


@pytest.mark.slow
def test_the_demo_preset_builds_cold_and_its_experts_pass_the_gate(tmp_path, monkeypatch):
    """What `./dev demo` builds first (a few minutes on 2 cores). Its topic expert, once trained
    200 steps at lr 3e-3, gained +0.05 on one machine and lost 0.01 on the next: the
    Quickstart failed there. build_preset raises when an expert misses the gate."""
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(tmp_path))
    index = build_preset("demo", progress=False)
    (family,) = index["families"].values()
    gains = {row["task"]: row["gain"] for row in family["table"]}
    assert set(gains) == {"text_genre", "topic"}
    assert min(gains.values()) >= index["min_gain"] == 0.05
