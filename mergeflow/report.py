"""The study report: per-cell headline scores, the paper's findings checked against them, and
plots. Everything here is computed from the tidy table mergeflow.study produces, so the findings
follow from the numbers shown (tests feed it hand-made tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CELL = ["family", "stage", "size", "method", "n_experts", "seed"]
GROUP = ["family", "stage", "size", "method", "n_experts"]


@dataclass(frozen=True)
class Finding:
    number: int
    claim: str
    verdict: str  # "reproduces", "does not reproduce", "within seed noise", "not testable here"
    evidence: str
    figure: str


def cell_scores(table: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (and per reference model): mean normalised held-in and held-out."""
    rows = table[table.model.isin(["merged", "multitask"])]
    means = rows.pivot_table(index=[*CELL, "model"], columns="kind", values="normalised", aggfunc="mean")
    return means.reset_index().rename_axis(None, axis=1)


def seed_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds per (family, method, n_experts)."""
    merged = cells[cells.model == "merged"]
    summary = merged.groupby(GROUP)[["held_in", "held_out"]].agg(["mean", "std", "count"])
    summary.columns = [f"{kind}_{stat}" for kind, stat in summary.columns]
    return summary.fillna({"held_in_std": 0.0, "held_out_std": 0.0}).reset_index()


def seed_noise(summary: pd.DataFrame, kind: str) -> float:
    """The seed-to-seed standard deviation of one cell's score ("held_in" or "held_out"), pooled
    over the cells run with several seeds; 0 when there are none."""
    spread = summary.loc[summary[f"{kind}_count"] > 1, f"{kind}_std"]
    return float((spread**2).mean() ** 0.5) if len(spread) else 0.0


def _verdict(effect: float, noise: float) -> str:
    """An effect in the paper's direction (positive) counts only beyond the seed noise: the
    grids here are small, and a difference smaller than what another choice of experts moves a
    cell by says nothing either way."""
    if effect > noise:
        return "reproduces"
    if effect < -noise:
        return "does not reproduce"
    return "within seed noise"


def _in_every_case(verdicts: list[str]) -> str:
    """One verdict for a claim that must hold in every case."""
    if "does not reproduce" in verdicts:
        return "does not reproduce"
    return "reproduces" if all(v == "reproduces" for v in verdicts) else "within seed noise"


def _in_some_case(verdicts: list[str]) -> str:
    """One verdict for a claim that one case is enough to show ("can")."""
    if "reproduces" in verdicts:
        return "reproduces"
    if verdicts and all(v == "does not reproduce" for v in verdicts):
        return "does not reproduce"
    return "within seed noise"


def findings(table: pd.DataFrame) -> list[Finding]:
    cells = cell_scores(table)
    summary = seed_summary(cells)
    multitask = cells[cells.model == "multitask"].set_index("family")
    return [
        _instruction_tuned_helps(summary),
        _larger_is_easier(summary),
        _more_experts_generalise(summary),
        _methods_converge(summary),
        _beats_multitask(summary, multitask),
    ]


def _size_order(sizes) -> list[str]:
    def parameters(size: str) -> float:
        number = size.rstrip("mMbB")
        scale = 1e9 if size.lower().endswith("b") else 1e6
        try:
            return float(number) * scale
        except ValueError:
            return float("inf")

    return sorted(set(sizes), key=parameters)


def _instruction_tuned_helps(summary: pd.DataFrame) -> Finding:
    claim = "An instruction-tuned base makes merging work better, held-in and held-out."
    means = summary.groupby(["size", "stage"])[["held_in_mean", "held_out_mean"]].mean()
    pairs = [size for size in _size_order(summary["size"]) if {"pt", "it"} <= set(means.loc[size].index)]
    if not pairs:
        return Finding(1, claim, "not testable here", "no size has both a PT and an IT base", "pt_vs_it.png")
    noise_in, noise_out = seed_noise(summary, "held_in"), seed_noise(summary, "held_out")
    parts, verdicts = [], []
    for size in pairs:
        pt, it = means.loc[(size, "pt")], means.loc[(size, "it")]
        verdicts.append(_verdict(it.held_in_mean - pt.held_in_mean, noise_in))
        verdicts.append(_verdict(it.held_out_mean - pt.held_out_mean, noise_out))
        parts.append(
            f"{size}: IT held-in {it.held_in_mean:.3f} vs PT {pt.held_in_mean:.3f}, "
            f"held-out {it.held_out_mean:.3f} vs {pt.held_out_mean:.3f}"
        )
    evidence = "; ".join(parts) + f" (seed noise ±{noise_in:.3f} held-in, ±{noise_out:.3f} held-out)"
    return Finding(1, claim, _in_every_case(verdicts), evidence, "pt_vs_it.png")


def _larger_is_easier(summary: pd.DataFrame) -> Finding:
    claim = "Larger models are easier to merge (less held-in loss)."
    sizes = _size_order(summary["size"])
    if len(sizes) < 2:
        return Finding(
            2, claim, "not testable here", f"one model size only ({sizes[0]})", "spread_vs_size.png"
        )
    held_in = summary.groupby("size")["held_in_mean"].mean()
    smallest, largest = held_in[sizes[0]], held_in[sizes[-1]]
    noise = seed_noise(summary, "held_in")
    evidence = (
        f"mean normalised held-in {sizes[0]} {smallest:.3f} → {sizes[-1]} {largest:.3f} "
        f"(seed noise ±{noise:.3f})"
    )
    return Finding(2, claim, _verdict(largest - smallest, noise), evidence, "scores_vs_experts.png")


def _more_experts_generalise(summary: pd.DataFrame) -> Finding:
    claim = "Merging more experts improves held-out generalisation."
    counts = sorted(summary["n_experts"].unique())
    if len(counts) < 2:
        return Finding(
            3, claim, "not testable here", f"one expert count only ({counts[0]})", "scores_vs_experts.png"
        )
    held_out = summary.groupby("n_experts")["held_out_mean"].mean()
    first, last = held_out[counts[0]], held_out[counts[-1]]
    noise = seed_noise(summary, "held_out")
    evidence = (
        f"mean normalised held-out {counts[0]} expert(s) {first:.3f} → {counts[-1]} experts {last:.3f} "
        f"(seed noise ±{noise:.3f})"
    )
    return Finding(3, claim, _verdict(last - first, noise), evidence, "scores_vs_experts.png")


def _methods_converge(summary: pd.DataFrame) -> Finding:
    claim = "At large scale the methods converge: plain averaging does about as well as the rest."
    sizes = _size_order(summary["size"])
    if summary["method"].nunique() < 2:
        return Finding(4, claim, "not testable here", "one method only", "spread_vs_size.png")
    spread = spread_by_size(summary)
    if len(sizes) < 2:
        return Finding(
            4,
            claim,
            "not testable here",
            f"one model size only; held-in spread between methods {spread[sizes[0]]:.3f}",
            "spread_vs_size.png",
        )
    noise = seed_noise(summary, "held_in")
    evidence = (
        f"held-in spread between methods (max − min) {sizes[0]} {spread[sizes[0]]:.3f} "
        f"→ {sizes[-1]} {spread[sizes[-1]]:.3f} (seed noise ±{noise:.3f})"
    )
    verdict = _verdict(spread[sizes[0]] - spread[sizes[-1]], noise)
    return Finding(4, claim, verdict, evidence, "spread_vs_size.png")


def spread_by_size(summary: pd.DataFrame) -> pd.Series:
    """Per size: max − min over methods of the held-in mean, at each family's largest expert count."""
    largest = summary[summary.n_experts == summary.groupby("family")["n_experts"].transform("max")]
    per_family = largest.groupby(["size", "family"])["held_in_mean"].agg(lambda s: s.max() - s.min())
    return per_family.groupby("size").mean()


def _beats_multitask(summary: pd.DataFrame, multitask: pd.DataFrame) -> Finding:
    claim = "Merging many IT experts can beat the multitask baseline on held-out tasks."
    if multitask.empty:
        return Finding(
            5, claim, "not testable here", "no multitask baseline in the table", "merged_vs_multitask.png"
        )
    # The paper's claim is about IT bases; for PT bases it found the multitask model always
    # ahead, so a PT family beating its multitask model is no evidence for it.
    instruction_tuned = summary[summary.stage == "it"]
    if instruction_tuned.empty:
        return Finding(5, claim, "not testable here", "no IT base in the table", "merged_vs_multitask.png")
    noise = seed_noise(summary, "held_out")
    parts, verdicts = [], []
    for family, rows in instruction_tuned.groupby("family"):
        if family not in multitask.index:
            continue
        best = rows[rows.n_experts == rows.n_experts.max()]["held_out_mean"].max()
        baseline = float(multitask.loc[family, "held_out"])
        verdicts.append(_verdict(best - baseline, noise))
        parts.append(f"{family}: best merge {best:.3f} vs multitask {baseline:.3f}")
    # "can beat": one IT family where a merge clearly beats its multitask model is enough.
    evidence = "; ".join(parts) + f" (seed noise ±{noise:.3f})"
    return Finding(5, claim, _in_some_case(verdicts), evidence, "merged_vs_multitask.png")


# --- plots and the Markdown report ---------------------------------------------------------------


def write_report(table: pd.DataFrame, folder: Path, title: str = "mergeflow study") -> Path:
    """report.md and its PNG plots in `folder`; returns the Markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    cells = cell_scores(table)
    summary = seed_summary(cells)
    figures = plot_all(summary, cells, folder)
    lines = [
        f"# {title}",
        "",
        f"{table[CELL].drop_duplicates().shape[0]} cells and reference rows; "
        "scores are normalised as in the paper (held-in ÷ expert, held-out ÷ base), "
        "mean ± standard deviation over seeds.",
        "",
        "## Findings",
        "",
        "An effect counts, for or against a finding, only where it is larger than the seed noise: "
        "the standard deviation over seeds of one cell's score, pooled over the cells run with "
        "several seeds. Smaller effects are reported as within seed noise.",
        "",
    ]
    for finding in findings(table):
        lines += [
            f"{finding.number}. **{finding.claim}** — *{finding.verdict}*. {finding.evidence}. "
            f"![]({finding.figure})",
            "",
        ]
    lines += ["## Scores", "", "| family | method | experts | held-in | held-out |", "|---|---|---|---|---|"]
    for row in summary.sort_values(GROUP).itertuples():
        held_in = f"{row.held_in_mean:.3f} ± {row.held_in_std:.3f}"
        held_out = f"{row.held_out_mean:.3f} ± {row.held_out_std:.3f}"
        lines.append(f"| {row.family} | {row.method} | {row.n_experts} | {held_in} | {held_out} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_all(summary: pd.DataFrame, cells: pd.DataFrame, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = []
    families = sorted(summary["family"].unique())
    figure, axes = plt.subplots(2, len(families), figsize=(4.5 * len(families), 7), squeeze=False)
    for column, family in enumerate(families):
        rows = summary[summary.family == family]
        for row, kind in enumerate(("held_in", "held_out")):
            axis = axes[row][column]
            for method, part in rows.groupby("method"):
                part = part.sort_values("n_experts")
                axis.errorbar(
                    part.n_experts,
                    part[f"{kind}_mean"],
                    yerr=part[f"{kind}_std"],
                    marker="o",
                    capsize=3,
                    label=method,
                )
            axis.set_title(f"{family}")
            axis.set_xlabel("number of experts merged")
            axis.set_ylabel(f"normalised {kind.replace('_', '-')} score")
            axis.set_xticks(sorted(rows.n_experts.unique()))
            axis.grid(alpha=0.3)
    axes[0][0].legend(title="method")
    figure.tight_layout()
    figure.savefig(folder / "scores_vs_experts.png", dpi=110)
    names.append("scores_vs_experts.png")

    spread = spread_by_size(summary)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    sizes = _size_order(spread.index)
    axis.plot(sizes, [spread[s] for s in sizes], marker="o")
    axis.set_xlabel("model size")
    axis.set_ylabel("held-in spread between methods\n(max − min, most experts)")
    axis.set_title("do the methods converge with size?")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "spread_vs_size.png", dpi=110)
    names.append("spread_vs_size.png")

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    at_most = summary[summary.n_experts == summary.groupby("family")["n_experts"].transform("max")]
    for axis, kind in zip(axes, ("held_in", "held_out"), strict=True):
        pivot = at_most.pivot_table(index="method", columns=["size", "stage"], values=f"{kind}_mean")
        pivot.plot.bar(ax=axis, rot=0)
        axis.set_ylabel(f"normalised {kind.replace('_', '-')} (most experts)")
        axis.set_xlabel("method")
        axis.set_title(f"{kind.replace('_', '-')}: PT vs IT base")
        axis.get_legend().remove()
        axis.grid(alpha=0.3, axis="y")
    # One legend under both panels: inside either, it hid the last method's bars.
    handles = axes[0].get_legend_handles_labels()[0]
    labels = [f"{size} {stage.upper()}" for size, stage in pivot.columns]
    figure.legend(handles, labels, title="size, base", loc="lower center", ncol=len(labels), fontsize=8)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    figure.savefig(folder / "pt_vs_it.png", dpi=110)
    names.append("pt_vs_it.png")

    figure, axis = plt.subplots(figsize=(9, 3.8))
    multitask = cells[cells.model == "multitask"].set_index("family")["held_out"]
    for family in families:
        rows = summary[summary.family == family]
        best = rows.groupby("n_experts")["held_out_mean"].max()
        line = axis.plot(best.index, best.values, marker="o", label=f"{family}: best merge")[0]
        if family in multitask.index:
            axis.axhline(
                float(multitask[family]), color=line.get_color(), linestyle="--", label=f"{family}: multitask"
            )
    axis.set_xlabel("number of experts merged")
    axis.set_ylabel("normalised held-out score")
    axis.set_xticks(sorted(summary.n_experts.unique()))
    axis.set_title("best merge vs the multitask baseline")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: lines fill the axes
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "merged_vs_multitask.png", dpi=110)
    names.append("merged_vs_multitask.png")
    plt.close("all")
    return names
