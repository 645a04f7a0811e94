"""The `mergeflow` command line. Errors print as one line, never a traceback."""

from __future__ import annotations

import logging
import re
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

from mergeflow.errors import MergeflowError

app = typer.Typer(help="Merge fine-tuned expert models, evaluate and register them.", no_args_is_help=True)
zoo_app = typer.Typer(help="Build and list model zoos.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}


def parse_size(text: str) -> int:
    """'200MB' -> 200_000_000 (decimal units, as Hugging Face's max_shard_size)."""
    match = SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"'{text}' is not a size like 500MB or 2GB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def friendly_errors(command):
    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MergeflowError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return run


@app.command("merge")
@friendly_errors
def merge_command(
    config: Annotated[Path, typer.Argument(help="mergekit-style YAML config.", exists=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder: path, file:// or s3:// URI.")],
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all cores).", min=1)] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (*.bin) checkpoints.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 500MB, 2GB.")] = "2GB",
    work_memory: Annotated[str, typer.Option(help="Working memory for chunks of all models.")] = "64MB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the models in CONFIG into OUT, streaming tensor by tensor."""
    from mergeflow.config import load_config
    from mergeflow.engine import merge

    result = merge(
        load_config(config),
        out,
        threads=threads,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        max_shard_bytes=parse_size(shard_size),
        work_bytes=parse_size(work_memory),
        progress=not quiet,
    )
    typer.echo(
        f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) with "
        f"{result.manifest['method']} into {result.output} in {result.seconds:.1f}s"
    )


@app.command("methods")
def methods_command() -> None:
    """List the merge methods with their parameters and defaults."""
    from mergeflow.methods import ALIASES, METHODS

    for method in METHODS.values():
        aliases = [a for a, target in ALIASES.items() if target == method.name]
        alias_text = f" (alias: {', '.join(aliases)})" if aliases else ""
        typer.secho(f"{method.name}{alias_text}", bold=True)
        typer.echo(f"  {method.summary}")
        typer.echo(f"  {method.formula}")
        for p in method.params:
            default = "required" if p.default is None else f"default {p.default}"
            scope = "per model" if p.per_model else "global"
            typer.echo(f"    {p.name:<12} {scope:<9} {default:<14} {p.description}")


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
        str, typer.Option(help="tiny (small models trained here) or smol (SmolLM2-135M).")
    ] = "tiny",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Build (or reuse from the cache) a zoo preset: bases, one expert per held-in task, a multitask
    model; print each expert's validation accuracy against its base's."""
    from mergeflow.zoo import zoo_dir
    from mergeflow.zoo.build import build_preset

    try:
        index = build_preset(preset, progress=not quiet)
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


expert_app = typer.Typer(help="Experts in the artifact store.", no_args_is_help=True)
app.add_typer(expert_app, name="expert")


@expert_app.command("publish")
@friendly_errors
def expert_publish(
    folder: Annotated[Path, typer.Argument(help="The expert's HF checkpoint folder.")],
    base: Annotated[str, typer.Option(help="Base family name, e.g. tiny2m-pt-trained-here.")],
    task: Annotated[str, typer.Option(help="The held-in task the expert was trained for.")],
    base_model: Annotated[
        Path | None, typer.Option(help="The base's folder; needed the first time a base is used.")
    ] = None,
) -> None:
    """Upload an expert (with a manifest) to <artifacts>/experts/BASE/TASK/ and emit the Prefect
    event mergeflow.expert.landed, which starts the merge-on-landing deployment."""
    from mergeflow.events import EXPERT_LANDED, emit
    from mergeflow.experts import base_uri, publish_expert, read_announced, write_announced
    from mergeflow.settings import load_settings

    settings = load_settings()
    expert = publish_expert(folder, base, task, settings.artifacts, base_model)
    typer.echo(f"published {expert.uri} (sha256 {expert.sha256[:12]})")
    if not settings.prefect_api_url:
        typer.echo(
            "no Prefect server (PREFECT_API_URL): no event sent; the watch-experts flow will announce it"
        )
        return
    event = emit(EXPERT_LANDED, expert.uri, expert.payload(base_uri(settings.artifacts, base)), expert.sha256)
    write_announced(
        settings.artifacts, read_announced(settings.artifacts) | {f"{expert.uri}#{expert.sha256}"}
    )
    typer.echo(f"emitted {EXPERT_LANDED} (event {event})")


@app.command("report")
@friendly_errors
def report_command(
    study: Annotated[
        str, typer.Argument(help="Study name (under <artifacts>/studies/) or a results.parquet path/URI.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Report folder; default ~/.mergeflow/studies/STUDY.")
    ] = None,
    mlflow: Annotated[bool, typer.Option(help="Also log the study and report to MLflow.")] = True,
) -> None:
    """Write a study's report: Markdown with the paper's findings checked, and PNG plots."""
    import io

    import pandas as pd

    from mergeflow.report import findings, write_report
    from mergeflow.settings import load_settings
    from mergeflow.storage import locate

    settings = load_settings()
    source = (
        study
        if study.endswith(".parquet")
        else f"{settings.artifacts.rstrip('/')}/studies/{study}/results.parquet"
    )
    name = Path(source).parent.name if study.endswith(".parquet") else study
    table = pd.read_parquet(io.BytesIO(locate(source).read_bytes()))
    folder = out or settings.home / "studies" / name
    report = write_report(table, folder, title=f"mergeflow study {name!r}")
    for finding in findings(table):
        typer.echo(f"finding {finding.number}: {finding.verdict} — {finding.evidence}")
    typer.echo(f"report: {report}")
    if mlflow:
        from mergeflow.tracking import log_study

        typer.echo(f"MLflow run: {log_study(name, table, folder)}")


@app.command("promote")
@friendly_errors
def promote_command(
    model_name: Annotated[
        str, typer.Argument(help="Registered model, e.g. mergeflow-tiny2m-pt-trained-here.")
    ],
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Point champion back at the previous champion.")
    ] = False,
    challenger: Annotated[str, typer.Option(help="Version number or alias to judge.")] = "challenger",
    min_held_in: Annotated[float, typer.Option(help="Required normalised held-in mean.")] = 0.9,
    max_held_out_drop: Annotated[
        float, typer.Option(help="Allowed fall of the held-out mean below the champion's.")
    ] = 0.0,
) -> None:
    """Judge the challenger against the champion and promote it when the gates pass (the promote
    flow adds human approval), or roll the champion back. MLflow from MLFLOW_TRACKING_URI."""
    from mergeflow import promotion

    if rollback:
        version = promotion.rollback(model_name)
        typer.echo(f"champion of {model_name} is now version {version}")
        return
    gates = promotion.Gates(min_held_in=min_held_in, max_held_out_drop=max_held_out_drop)
    decision = promotion.apply(promotion.decide(model_name, gates, challenger))
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    typer.echo(f"{model_name} version {decision.challenger} {verdict}: {'; '.join(decision.reasons)}")


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


stack_app = typer.Typer(
    help="Run the local stack on 127.0.0.1: SeaweedFS (S3), MLflow and Prefect servers in the background.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


def stack_settings(
    s3_port: int | None = None, mlflow_port: int | None = None, prefect_port: int | None = None
):
    """Settings with the command's port options over environment and settings file."""
    from mergeflow.settings import load_settings

    ports = {"s3_port": s3_port, "mlflow_port": mlflow_port, "prefect_port": prefect_port}
    return load_settings(**{name: port for name, port in ports.items() if port is not None})


def print_stack_env(settings) -> None:
    from mergeflow import stack

    lines = stack.env_lines(settings)
    if lines:
        typer.echo(f"client environment (also in {stack.env_file(settings)}; `source` it):")
        typer.echo("\n".join(lines))


@stack_app.command("up")
@friendly_errors
def stack_up(
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="s3, mlflow or prefect (repeat; default all); mlflow needs s3."),
    ] = None,
    s3_port: Annotated[
        int | None, typer.Option(help="S3 port [MERGEFLOW_S3_PORT; 8333].", min=1, max=65535)
    ] = None,
    mlflow_port: Annotated[
        int | None, typer.Option(help="MLflow port [MERGEFLOW_MLFLOW_PORT; 5000].", min=1, max=65535)
    ] = None,
    prefect_port: Annotated[
        int | None, typer.Option(help="Prefect port [MERGEFLOW_PREFECT_PORT; 4200].", min=1, max=65535)
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the services' health.", min=1)] = 120,
) -> None:
    """Start the services that are not running, wait until each is healthy, print the client environment."""
    from mergeflow import stack

    settings = stack_settings(s3_port, mlflow_port, prefect_port)
    stack.up(settings, service, timeout=timeout, report=typer.echo)
    typer.echo(f"logs, pid files and data: {settings.home / 'stack'}/<service>/")
    print_stack_env(settings)


@stack_app.command("down")
@friendly_errors
def stack_down() -> None:
    """Stop every running service of the stack (SIGTERM, then SIGKILL after a grace period)."""
    from mergeflow import stack

    stack.down(stack_settings(), report=typer.echo)


@stack_app.command("status")
@friendly_errors
def stack_status() -> None:
    """Show each service: running or stopped, health, pid and URL; and the client environment."""
    from mergeflow import stack

    settings = stack_settings()
    typer.echo(f"{'service':<9}{'state':<9}{'health':<10}{'pid':<9}url")
    for s in stack.status(settings):
        state = "running" if s.running else "stopped"
        health = "-" if s.healthy is None else "healthy" if s.healthy else "UNHEALTHY"
        typer.echo(f"{s.name:<9}{state:<9}{health:<10}{s.pid or '-'!s:<9}{s.url}")
        if s.detail:
            typer.echo(f"         {s.detail}")
    typer.echo(f"logs, pid files and data: {settings.home / 'stack'}/<service>/")
    print_stack_env(settings)


if __name__ == "__main__":
    app()
