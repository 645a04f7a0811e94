"""`mergeflow stack up|down|status`: the local servers."""

from __future__ import annotations

from typing import Annotated

import typer

from mergeflow.cli.common import friendly_errors

stack_app = typer.Typer(
    help="Run the local stack on 127.0.0.1: SeaweedFS (S3), MLflow and Prefect servers in the background.",
    no_args_is_help=True,
)


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
