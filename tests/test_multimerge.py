"""Files of several merges, as mergekit-multi runs them: named merges into an intermediate
folder, a model named like a merge read from its output, merges reused while they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import load_folder
from typer.testing import CliRunner

from mergeflow.cli import app
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.errors import ConfigError
from mergeflow.multimerge import plan_merges, run_merges
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return build_generated_zoo(tmp_path_factory.mktemp("multi"), GeneratedZooSpec(num_experts=2, seed=7))


def stage(zoo) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}],
        "parameters": {"t": 0.3},
    }


def final(zoo, first: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": zoo["base"],
        "models": [{"model": first}, {"model": zoo["expert_1"]}],
        "parameters": {"density": 0.5},
    }


def write(path: Path, *documents: dict) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "mergeflow-manifest.json").read_text())


def test_a_named_merge_is_read_by_the_final_one_as_a_model(zoo, tmp_path):
    path = write(tmp_path / "multi.yaml", final(zoo, "slerped"), {"name": "slerped"} | stage(zoo))
    result = CliRunner().invoke(
        app, ["merge", str(path), "-o", str(tmp_path / "out"), "-I", str(tmp_path / "mid"), "-q"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("merge 'slerped': merged ") and lines[1].startswith("the final merge: merged ")
    # the same as the two merges run one after the other
    merge(parse_config(stage(zoo)), str(tmp_path / "by-hand-1"))
    merge(parse_config(final(zoo, str(tmp_path / "by-hand-1"))), str(tmp_path / "by-hand-2"))
    for got, expected in (("mid/slerped", "by-hand-1"), ("out", "by-hand-2")):
        got_tensors, expected_tensors = load_folder(tmp_path / got), load_folder(tmp_path / expected)
        assert sorted(got_tensors) == sorted(expected_tensors)
        assert all((got_tensors[n] == expected_tensors[n]).all() for n in expected_tensors), got
    models = manifest_of(tmp_path / "out")["inputs"]["models"]
    assert models[0]["ref"] == str(tmp_path / "mid" / "slerped")
    assert models[0]["sha256"] == manifest_of(tmp_path / "by-hand-2")["inputs"]["models"][0]["sha256"]


def test_a_file_run_again_reuses_what_still_holds_and_redoes_what_changed(zoo, tmp_path):
    path = write(tmp_path / "multi.yaml", {"name": "slerped"} | stage(zoo), final(zoo, "slerped"))
    plan = plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid"))
    assert [step.name for step in plan] == ["slerped", None] and plan[1].reads == ("slerped",)
    assert all(run_merges(plan))
    written = {
        f: (tmp_path / f / "mergeflow-manifest.json").stat().st_mtime_ns for f in ("mid/slerped", "out")
    }

    assert run_merges(plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid"))) == [None, None]
    assert written == {f: (tmp_path / f / "mergeflow-manifest.json").stat().st_mtime_ns for f in written}

    # the final merge edited: the named one still holds; the final output is replaced only when asked
    edited = final(zoo, "slerped") | {"parameters": {"density": 0.7}}
    write(path, {"name": "slerped"} | stage(zoo), edited)
    plan = plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid"))
    with pytest.raises(Exception, match="the final merge: .*output already exists"):
        run_merges(plan)
    first, second = run_merges(plan, overwrite=True)
    assert first is None and second is not None
    assert manifest_of(tmp_path / "out")["config"]["parameters"] == {"density": 0.7}

    # the named merge edited: it is redone, and so is the final one that reads it
    write(path, {"name": "slerped"} | stage(zoo) | {"parameters": {"t": 0.6}}, edited)
    results = run_merges(plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid")), overwrite=True)
    assert all(results)


def test_refusals_name_the_file_and_the_document(zoo, tmp_path):
    def refusal(*documents) -> str:
        path = write(tmp_path / "bad.yaml", *documents)
        with pytest.raises(ConfigError) as refused:
            plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid"))
        return str(refused.value).removeprefix(f"{path}: ")

    named = {"name": "a"} | stage(zoo)
    assert refusal(named, named, final(zoo, "a")) == "document 2 ('a'): another merge is named 'a'"
    assert refusal(stage(zoo), final(zoo, "a")) == "document 2: only the final merge goes unnamed"
    assert refusal(named) == "every merge has a name; leave the final one unnamed (it goes to the output)"
    assert refusal({"name": "x/y"} | stage(zoo), final(zoo, "a")) == (
        "document 1 ('x/y'): name: a merge's name is a folder name, got 'x/y'"
    )
    assert refusal(named | {"colour": 1}, final(zoo, "a")).startswith(
        "document 1 ('a'): unknown key 'colour'"
    )
    cycle = [{"name": "a"} | final(zoo, "b"), {"name": "b"} | final(zoo, "a"), final(zoo, "a")]
    assert refusal(*cycle) == "the merges read each other's outputs in a cycle: 'a' → 'b' → 'a'"


def test_a_failing_merge_is_named_and_a_single_merge_file_hints_at_the_folder(zoo, tmp_path):
    path = write(
        tmp_path / "multi.yaml",
        {"name": "broken"} | final(zoo, str(tmp_path / "absent")),
        final(zoo, "broken"),
    )
    result = CliRunner().invoke(
        app, ["merge", str(path), "-o", str(tmp_path / "out"), "-I", str(tmp_path / "mid")]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: merge 'broken': ") and str(tmp_path / "absent") in result.output
    assert not (tmp_path / "mid" / "broken").exists() and not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {path}: 2 YAML documents, as in a mergekit-multi file of several merges: run it with "
        "an intermediate folder for the named ones (mergeflow merge -I DIR, or mergeflow.multimerge)"
    )


def test_a_slice_whose_base_is_a_merge_reads_its_output(zoo, tmp_path):
    sources = [{"model": zoo["expert_1"], "layer_range": [0, 2]}]
    sliced = {
        "merge_method": "task_arithmetic",
        "base_model": zoo["base"],
        "slices": [{"base_model": "slerped", "sources": sources}],
    }
    path = write(tmp_path / "multi.yaml", {"name": "slerped"} | stage(zoo), sliced)
    planned = plan_merges(path, str(tmp_path / "out"), str(tmp_path / "mid"))
    assert [p.name for p in planned] == ["slerped", None]
    assert planned[1].reads == ("slerped",)
    assert planned[1].config.slices[0].base_model == str(tmp_path / "mid" / "slerped")
