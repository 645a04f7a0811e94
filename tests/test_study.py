"""The study: grid enumeration and seeded expert choice, the findings drawn from a table, and the
flow on the micro zoo (Dask workers, cells cached so a second run only does what is missing)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from conftest import settled_task_runs, state_name

from flows.study import StudyRequest, study
from mergeflow.config import MergeConfig
from mergeflow.methods import METHODS
from mergeflow.report import findings, write_report
from mergeflow.study import (
    COLUMNS,
    REQUIRED_PARAMETER_VALUES,
    StudyGrid,
    candidates,
    choose_experts,
    enumerate_cells,
    largest_first,
)

TASKS = ["closed_book_qa", "definitions", "hypernyms", "sentiment", "text_genre", "topic"]


def index_of(families: dict[str, tuple[str, str]]) -> dict:
    return {
        "preset": "hand-made",
        "families": {
            name: {
                "stage": stage,
                "size": size,
                "base": f"/zoo/{name}",
                "multitask": f"/zoo/{name}-mt",
                "experts": {task: f"/zoo/{name}--{task}" for task in TASKS},
            }
            for name, (stage, size) in families.items()
        },
    }


def test_the_grid_is_every_family_count_seed_and_method_without_repeated_sets():
    index = index_of({"a-pt": ("pt", "2m"), "a-it": ("it", "2m")})
    grid = StudyGrid(expert_counts=[1, 2, 6, 8], methods=["average", "ties"], seeds=[0, 1, 2])
    cells = enumerate_cells(index, grid)
    assert {c.n_experts for c in cells} == {1, 2, 6}  # 8 capped at the 6 experts there are
    seen = [(c.family, c.method, c.experts) for c in cells]
    assert len(seen) == len(set(seen))
    # All experts can be chosen one way only: one set, whatever the seed.
    assert len([c for c in cells if c.n_experts == 6]) == 2 * 2
    # Methods are compared on the same experts.
    by_seed = {}
    for c in cells:
        by_seed.setdefault((c.family, c.n_experts, c.seed), set()).add(c.experts)
    assert all(len(sets) == 1 for sets in by_seed.values())
    assert all(len(c.experts) == c.n_experts for c in cells)


def test_every_registered_method_gets_only_cells_and_settings_it_can_merge():
    index = index_of({"a-pt": ("pt", "2m")})
    grid = StudyGrid(expert_counts=[1, 2, 4], methods=list(METHODS), seeds=[0])
    cells = enumerate_cells(index, grid)
    counts = {method: sorted(c.n_experts for c in cells if c.method == method) for method in METHODS}
    assert counts["model_stock"] == [2, 4] and counts["slerp"] == [1] and counts["ties"] == [1, 2, 4]
    for cell in cells:
        for parameters in candidates(cell.method):  # each a config the engine accepts
            MergeConfig(
                merge_method=cell.method,
                base_model=cell.base,
                models=[{"model": path} for _, path in cell.experts],
                parameters=parameters,
            )
    assert [p["t"] for p in candidates("slerp")] == REQUIRED_PARAMETER_VALUES["slerp"]["t"]
    assert [p["t"] for p in candidates("nearswap")] == [1e-4, 1e-3, 1e-2]


def test_workers_get_the_costliest_cells_first():
    index = index_of({"a-pt": ("pt", "2m")})
    grid = StudyGrid(expert_counts=[1, 2, 4], methods=["average", "task_arithmetic"], seeds=[0])
    order = [(c.method, c.n_experts) for c in largest_first(enumerate_cells(index, grid))]
    # task arithmetic tries 3 λ values: 3 merges + scorings per cell, averaging 1
    assert order == [
        ("task_arithmetic", 4),
        ("task_arithmetic", 2),
        ("average", 4),
        ("task_arithmetic", 1),
        ("average", 2),
        ("average", 1),
    ]


def test_seeded_choice_is_reproducible_and_seeds_differ():
    assert choose_experts(TASKS, 2, 0, "f") == choose_experts(list(reversed(TASKS)), 2, 0, "f")
    assert len({tuple(choose_experts(TASKS, 2, seed, "f")) for seed in range(6)}) > 1


def test_an_unknown_method_or_family_is_refused():
    with pytest.raises(ValueError, match="unknown method.*nonsense"):
        StudyGrid(methods=["nonsense"])
    with pytest.raises(Exception, match="families not in zoo preset 'hand-made': nope"):
        enumerate_cells(index_of({"a-pt": ("pt", "2m")}), StudyGrid(families=["nope"]))


def hand_table(held_in: dict, held_out: dict, multitask_held_out: dict) -> pd.DataFrame:
    """held_in/held_out: (family, stage, size, method, n) → normalised mean; one seed."""
    rows = []
    for (family, stage, size, method, n), value in held_in.items():
        for task, kind, score in (
            ("topic", "held_in", value),
            ("meronymy", "held_out", held_out[(family, stage, size, method, n)]),
        ):
            rows.append([family, stage, size, method, n, 0, "{}", "merged", task, "x", kind, score, score])
    for family, value in multitask_held_out.items():
        stage, size = next((k[1], k[2]) for k in held_in if k[0] == family)
        rows.append(
            [
                family,
                stage,
                size,
                "reference",
                6,
                -1,
                "{}",
                "multitask",
                "meronymy",
                "x",
                "held_out",
                value,
                value,
            ]
        )
        rows.append(
            [family, stage, size, "reference", 6, -1, "{}", "multitask", "topic", "x", "held_in", 1.0, 1.0]
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def paper_like(it_bonus: float, converge: bool) -> pd.DataFrame:
    held_in, held_out = {}, {}
    for size, scale in (("2m", 0.0), ("5m", 0.1)):
        for stage, bonus in (("pt", 0.0), ("it", it_bonus)):
            for method, gap in (("average", 0.0), ("ties", 0.2 if not converge or size == "2m" else 0.01)):
                for n in (1, 4):
                    family = f"tiny{size}-{stage}"
                    held_in[(family, stage, size, method, n)] = 0.6 + scale + bonus + gap - 0.05 * n
                    held_out[(family, stage, size, method, n)] = 0.9 + bonus + 0.05 * n
    return hand_table(held_in, held_out, {f"tiny{s}-{st}": 1.05 for s in ("2m", "5m") for st in ("pt", "it")})


def test_findings_follow_from_the_table():
    verdicts = {f.number: f.verdict for f in findings(paper_like(it_bonus=0.1, converge=True))}
    assert verdicts == {1: "reproduces", 2: "reproduces", 3: "reproduces", 4: "reproduces", 5: "reproduces"}
    verdicts = {f.number: f.verdict for f in findings(paper_like(it_bonus=-0.1, converge=False))}
    assert verdicts[1] == "does not reproduce" and verdicts[4] == "does not reproduce"
    # Finding 5 is about IT bases: here only the PT families' merges beat their multitask models.
    assert verdicts[5] == "does not reproduce"


def test_an_effect_smaller_than_the_seed_noise_decides_nothing():
    clear = paper_like(it_bonus=0.1, converge=True)
    # The same means from two seeds that differ by ±0.3: every effect of the table is smaller.
    merged = clear[clear.model == "merged"]
    noisy = pd.concat(
        [
            clear[clear.model != "merged"],
            merged.assign(normalised=merged.normalised + 0.3, seed=0),
            merged.assign(normalised=merged.normalised - 0.3, seed=1),
        ]
    )
    found = findings(noisy)
    assert {f.verdict for f in found} == {"within seed noise"}
    assert "seed noise ±0.424" in found[2].evidence  # two seeds 0.6 apart: std 0.6 / √2


def test_a_finding_that_needs_an_absent_axis_says_so(tmp_path):
    table = paper_like(0.1, True)
    one_size = table[table["size"] == "2m"]
    by_number = {f.number: f for f in findings(one_size)}
    assert by_number[2].verdict == "not testable here" and "one model size only" in by_number[2].evidence
    report = write_report(one_size, tmp_path).read_text()
    assert "not testable here" in report and "![](scores_vs_experts.png)" in report
    assert {p.name for p in tmp_path.glob("*.png")} >= {"scores_vs_experts.png", "pt_vs_it.png"}
    only_pt = {f.number: f for f in findings(table[table["stage"] == "pt"])}
    assert only_pt[5].verdict == "not testable here" and "no IT base" in only_pt[5].evidence


def cell_run_states(count: int) -> dict[str, list[str]]:
    """Task run name → the states of every run of that cell task, oldest first, once `count` cell
    runs are recorded."""

    def cells(runs):
        return [r for r in runs if r.name.startswith("cell-tinymicro")]

    states: dict[str, list[str]] = {}
    recorded = cells(settled_task_runs(lambda runs: len(cells(runs)) >= count))
    for run in sorted(recorded, key=lambda r: r.created):
        states.setdefault(run.name, []).append(state_name(run))
    return states


def test_a_study_is_named_after_its_preset_unless_named():
    assert StudyRequest(preset="demo", quick=True).name == "demo-quick"
    assert StudyRequest(preset="smol").name == "smol"
    assert StudyRequest(name="mine", preset="demo", quick=True).name == "mine"


def test_the_study_runs_on_dask_and_resumes_with_only_the_missing_cells(
    prefect_api, micro_zoo, tmp_path, monkeypatch
):
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(micro_zoo[0]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def request(methods):
        return StudyRequest(
            name="micro",
            preset="micro-test",
            workers=2,
            artifacts=str(tmp_path / "artifacts"),
            report_dir=str(tmp_path / "report"),
            tracking_uri=uri,
            grid=StudyGrid(expert_counts=[1, 2], methods=methods, seeds=[0, 1], held_out=["part_of_speech"]),
        )

    first = study(request(["average"]))
    assert first["cells"] == 2  # 2 families × 1 expert set (the micro zoo has one expert) × 1 method
    second = study(request(["average", "ties"]), return_state=True)
    assert second.is_completed() and second.result()["cells"] == 4
    # The second run computed only the ties cells; the average cells came from the cache.
    states = cell_run_states(count=6)
    assert len(states) == 4
    for name, runs in states.items():
        assert runs == (["Completed", "Cached"] if "-average-" in name else ["Completed"]), (name, runs)

    table = pd.read_parquet(tmp_path / "artifacts" / "studies" / "micro" / "results.parquet")
    assert set(table.method) == {"average", "ties", "reference"}
    assert set(table.model) == {"merged", "base", "expert:text_genre", "multitask"}
    merged = table[(table.model == "merged") & (table.kind == "held_in")]
    # One expert, averaged with nothing else, is the expert itself.
    assert merged[merged.method == "average"].normalised.tolist() == pytest.approx([1.0, 1.0])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Findings" in report and "not testable here" in report

    client = mlflow.MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mergeflow-study-micro"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # Children: one per cell and per family's multitask model, in each of the two runs.
    assert len(parents) == 2 and len(runs) == 2 + (2 + 2) + (4 + 2)


def test_report_command_writes_the_report_from_a_results_table(tmp_path):
    from typer.testing import CliRunner

    from mergeflow.cli import app

    results = tmp_path / "studies" / "hand" / "results.parquet"
    results.parent.mkdir(parents=True)
    paper_like(0.1, True).to_parquet(results)
    outcome = CliRunner().invoke(
        app, ["report", str(results), "--out", str(tmp_path / "report"), "--no-mlflow"]
    )
    assert outcome.exit_code == 0, outcome.output
    assert "finding 1: reproduces" in outcome.output and "finding 5: reproduces" in outcome.output
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "pt_vs_it.png").is_file()
