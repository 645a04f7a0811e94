"""The `mergeflow` command line. Errors print as one line, never a traceback."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

import mergeflow
from mergeflow.cli.common import friendly_errors, parse_size
from mergeflow.cli.mlops import expert_app, promote_command, report_command, webhook_app
from mergeflow.cli.stack import stack_app

app = typer.Typer(help="Merge fine-tuned expert models, evaluate and register them.", no_args_is_help=True)
zoo_app = typer.Typer(help="Build and list model zoos.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@app.command("merge")
@friendly_errors
def merge_command(
    config: Annotated[Path, typer.Argument(help="mergekit-style YAML config.", exists=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder: path, file:// or s3:// URI.")],
    threads: Annotated[int | None, typer.Option(help="Threads (default: all cores).", min=1)] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (*.bin) checkpoints.")] = False,
    allow_crimes: Annotated[
        bool,
        typer.Option(
            "--allow-crimes",
            help="Merge models whose config.json names other architectures, where their tensors match "
            "(mergekit's flag).",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 500MB, 2GB.")] = "2GB",
    work_memory: Annotated[str, typer.Option(help="Working memory for chunks of all models.")] = "16MB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes.")] = False,
    intermediate_dir: Annotated[
        str | None,
        typer.Option(
            "--intermediate-dir",
            "-I",
            help="For a file of several merges (mergekit-multi's): where the named ones go.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Open and check every input, say what the merge would write, write nothing."
        ),
    ] = False,
) -> None:
    """Merge the models in CONFIG into OUT, streaming tensor by tensor.

    With --intermediate-dir, a file of several merges runs as mergekit-multi runs it."""
    if dry_run:
        _dry_run(
            config,
            out,
            intermediate_dir,
            threads,
            allow_pickle,
            allow_crimes,
            overwrite,
            parse_size(shard_size),
        )
        return
    from mergeflow.file_hashes import start_hashing_inputs

    start_hashing_inputs(config)  # while the engine loads
    from mergeflow.methods.kernels import load_cached_kernels_without_compiler_setup

    load_cached_kernels_without_compiler_setup(on_compile=None if quiet else _say_compiling_once)
    from mergeflow.config import load_config
    from mergeflow.engine import merge
    from mergeflow.errors import ConfigError

    options = dict(
        threads=threads,
        allow_pickle=allow_pickle,
        allow_crimes=allow_crimes,
        max_shard_bytes=parse_size(shard_size),
        work_bytes=parse_size(work_memory),
        progress=not quiet,
    )
    if intermediate_dir is not None:
        from mergeflow.multimerge import plan_merges, run_merges

        plan = plan_merges(config, out, intermediate_dir)
        try:
            run_merges(plan, overwrite=overwrite, on_step=_say_step, **options)
        except ConfigError as exc:
            raise ConfigError(f"{config}: {exc}") from None
        return
    merge_config = load_config(config)
    try:
        result = merge(merge_config, out, overwrite=overwrite, **options)
    except ConfigError as exc:
        # The checks that need the models (a slice's layer range, the tokenizer block) name the
        # field; load_config's name the file too, so these do here as well.
        raise ConfigError(f"{config}: {exc}") from None
    _say_merged(result)


def _dry_run(
    config, out, intermediate_dir, threads, allow_pickle, allow_crimes, overwrite, max_shard_bytes
) -> None:
    from mergeflow.config import load_config
    from mergeflow.errors import ConfigError
    from mergeflow.merge_plan import check_merge

    if intermediate_dir is not None:
        raise ConfigError(
            f"{config}: --dry-run checks one merge: the later merges of a file of several read "
            "outputs that do not exist yet"
        )
    merge_config = load_config(config)
    try:
        check = check_merge(
            merge_config,
            out,
            threads=threads,
            allow_pickle=allow_pickle,
            allow_crimes=allow_crimes,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
        )
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    shards = f"{check.shards} shard{'s' if check.shards != 1 else ''}"
    details = [f"{check.layers} layers"] if check.layers is not None else []
    if check.vocabulary_rows is not None:
        details.append(f"embeddings realigned to a vocabulary of {check.vocabulary_rows} rows")
    typer.echo(
        f"checked: {merge_config.method.name} of {check.models} models would write {check.tensors} tensors "
        f"({check.bytes / 1e6:.1f} MB) in {shards} into {check.output}"
        + "".join(f"; {d}" for d in details)
        + "; nothing written"
    )


def _say_merged(result) -> None:
    typer.echo(
        f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) with "
        f"{result.manifest['method']} into {result.output} in {result.seconds:.1f}s"
    )


def _say_step(step, result) -> None:
    if result is None:
        typer.echo(f"{step.label}: reused {step.out} (it holds this merge of the same inputs)")
    else:
        typer.echo(f"{step.label}: ", nl=False)
        _say_merged(result)


@functools.cache
def _say_compiling_once() -> None:
    # Otherwise the first merge after an install or upgrade just stalls for a few seconds.
    # tqdm.write: above the progress bar, not through it.
    from tqdm import tqdm

    tqdm.write(
        "compiling mergeflow's merge kernels (after an install or upgrade, once: 3-6 s per method)",
        sys.stderr,
    )


@app.command("methods")
def methods_command() -> None:
    """List the merge methods with their parameters and defaults."""
    from mergeflow.methods import ALIASES, METHODS

    width = max(len(p.name) for method in METHODS.values() for p in method.params)
    for method in METHODS.values():
        aliases = [a for a, target in ALIASES.items() if target == method.name]
        alias_text = f" (alias: {', '.join(aliases)})" if aliases else ""
        typer.secho(f"{method.name}{alias_text}", bold=True)
        typer.echo(f"  {method.summary}")
        typer.echo(f"  {method.formula}")
        for p in method.params:
            default = "required" if p.default is None else f"default {p.default}"
            scope = "per model" if p.per_model else "global"
            typer.echo(f"    {p.name:<{width}} {scope:<9} {default:<14} {p.description}")


@zoo_app.command("generate")
@friendly_errors
def zoo_generate(
    folder: Annotated[Path, typer.Argument(help="Where to write base/ and expert_*/.")],
    experts: Annotated[int, typer.Option(min=1)] = 4,
    hidden_size: Annotated[int, typer.Option(min=8)] = 64,
    layers: Annotated[int, typer.Option(min=1)] = 2,
    vocab_size: Annotated[int, typer.Option(min=8)] = 256,
    intermediate_size: Annotated[int, typer.Option(min=8)] = 128,
    heads: Annotated[int, typer.Option(min=1)] = 4,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 200MB.")] = "1GB",
    seed: int = 0,
) -> None:
    """Generate a random Llama base and experts with conflicting task vectors (untrained)."""
    from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

    spec = GeneratedZooSpec(
        hidden_size=hidden_size,
        num_layers=layers,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size,
        num_heads=heads,
        num_experts=experts,
        dtype=dtype,
        shard_bytes=parse_size(shard_size),
        seed=seed,
    )
    paths = build_generated_zoo(folder, spec)
    typer.echo(f"generated {len(paths) - 1} experts and a base under {folder}")


@zoo_app.command("build")
@friendly_errors
def zoo_build(
    preset: Annotated[
        str,
        typer.Option(
            help="tiny (small models trained here), demo (tiny's 2M PT base with 2 experts, what "
            "./dev demo builds) or smol (SmolLM2-135M)."
        ),
    ] = "tiny",
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Models trained at once, each in a process of its own on its share of the cores "
            "(default: one per core, at most 4; 1 on a GPU). The models are the same whatever the number.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Build (or reuse from the cache) a zoo preset and print its experts' accuracies.

    A preset is bases, one expert per held-in task and a multitask model per base."""
    from mergeflow.zoo import zoo_dir
    from mergeflow.zoo.build import build_preset
    from mergeflow.zoo.parallel import default_workers

    try:
        index = build_preset(preset, progress=not quiet, workers=workers or default_workers())
    finally:
        print_zoo_table(preset)
    typer.echo(
        f"zoo preset {preset}: {len(index['built_now'])} models built now; "
        f"index {zoo_dir()}/presets/{preset}.json"
    )


def print_zoo_table(preset: str) -> None:
    from mergeflow.zoo import zoo_dir

    path = zoo_dir() / "presets" / f"{preset}.json"
    if not path.is_file():
        return
    import json

    index = json.loads(path.read_text())
    typer.echo(f"{'family':<26}{'task':<18}{'base':>7}{'expert':>8}{'gain':>7}{'multitask':>11}")
    for family in index["families"].values():
        for row in family["table"]:
            mark = "" if row["gain"] >= index["min_gain"] else "  <- below the required gain"
            typer.echo(
                f"{row['family']:<26}{row['task']:<18}{row['base']:>7.3f}{row['expert']:>8.3f}"
                f"{row['gain']:>+7.3f}{row['multitask']:>11.3f}{mark}"
            )


@zoo_app.command("list")
@friendly_errors
def zoo_list() -> None:
    """List built presets and every cached zoo model."""
    from mergeflow.zoo import zoo_dir
    from mergeflow.zoo.build import built_models

    presets = sorted((zoo_dir() / "presets").glob("*.json"))
    typer.echo(f"zoo folder: {zoo_dir()}")
    typer.echo("presets: " + (", ".join(p.stem for p in presets) or "none built (mergeflow zoo build)"))
    for record in built_models():
        detail = record.get("task") or record.get("stage") or ""
        typer.echo(
            f"  {record['role']:<10}{detail:<18}{record['bytes'] / 1e6:>8.1f} MB  {Path(record['path']).name}"
        )


@app.command("eval")
@friendly_errors
def eval_command(
    model: Annotated[Path, typer.Argument(help="A local HF model folder.")],
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Task name (repeat); default: all.")
    ] = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
) -> None:
    """Score MODEL on tasks by log-likelihood multiple choice; print accuracy per task."""
    from mergeflow.errors import DataError
    from mergeflow.eval.harness import evaluate
    from mergeflow.eval.tasks import TASKS

    names = task or list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    scores = evaluate(model, names, split, progress=True)
    typer.echo(f"{'task':<20}{'kind':<10}{'category':<24}{'accuracy':>9}")
    for name, value in scores.items():
        typer.echo(f"{name:<20}{TASKS[name].kind:<10}{TASKS[name].category:<24}{value:>9.3f}")


@app.command("demo")
@friendly_errors
def demo_command(
    workdir: Annotated[Path, typer.Option(help="Where the zoo and merged models go.")] = Path(
        ".mergeflow/demo"
    ),
) -> None:
    """Generate a small zoo and merge it with every method; print a table."""
    from mergeflow.demo import run_demo

    typer.echo(f"mergeflow demo: generated Llama zoo (base + 4 experts) under {workdir}")
    rows = run_demo(workdir)
    typer.echo(f"{'method':<18}{'seconds':>9}{'|Δ|/|τ|':>10}{'cos(Δ,Στ)':>12}{'sign agree':>12}")
    for r in rows:
        typer.echo(
            f"{r.method:<18}{r.seconds:>9.2f}{r.delta_norm:>10.3f}{r.cosine_to_sum:>12.3f}{r.agreement:>12.3f}"
        )
    typer.echo(f"merged models: {workdir / 'merged'}  (each has a mergeflow-manifest.json)")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


def run() -> None:
    """The console script: the app, then an exit without the interpreter's teardown.

    Once torch or numba is loaded, Python's final garbage collection and module teardown
    take up to 1-2 s, longer than some commands. What a normal exit does for us still happens first:
    non-daemon threads are joined and atexit handlers (logging, MLflow) run.

    The cyclic garbage collector runs after every 100,000 new objects instead of 700 (as
    mypy does): importing torch (zoo and evaluation commands) creates hundreds of thousands of
    objects, and collecting them again and again took ~0.2 s of a 3 s merge when merges
    imported it.
    """
    gc.set_threshold(100_000, *gc.get_threshold()[1:])
    _threads_for_command(sys.argv[1:])
    try:
        app()
        code = 0
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    threading._shutdown()  # joins non-daemon threads, as the interpreter's own exit does
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _threads_for_command(args: list[str]) -> None:
    """Thread settings of this process, made before torch or numpy load.

    numpy's and scipy's OpenBLAS start a thread per core that spins for a while; no command
    uses them. A merge's OpenMP threads wait without spinning (mergeflow/__init__.py): the
    spinning took CPU from the threads that read and write the shards (TIES with 2 experts:
    2.39 against 2.65 s with both settings)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command == "merge":
        mergeflow.set_spin_count(mergeflow.MERGE_SPIN_COUNT)


app.add_typer(expert_app, name="expert")
app.add_typer(stack_app, name="stack")
app.add_typer(webhook_app, name="webhook")
app.command("report")(report_command)
app.command("promote")(promote_command)
