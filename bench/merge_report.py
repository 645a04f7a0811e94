"""The merge benchmark's report: the table of rows that bench/merge_bench.py measured, the
targets' summary, and what each column means, printed and written as Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from machine import machine_line
from results_history import write_keeping_history

METRIC_NOTE = (
    "Times: median of the runs (fastest–slowest), each a fresh process; mergeflow s includes "
    "sha256 of every input for the manifest's lineage with an empty hash cache, mergeflow s, hashes "
    "cached is a further run of the same merge with those hashes known (a repeated merge of the "
    "same experts); the speed-up is the former's. "
    "max|Δ|: largest |mergeflow − mergekit| over all entries; rel: the largest, over tensors, of "
    "max|Δ| / max|base tensor|; >1ulp: fraction of entries differing by more than one unit in the "
    "last place of the output dtype (at the larger of the two values); δstd: std of (merged − base) "
    "of mergeflow / of mergekit. mergeflow computes in float32, mergekit in the config dtype, so "
    "bf16 outputs differ by about an ulp (task_arithmetic). For ties, mergekit trims bf16-rounded "
    "task vectors and keeps exactly k entries, breaking the many ties at the k-th |τ| arbitrarily, "
    "while mergeflow trims exact float32 task vectors and keeps all ties: the kept sets differ near "
    "the threshold and a changed elected sign there gives differences up to ~|τ| (several % of "
    "entries in bf16; with --dtype float32 only entries tied at the threshold differ). SCE's "
    "selection by variance across the experts differs the same way at its threshold. RAM decides "
    "|τ| > ε on float32 task vectors, mergekit on bf16-rounded ones: near ε an entry's count of "
    "changing models differs, and with it the whole entry (bit-identical with --dtype float32). "
    "arcee_fusion: mergekit samples 1M entries of larger tensors for its quartiles, mergeflow "
    "takes the exact ones. DARE and "
    "DELLA draw different random masks in each tool (only δstd is meaningful there). "
    "lineage floor: CPU-seconds of sha256 alone (reading not counted) over every input file and "
    "every file of mergeflow's output, plus a fresh Python importing the engine, over the cores "
    "(bench/lineage_floor.py); "
    "no merge that records the inputs' hashes can be faster here. In brackets, the same with the "
    "inputs' hashes remembered."
)


HEADER = (
    "method", "experts", "mergeflow s", "mergekit s", "speed-up", "mergeflow s, hashes cached",
    "mergekit s / 10", "lineage floor s (hashes cached)",
    "mergeflow RSS MB", "mergekit RSS MB", "RSS ratio", "max|Δ|", "rel", ">1ulp", "δstd mf/mk",
)  # fmt: skip


def cells(row: dict) -> list[str]:
    mf, mk, cmp = row["mergeflow"], row.get("mergekit"), row.get("compare")
    out = [row["method"], str(row["experts"]), wall_time(mf)]
    cached = wall_time(row["mergeflow_hashes_cached"])
    floor = f"{row['floor']['floor_s']:.2f} ({row['floor']['floor_cached_s']:.2f})"
    if mk is None:
        return [*out, "-", "-", cached, "-", floor, f"{mf['peak_rss_mb']:.0f}", *["-"] * 6]
    out += [wall_time(mk), f"{row['speedup']:.1f}×", cached, f"{mk['seconds'] / 10:.2f}", floor]
    out += [f"{mf['peak_rss_mb']:.0f}"]
    out += [f"{mk['peak_rss_mb']:.0f}", f"{row['rss_ratio']:.1f}×"]
    if not row["comparable"]:
        return [*out, "n/c (random masks differ)", "n/c", "n/c", f"{cmp['delta_std_ratio']:.3f}"]
    out += [f"{cmp['max_abs_diff']:.2e}", f"{cmp['max_abs_diff_rel_base']:.2e}"]
    return [*out, f"{100 * cmp['frac_beyond_1ulp']:.4f}%", f"{cmp['delta_std_ratio']:.4f}"]


def wall_time(tool: dict) -> str:
    """The median, and the fastest and slowest run when there were several."""
    median, (low, high) = tool["seconds"], tool["seconds_range"]
    return f"{median:.1f}" if len(tool["runs"]) == 1 else f"{median:.1f} ({low:.1f}–{high:.1f})"


def summary_lines(rows: list[dict]) -> list[str]:
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rss = [f"{r['experts']}→{r['mergeflow']['peak_rss_mb']:.0f}" for r in rows if r["method"] == method]
        lines.append(f"mergeflow peak RSS MB by experts, {method}: {', '.join(rss)}")
    peak = max(r["mergeflow"]["peak_rss_mb"] for r in rows)
    ok = "met" if peak <= 1000 else "MISSED"
    lines.append(f"target mergeflow peak RSS ≤ 1000 MB: {ok} (max {peak:.0f})")
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    if speedups:
        ok = "met" if min(speedups) >= 10 else "MISSED"
        lines.append(f"target speed-up ≥ 10×: {ok} (min {min(speedups):.1f}×, max {max(speedups):.1f}×)")
        beyond = [
            f"{r['method']} {r['experts']}"
            for r in rows
            if "mergekit" in r and r["mergekit"]["seconds"] / 10 < r["floor"]["floor_s"]
        ]
        lines.append(
            "10× needs less time than the lineage floor (cannot be met here while every input is hashed): "
            + (", ".join(beyond) or "none")
        )
    return lines


def write_results(rows: list[dict], info: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "merge_bench.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    spec, machine = info["zoo"]["spec"], info["machine"]
    md = [
        "# mergeflow vs mergekit",
        "",
        f"`{info['command']}`",
        "",
        f"{machine_line(machine)} {machine['ram_gib']} GiB RAM, {machine['platform']}. "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f" (git {info['mergeflow_git']}).",
        "",
        "Zoo: " + ", ".join(f"{k}={v}" for k, v in spec.items()),
        "",
        "| " + " | ".join(h.replace("|", "\\|") for h in HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(cells(r)) + " |" for r in rows),
        "",
        *(f"- {line}" for line in summary_lines(rows)),
        "",
        METRIC_NOTE,
        "",
    ]
    write_keeping_history(results / "merge_bench.md", "\n".join(md))


def print_table(rows: list[dict]) -> None:
    table = [list(HEADER), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for line in table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
