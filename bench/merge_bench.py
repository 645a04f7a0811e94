"""Benchmark mergeflow against mergekit on a generated Llama zoo.

For every (method, expert count) one mergekit YAML is written and given unchanged to both
tools, each run as a subprocess, `--repeats` times taking turns. Reported: the median wall
time (fastest and slowest in brackets), the highest peak RSS of the whole process tree (the sum
over the tree sampled every 50 ms, or the exact peak of its largest process from /usr/bin/time
when that is higher) and how far the two outputs are apart, tensor by tensor.

    .venv/bin/python bench/merge_bench.py                      # 166M zoo, 4 methods, 2 and 8 experts
    .venv/bin/python bench/merge_bench.py --experts 8 --methods ties --repeats 1   # a quick look
    .venv/bin/python bench/merge_bench.py --hidden 256 --layers 2 --vocab 4096 --intermediate 512
    .venv/bin/python bench/merge_bench.py --methods ties --lora-rank 16   # experts as base+LoRA
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from lineage_floor import import_cpu_seconds, lineage_floor
from machine import describe_machine
from merge_report import METRIC_NOTE, print_table, summary_lines, write_results
from output_diff import compare
from safetensors.torch import save_file

from mergeflow.safetensors_io import read_header
from mergeflow.storage import locate
from mergeflow.zoo.generated import BENCH_166M, GeneratedZooSpec, build_generated_zoo

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
METHODS = ("ties", "dare_ties", "task_arithmetic", "linear")
# The tools draw different random masks: outputs are not comparable.
RANDOM_MASKS = {"dare_ties", "dare_linear", "della", "della_linear"}
SAMPLE_SECONDS = 0.05
# mergekit's DARE seed. Not the zoo's seed (0): torch's global generator seeded alike replays the
# stream that generated the zoo, and the bf16 bernoulli masks then correlate with the weights.
MERGEKIT_SEED = 12345


def zoo_for(spec: GeneratedZooSpec, root: Path) -> tuple[Path, GeneratedZooSpec, float]:
    """A zoo under `root` with `spec`, or the same spec and more experts; else built as
    root/<spec hash>. Returns its folder, its spec and the build seconds (0 when cached)."""
    for marker in sorted(root.glob("*/zoo.json")):
        cached = GeneratedZooSpec(**json.loads(marker.read_text())["spec"])
        if cached.num_experts >= spec.num_experts and replace(cached, num_experts=spec.num_experts) == spec:
            return marker.parent, cached, 0.0
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    folder = root / key
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    build_generated_zoo(folder, spec)
    return folder, spec, time.perf_counter() - started


LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def lora_adapters(zoo: Path, spec: GeneratedZooSpec, rank: int) -> list[Path]:
    """One PEFT LoRA adapter of `rank` per expert, on every linear layer of the zoo's base
    (random bf16 factors, α = 2r), as PEFT saves them; written once under the zoo."""
    folders = [zoo / f"lora-r{rank}" / f"expert_{i}" for i in range(spec.num_experts)]
    shapes = {}
    for file in (zoo / "base").glob("*.safetensors"):
        shapes |= {entry.name: entry.shape for entry in read_header(locate(str(file)))}
    for i, folder in enumerate(folders):
        if (folder / "adapter_config.json").exists():
            continue
        generator = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(spec.num_layers):
            for module in LORA_MODULES:
                name = f"model.layers.{layer}.{module}"
                rows, columns = shapes[f"{name}.weight"]
                a, b = (
                    torch.randn(rank, columns, generator=generator),
                    torch.randn(rows, rank, generator=generator),
                )
                tensors[f"base_model.model.{name}.lora_A.weight"] = (a * 0.02).to(torch.bfloat16)
                tensors[f"base_model.model.{name}.lora_B.weight"] = (b * 0.02).to(torch.bfloat16)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        targets = sorted({m.split(".")[-1] for m in LORA_MODULES})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folders


def merge_config(
    method: str, n: int, zoo: Path, dtype: str, adapters: list[Path] | None = None, layers: int = 0
) -> dict[str, Any]:
    """One mergekit YAML for both tools, with every default that matters spelled out. With
    `adapters`, expert i is the base with adapter i applied (mergekit's model+adapter form).
    passthrough is a frankenmerge: overlapping windows of 3/4 of the `layers`, one per expert."""
    experts = [str(zoo / f"expert_{i}") for i in range(n)]
    if adapters:
        experts = [f"{zoo / 'base'}+{adapter}" for adapter in adapters[:n]]
    if method == "passthrough":
        window = max(1, layers * 3 // 4)
        starts = [round(i * (layers - window) / max(n - 1, 1)) for i in range(n)]
        sources = [
            [{"model": e, "layer_range": [s, s + window]}] for e, s in zip(experts, starts, strict=True)
        ]
        return {"merge_method": "passthrough", "slices": [{"sources": s} for s in sources], "dtype": dtype}
    if method == "linear":  # plain average of the experts; the base is not among the models
        models = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
        return {"merge_method": "linear", "models": models, "parameters": {"normalize": True}, "dtype": dtype}
    if method in ("nuslerp", "multislerp", "karcher"):  # base: an origin; one of karcher's points
        models = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
        if method == "karcher":
            models = [{"model": e} for e in experts]
        return {"merge_method": method, "base_model": str(zoo / "base"), "models": models, "dtype": dtype}
    if method == "sce":  # no weights or λ; half of the entries kept, by variance across the experts
        models = [{"model": e} for e in experts]
        return {
            "merge_method": "sce",
            "base_model": str(zoo / "base"),
            "models": models,
            "parameters": {"select_topk": 0.5},
            "dtype": dtype,
        }
    if method in ("ram", "ramplus_tl", "arcee_fusion"):  # no weights; arcee_fusion: run with --experts 1
        parameters = {"epsilon": 0.01} if method != "arcee_fusion" else {}  # ε near the zoo's |τ|
        if method == "ramplus_tl":
            parameters |= {"r": 0.1, "alpha": 0.2}
        return {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "models": [{"model": e} for e in experts],
            "parameters": parameters,
            "dtype": dtype,
        }
    per_model = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
    if method.startswith("della"):
        per_model["epsilon"] = 0.15
    shared: dict[str, Any] = {
        "ties": {"normalize": True, "rescale": False, "lambda": 1.0},
        "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0},
        "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0},
        "della": {"normalize": True, "rescale": True, "lambda": 1.0},
        "della_linear": {"normalize": False, "rescale": True, "lambda": 1.0},
        "task_arithmetic": {"normalize": False, "lambda": 1.0 / n},
    }[method]
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
        "parameters": shared,
        "dtype": dtype,
    }


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`; wall seconds, peak RSS (MB) of the process tree and exit status."""
    # /usr/bin/time reports the exact peak of the tool's largest process (a spike between two
    # samples included). Not our own wait4: a child forked from this big process keeps its
    # parent's RSS in ru_maxrss across exec; /usr/bin/time is small.
    maxrss = log.with_suffix(".maxrss")
    wrapper = ["/usr/bin/time", "-f", "%M", "-o", str(maxrss)] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*wrapper, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    finished = threading.Event()

    def sample() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(psutil.Error):
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            if finished.wait(SAMPLE_SECONDS):
                return

    # Sampled on a thread, so the wall time ends when the tool does, not at the next sample.
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - started
    finished.set()
    sampler.join()
    largest = int(maxrss.read_text().split()[-1]) * 1024 if wrapper and maxrss.exists() else 0
    return {"seconds": seconds, "peak_rss_mb": max(peak, largest) / 1e6, "sampled_tree_mb": peak / 1e6,
            "largest_process_mb": largest / 1e6, "rc": proc.returncode, "log": str(log)}  # fmt: skip


def summarise(runs: list[dict]) -> dict[str, Any]:
    """One tool's successful runs of one config: the median wall time, the highest peak RSS,
    every run."""
    seconds = sorted(r["seconds"] for r in runs)
    return {
        "seconds": statistics.median(seconds),
        "seconds_range": [seconds[0], seconds[-1]],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }


def run_checked(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """run_measured, raising with the end of the log when the tool fails."""
    run = run_measured(cmd, log, env)
    if run["rc"] != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed (rc {run['rc']}):\n{tail}")
    return run


def bench_one(
    method: str, n: int, zoo: Path, spec: GeneratedZooSpec, args: argparse.Namespace, imports_cpu: float
) -> dict:
    adapters = lora_adapters(zoo, spec, args.lora_rank) if args.lora_rank else None
    label = f"{method}, LoRA r{args.lora_rank} experts" if adapters else method
    work = Path(args.workdir) / (f"{method}-lora-r{args.lora_rank}-{n}" if adapters else f"{method}-{n}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(merge_config(method, n, zoo, spec.dtype, adapters, spec.num_layers), sort_keys=False)
    )
    threads = ["--threads", str(args.threads)] if args.threads else []
    row: dict[str, Any] = {"method": label, "experts": n, "config": str(config)}
    mf_cmd = [str(BIN / "mergeflow"), "merge", str(config), "--out", str(work / "mergeflow"), "-q"]
    mf_cmd += ["--overwrite", "--shard-size", str(spec.shard_bytes), *threads]
    itemsize = getattr(torch, spec.dtype).itemsize
    mk_cmd = [str(BIN / "mergekit-yaml"), str(config), str(work / "mergekit"), "--no-copy-tokenizer"]
    mk_cmd += ["--no-write-model-card", "--quiet", "--random-seed", str(MERGEKIT_SEED)]
    mk_cmd += ["--out-shard-size", str(spec.shard_bytes // itemsize)]
    mk_cmd += ["-j", str(args.threads)] if args.threads else []
    # mergekit applies adapters with PEFT and saves each adapted model here first; emptied
    # before every run, as mergeflow applies them on every run.
    lora_cache = work / "mergekit-lora-cache"
    mk_cmd += ["--lora-merge-cache", str(lora_cache)] if adapters else []
    tools = {"mergeflow": mf_cmd} | ({} if args.skip_mergekit else {"mergekit": mk_cmd})
    # Once more with the hashes this attempt's first run left in its cache: the merge without
    # sha256 of the inputs, as in a repeated merge of the same experts.
    tools["mergeflow_hashes_cached"] = mf_cmd
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    # Untimed: compiles numba's kernels when their cache is stale (kernels.py changed since the
    # last merge), 3-6 s and up to ~650 MB that a user pays once, not on every merge.
    env = dict(os.environ, MERGEFLOW_CACHE_DIR=str(work / "hash-cache-warm-up"))
    run_checked(mf_cmd, work / "mergeflow-warm-up.log", env)
    # The tools take turns, so a slow spell of this noisy machine falls on both.
    for attempt in range(args.repeats):
        for tool, cmd in tools.items():
            # A fresh hash cache per run: mergeflow's timing includes sha256 of every input file.
            env = dict(os.environ, MERGEFLOW_CACHE_DIR=str(work / f"hash-cache-{attempt}"))
            shutil.rmtree(lora_cache, ignore_errors=True)
            runs[tool].append(run_checked(cmd, work / f"{tool}-{attempt}.log", env))
    for tool, measured in runs.items():
        row[tool] = summarise(measured)
    row["floor"] = lineage_floor(config, work / "mergeflow", imports_cpu)
    if "mergekit" in row:
        row["speedup"] = row["mergekit"]["seconds"] / row["mergeflow"]["seconds"]
        row["rss_ratio"] = row["mergekit"]["peak_rss_mb"] / row["mergeflow"]["peak_rss_mb"]
        row["compare"] = compare(work / "mergeflow", work / "mergekit", zoo / "base")
        row["comparable"] = method not in RANDOM_MASKS
    if not args.keep_outputs:
        for tool in ("mergeflow", "mergekit", lora_cache.name):
            shutil.rmtree(work / tool, ignore_errors=True)
    return row


def environment(spec: GeneratedZooSpec, zoo: Path, build_seconds: float) -> dict[str, Any]:
    return {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": describe_machine()
        | {
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {p: version(p) for p in ("torch", "mergekit", "mergeflow")},
        "mergeflow_git": git_state(),
        "zoo": {"path": str(zoo), "spec": asdict(spec), "build_seconds": round(build_seconds, 1)},
    }


def git_state() -> str:
    """HEAD and the tree of mergeflow/ in it, '+dirty' when mergeflow/ has uncommitted edits."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(BENCH.parent), *args], capture_output=True, text=True).stdout

    head, tree = (git("rev-parse", "--short", rev).strip() or "?" for rev in ("HEAD", "HEAD:mergeflow"))
    return f"{head} (mergeflow/ tree {tree}{'+dirty' if git('status', '--porcelain', 'mergeflow') else ''})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated mergekit method names")
    p.add_argument("--experts", default="2,8", help="comma-separated expert counts")
    p.add_argument("--skip-mergekit", action="store_true", help="run mergeflow only")
    p.add_argument("--hidden", type=int, default=BENCH_166M.hidden_size)
    p.add_argument("--layers", type=int, default=BENCH_166M.num_layers)
    p.add_argument("--vocab", type=int, default=BENCH_166M.vocab_size)
    p.add_argument("--intermediate", type=int, default=BENCH_166M.intermediate_size)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    p.add_argument("--dtype", default=BENCH_166M.dtype, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--shard-size", type=float, default=BENCH_166M.shard_bytes / 1e6, help="shard MB")
    p.add_argument("--zoo-root", default=str(BENCH / ".zoo"), help="zoos are cached here by spec hash")
    p.add_argument("--workdir", default=str(BENCH / ".out"), help="configs, logs and outputs")
    p.add_argument("--results", default=str(BENCH / "results"), help="where merge_bench.md/.json go")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both tools")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged models")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="experts as base+LoRA adapter of this rank (every linear layer)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each tool per config, taking turns; median reported"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    counts = sorted({int(n) for n in args.experts.split(",")})
    spec = replace(
        BENCH_166M, hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab,
        intermediate_size=args.intermediate, num_heads=args.heads or max(1, args.hidden // 64),
        num_experts=max(counts), dtype=args.dtype, shard_bytes=int(args.shard_size * 1e6),
    )  # fmt: skip
    zoo, spec, build_seconds = zoo_for(spec, Path(args.zoo_root))
    built = f"built in {build_seconds:.0f}s" if build_seconds else "cached"
    print(f"zoo {zoo} ({built})", flush=True)
    info, rows = environment(spec, zoo, build_seconds), []
    imports_cpu = import_cpu_seconds()
    for n in counts:
        for method in methods:
            print(f"{method} with {n} experts ...", flush=True)
            rows.append(bench_one(method, n, zoo, spec, args, imports_cpu))
    if git_state() != info["mergeflow_git"]:  # someone committed or edited mergeflow/ meanwhile
        info["mergeflow_git"] += f", at the end {git_state()}"
    write_results(rows, info, Path(args.results))
    print_table(rows)
    for line in summary_lines(rows):
        print(line)
    print(METRIC_NOTE)
    print(f"results: {Path(args.results) / 'merge_bench.md'} and merge_bench.json")


if __name__ == "__main__":
    main()
