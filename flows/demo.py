"""The demo: the whole pipeline on embedded defaults, with no configuration.

`python -m flows.demo` (what `./dev demo` runs) starts the local S3 server (SeaweedFS, from
`mergeflow stack`) unless an S3 endpoint is configured, builds or reuses the `demo` zoo preset,
then runs one Prefect flow on Prefect's ephemeral API: publish_zoo to S3, merge_and_evaluate for
each of the paper's four methods (λ picked on held-in validation where the paper tunes it), and
a final merge_and_evaluate that registers the best merge in the local MLflow store. A second
run reuses every task vector, merged model and score.
"""

from __future__ import annotations

import os
import sys

from prefect import flow

from flows.merge_and_evaluate import MergeOutcome, MergeRequest, merge_and_evaluate
from flows.publish_zoo import PublishRequest, publish_zoo
from mergeflow.merges import PAPER_METHODS
from mergeflow.settings import Settings, load_settings

PRESET = "demo"
FAMILY = "tiny2m-pt-trained-here"


@flow(name="demo", log_prints=True)
def demo(preset: str = PRESET, family: str = FAMILY) -> dict[str, MergeOutcome]:
    """Every paper method's outcome, and under "registered" the best one's registration."""
    index = publish_zoo(PublishRequest(preset=preset))
    models = index["families"][family]
    outcomes: dict[str, MergeOutcome] = {}
    for method, (parameters, grid) in PAPER_METHODS.items():
        request = MergeRequest(
            base=models["base"],
            base_family=family,
            experts=models["experts"],
            method=method,
            parameters=parameters,
            grid=grid,
            register_in_mlflow=False,
        )
        outcomes[method] = merge_and_evaluate(request)
    best = best_method(outcomes)
    # Everything is cached by now: this run only registers the chosen merge.
    final = MergeRequest(
        base=models["base"],
        base_family=family,
        experts=models["experts"],
        method=best,
        parameters=outcomes[best].parameters,
    )
    outcomes["registered"] = merge_and_evaluate(final)
    return outcomes


def best_method(outcomes: dict[str, MergeOutcome]) -> str:
    """Highest normalised held-in score (how much of the experts survives); held-out breaks ties."""
    return max(outcomes, key=lambda m: (outcomes[m].held_in_normalised, outcomes[m].held_out_normalised))


def ensure_s3(settings: Settings) -> Settings:
    """The configured S3, or the stack's SeaweedFS started on loopback for this user."""
    if settings.s3_endpoint_url:
        return settings
    from mergeflow.stack import S3Service, up

    (status,) = up(settings, ["s3"], report=print)
    credentials = S3Service(settings).credentials()
    os.environ["MERGEFLOW_S3_ENDPOINT_URL"] = status.url
    os.environ["AWS_ACCESS_KEY_ID"] = credentials.access_key
    os.environ["AWS_SECRET_ACCESS_KEY"] = credentials.secret_key
    return load_settings()


def summary_table(outcomes: dict[str, MergeOutcome]) -> str:
    lines = [
        f"{'method':<16} {'parameters':<34} {'held-in ÷ expert':>16} {'held-out ÷ base':>16}",
    ]
    for method in PAPER_METHODS:
        outcome = outcomes[method]
        parameters = ", ".join(f"{k}={v:g}" for k, v in outcome.parameters.items()) or "-"
        held_in, held_out = outcome.held_in_normalised, outcome.held_out_normalised
        lines.append(f"{method:<16} {parameters:<34} {held_in:>16.3f} {held_out:>16.3f}")
    return "\n".join(lines)


def main() -> int:
    from mergeflow.errors import MergeflowError
    from mergeflow.zoo.build import build_preset
    from mergeflow.zoo.parallel import default_workers

    try:
        settings = ensure_s3(load_settings())
        print(f"artifacts: {settings.artifacts}; MLflow: {settings.mlflow_tracking_uri}")
        print(
            f"building or reusing zoo preset {PRESET!r} (small Llama models trained here, minutes when cold)"
        )
        build_preset(PRESET, workers=default_workers())
        outcomes = demo()
    except MergeflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    registered = outcomes["registered"]
    bin_dir = os.path.dirname(sys.executable)
    print("\nNormalised scores on the test split (paper metrics; 1.0 = as good as the expert / the base):\n")
    print(summary_table(outcomes))
    print(
        f"\nbest: {best_method({m: outcomes[m] for m in PAPER_METHODS})}, registered as "
        f"{registered.model_name} version {registered.model_version} (MLflow run {registered.run_id})"
        f"\nmerged model: {registered.merged}\n"
        "\nOpen the UIs:\n"
        f"  MLflow:  {bin_dir}/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}\n"
        f"  Prefect: {bin_dir}/prefect server start    (then http://127.0.0.1:4200)\n"
        f"Stop the local S3 server: {bin_dir}/mergeflow stack down"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
