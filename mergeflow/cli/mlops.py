"""Commands around the pipeline: publish an expert, report a study, promote a model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from mergeflow.cli.common import friendly_errors

expert_app = typer.Typer(help="Experts in the artifact store.", no_args_is_help=True)


@expert_app.command("publish")
@friendly_errors
def expert_publish(
    folder: Annotated[
        Path,
        typer.Argument(
            help="The expert's HF checkpoint folder, or a PEFT LoRA adapter of the base "
            "(stored as the adapter; merges apply it)."
        ),
    ],
    base: Annotated[str, typer.Option(help="Base family name, e.g. tiny2m-pt-trained-here.")],
    task: Annotated[str, typer.Option(help="The held-in task the expert was trained for.")],
    base_model: Annotated[
        Path | None, typer.Option(help="The base's folder; needed the first time a base is used.")
    ] = None,
) -> None:
    """Upload an expert and announce it, which starts the merge-on-landing deployment.

    It goes with a manifest to <artifacts>/experts/BASE/TASK/.

    The announcement is the Prefect event mergeflow.expert.landed."""
    from mergeflow.events import EXPERT_LANDED, emit
    from mergeflow.experts import base_uri, publish_expert, read_announced, write_announced
    from mergeflow.settings import load_settings

    settings = load_settings()
    expert = publish_expert(folder, base, task, settings.artifacts, base_model)
    merged_as = f", merged as {expert.ref}" if expert.ref != expert.uri else ""
    typer.echo(f"published {expert.uri} (sha256 {expert.sha256[:12]}{merged_as})")
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
    """Promote the challenger when it passes the gates against the champion, or roll back.

    The promote flow adds human approval to the same gates. MLflow from MLFLOW_TRACKING_URI."""
    from mergeflow import promotion

    if rollback:
        version = promotion.rollback(model_name)
        typer.echo(f"champion of {model_name} is now version {version}")
        return
    gates = promotion.Gates(min_held_in=min_held_in, max_held_out_drop=max_held_out_drop)
    decision = promotion.apply(promotion.decide(model_name, gates, challenger))
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    typer.echo(f"{model_name} version {decision.challenger} {verdict}: {'; '.join(decision.reasons)}")


webhook_app = typer.Typer(
    help="MLflow webhooks into the promotion path (new model versions → promote).", no_args_is_help=True
)
WEBHOOK_SECRET_ENV = "MERGEFLOW_WEBHOOK_SECRET"
WEBHOOK_NAME = "mergeflow-promotion"


def _webhook_secret() -> str:
    import os

    from mergeflow.errors import ConfigError

    secret = os.environ.get(WEBHOOK_SECRET_ENV, "")
    if len(secret) < 16:
        raise ConfigError(
            f"set {WEBHOOK_SECRET_ENV} to a random string of at least 16 characters (the same for "
            "`webhook create` and `webhook relay`), e.g. export "
            f"{WEBHOOK_SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


@webhook_app.command("relay")
@friendly_errors
def webhook_relay_command(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1).")] = 5050,
) -> None:
    """Relay MLflow's model_version.created webhooks to Prefect until stopped.

    Each signed delivery (POST /mlflow) becomes the Prefect event mergeflow.merge.registered.

    Secret from MERGEFLOW_WEBHOOK_SECRET, Prefect from PREFECT_API_URL."""
    from mergeflow.settings import load_settings
    from mergeflow.webhooks import PATH, relay_server

    api_url = load_settings().prefect_api_url
    if not api_url:
        raise typer.BadParameter("no Prefect server: set PREFECT_API_URL (e.g. source the stack's env.sh)")
    server = relay_server(port, _webhook_secret(), api_url)
    typer.echo(f"relaying MLflow webhooks from http://127.0.0.1:{port}{PATH} to {api_url}", err=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person stops it
            server.serve_forever()
    finally:
        server.server_close()


@webhook_app.command("create")
@friendly_errors
def webhook_create_command(
    url: Annotated[str, typer.Argument(help="The relay's URL, e.g. http://127.0.0.1:5050/mlflow.")],
) -> None:
    """Create (or update) the MLflow webhook that posts new model versions to the relay.

    Deliveries are signed with MERGEFLOW_WEBHOOK_SECRET. MLflow from MLFLOW_TRACKING_URI."""
    from mlflow import MlflowClient

    from mergeflow.settings import load_settings

    client = MlflowClient(load_settings().mlflow_tracking_uri)
    secret = _webhook_secret()
    existing = [hook for hook in client.list_webhooks() if hook.name == WEBHOOK_NAME]
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, url=url, secret=secret, status="ACTIVE")
    else:
        hook = client.create_webhook(WEBHOOK_NAME, url, events=["model_version.created"], secret=secret)
    typer.echo(f"MLflow webhook {hook.name} ({hook.webhook_id}) → {url}")
