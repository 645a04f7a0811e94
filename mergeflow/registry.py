"""The MLflow side of a merge: one run per merged model and a version of `mergeflow-<base_family>`.

A run records the merge's parameters, per-task raw and normalised scores (and their held-in and
held-out means), the content hash of every input, the Prefect flow run that made it, the score
table and the model folder's files under the artifact path `model`. The registered version's
source is that folder, so `load_registered` downloads the exact files the manifest lists and
checks their sha256 before handing the folder out.

The model files are logged as plain artifacts rather than with the `mlflow.transformers` flavour:
that flavour's logging broke on transformers 5.23, and a mergeflow folder is already a complete
Hugging Face checkpoint with its own manifest.

Every function takes an explicit tracking URI and uses its own MlflowClient, never mlflow's
global tracking state, so parallel registrations against different stores do not interfere.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from mergeflow.errors import CheckpointError, MergeflowError
from mergeflow.eval.metrics import COLUMNS
from mergeflow.fetch import verify_manifest
from mergeflow.scratch import staging_folder
from mergeflow.settings import load_settings
from mergeflow.storage import check_name

MODEL_ARTIFACT_PATH = "model"
CHALLENGER, CHAMPION = "challenger", "champion"
SCORES_ARTIFACT = "scores/scores.csv"
TRUNCATED_TAG = "mergeflow.truncated_params"
# On every version: the merged model's content hash, so registering the same model again
# returns its version instead of adding a duplicate.
MODEL_SHA_TAG = "mergeflow.model_sha256"
# Run parameters that mergeflow sets itself; a merge hyper-parameter may not reuse these names.
RESERVED_PARAMS = ("method", "base", "experts", "expert_count")


class RegistryError(MergeflowError):
    """Registering a merged model in MLflow, or loading one back, failed."""


@dataclass(frozen=True)
class MergeRecord:
    merged_folder: Path  # local HF folder with mergeflow-manifest.json
    base_family: str  # registered model name = f"mergeflow-{base_family}"
    method: str
    parameters: dict[str, float | int | str]  # lambda, density, seed ...
    base: str  # reference (path / s3 URI) of the base model
    experts: list[str]
    input_hashes: dict[str, str]  # reference -> content sha256, for the base and every expert
    scores: pd.DataFrame | None  # tidy table (task, category, kind, model, raw, normalised), one model
    output_uri: str | None  # where the merged model lives (s3://...), if anywhere but merged_folder
    prefect_flow_run_id: str | None
    prefect_flow_run_url: str | None
    model_sha256: str | None = None  # content hash of the merged model (mergeflow.hashing)


@dataclass(frozen=True)
class RegisteredVersion:
    run_id: str
    model_name: str
    version: int
    model_uri: str  # models:/<name>/<version>


def model_name(base_family: str) -> str:
    return f"mergeflow-{check_name('base family', base_family)}"


def client_for(tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client for `tracking_uri` (default: mergeflow's settings); the registry is the same store.

    The registry URI is passed explicitly because MlflowClient would otherwise take it from
    MLFLOW_REGISTRY_URI or mlflow's global state before falling back to the tracking URI.
    """
    uri = tracking_uri or load_settings().mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def register_merge(
    record: MergeRecord, tracking_uri: str | None = None, experiment: str = "mergeflow"
) -> RegisteredVersion:
    """Log one run for the merge in `record` and register its model folder as a new version.

    When a version of the same model (by `record.model_sha256`) is already registered, that
    version is returned and nothing is logged: re-running a merge does not add duplicates.
    """
    folder = Path(record.merged_folder)
    _verify(folder, str(folder), hashes=False)  # cheap: MLflow hashes nothing, downloads do
    params, truncated = _params(record)
    metrics = _metrics(record.scores)
    tags = _tags(record, truncated)

    client, uri = client_for(tracking_uri)
    name = model_name(record.base_family)
    try:
        existing = _version_of(client, name, record.model_sha256) if record.model_sha256 else None
    except MlflowException as error:
        raise RegistryError(f"MLflow at {uri}: cannot look up {name}: {error.message}") from None
    if existing is not None:
        return existing
    try:
        experiment_id = _experiment_id(client, uri, experiment)
        run = client.create_run(experiment_id, run_name=f"{record.method}-{record.base_family}")
    except MlflowException as error:
        raise RegistryError(
            f"MLflow at {uri}: cannot start a run in experiment {experiment!r}: {error}"
        ) from None
    run_id = run.info.run_id
    try:
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        client.log_batch(run_id, metrics=metrics)
        if record.scores is not None:
            client.log_text(run_id, record.scores.to_csv(index=False), SCORES_ARTIFACT)
        client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT_PATH)
        version = _create_version(client, name, run_id, record)
        # Every new merge is the challenger until `promote` decides on it.
        client.set_registered_model_alias(name, CHALLENGER, str(version))
        client.set_tag(run_id, "mergeflow.registered_model", f"{name}/{version}")
        client.set_terminated(run_id, "FINISHED")
    except (MlflowException, OSError) as error:
        client.set_terminated(run_id, "FAILED")
        raise RegistryError(f"MLflow run {run_id} ({name}) at {uri}: {error}") from None
    return RegisteredVersion(run_id, name, version, f"models:/{name}/{version}")


def load_registered(
    model_name: str, version_or_alias: str, tracking_uri: str | None = None, dest: Path | None = None
) -> Path:
    """Download a registered version (a number, or an alias such as "champion") into `dest`
    (default: a new temporary folder) and return it once every manifest hash matches.

    The files land in a staging folder beside `dest` first, so `dest` only ever appears
    complete and verified.
    """
    client, uri = client_for(tracking_uri)
    version = resolve_version(model_name, version_or_alias, tracking_uri)
    try:
        source = client.get_model_version_download_uri(model_name, version.version)
    except MlflowException as error:
        raise RegistryError(f"{model_name} version {version.version} at {uri}: {error.message}") from None
    label = f"{model_name} version {version.version}"

    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="mergeflow-")) / "model"
    if target.exists() and any(target.iterdir()):
        raise RegistryError(f"{label}: destination {target} is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        downloaded = Path(_download(client, uri, source, staging))
        _verify(downloaded, label, hashes=True)
        if target.exists():
            target.rmdir()
        downloaded.rename(target)
    except MlflowException as error:
        raise RegistryError(f"{label}: download of {source} failed: {error.message}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_url(run_id: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow UI page of a run, when the tracking URI is a server (None for a local store)."""
    client, uri = client_for(tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    experiment_id = client.get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def resolve_version(
    model_name: str, version_or_alias: str, tracking_uri: str | None = None
) -> RegisteredVersion:
    """The registered version a number or an alias (e.g. "champion") names now."""
    client, uri = client_for(tracking_uri)
    try:
        if version_or_alias.isdigit():
            version = client.get_model_version(model_name, version_or_alias)
        else:
            version = client.get_model_version_by_alias(model_name, version_or_alias)
    except MlflowException as error:
        raise RegistryError(
            f"{model_name} {version_or_alias} at {uri}: no such registered model version ({error.message})"
        ) from None
    return RegisteredVersion(
        version.run_id, model_name, int(version.version), f"models:/{model_name}/{version.version}"
    )


def set_alias(model_name: str, alias: str, version: int | str, tracking_uri: str | None = None) -> None:
    """Point `alias` (e.g. "champion", "challenger") at `version`, moving it from any other version."""
    client, uri = client_for(tracking_uri)
    try:
        client.set_registered_model_alias(model_name, alias, str(version))
    except MlflowException as error:
        raise RegistryError(
            f"{model_name} version {version} at {uri}: cannot set alias {alias!r}: {error.message}"
        ) from None


# --- what a run records ------------------------------------------------------------------------


def _params(record: MergeRecord) -> tuple[list[Param], list[str]]:
    """The run's parameters, and the names of those cut to MLflow's length limit."""
    clashes = sorted(set(record.parameters) & set(RESERVED_PARAMS))
    if clashes:
        raise RegistryError(
            f"merge parameter {clashes[0]!r} clashes with a parameter mergeflow records itself"
        )
    values: dict[str, str] = {
        "method": record.method,
        "base": record.base,
        "experts": ",".join(record.experts),
        "expert_count": str(len(record.experts)),
    }
    values |= {key: str(value) for key, value in record.parameters.items()}
    params, truncated = [], []
    for key, value in values.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            # Cut here rather than by MLflow, so the run says which values are incomplete.
            value = value[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            truncated.append(key)
        params.append(Param(key, value))
    return params, truncated


def _metrics(scores: pd.DataFrame | None) -> list[Metric]:
    if scores is None or scores.empty:
        return []
    missing = [column for column in COLUMNS if column not in scores.columns]
    if missing:
        raise RegistryError(f"score table lacks column {missing[0]!r} (expected {', '.join(COLUMNS)})")
    models = sorted(set(scores["model"]))
    if len(models) != 1:
        raise RegistryError(f"score table must hold one model (the merged one), not {', '.join(models)}")
    values: dict[str, float] = {}
    for row in scores.itertuples():
        values[f"raw/{row.task}"] = float(row.raw)
        values[f"normalised/{row.task}"] = float(row.normalised)
    for kind in ("held_in", "held_out"):
        normalised = scores.loc[scores["kind"] == kind, "normalised"].astype(float)
        if len(normalised):
            # A NaN (a reference model scoring 0) would make the mean meaningless; leave it out.
            finite = [value for value in normalised if not math.isnan(value)]
            values[f"{kind}_normalised_mean"] = sum(finite) / len(finite) if finite else math.nan
    timestamp = int(time.time() * 1000)
    return [Metric(key, value, timestamp, 0) for key, value in values.items()]


def _tags(record: MergeRecord, truncated: list[str]) -> list[RunTag]:
    tags = {
        "mergeflow.method": record.method,
        "mergeflow.base_family": record.base_family,
    }
    if record.prefect_flow_run_id:
        tags["mergeflow.prefect_flow_run_id"] = record.prefect_flow_run_id
    if record.prefect_flow_run_url:
        tags["mergeflow.prefect_flow_run_url"] = record.prefect_flow_run_url
    if record.output_uri:
        tags["mergeflow.output_uri"] = record.output_uri
    inputs = [(record.base, "base")] + [(expert, "expert") for expert in record.experts]
    for index, (ref, role) in enumerate(inputs):
        if ref not in record.input_hashes:
            raise RegistryError(f"input {ref}: no content sha256 in the merge record")
        tags[f"mergeflow.input.{index}.ref"] = ref
        tags[f"mergeflow.input.{index}.role"] = role
        tags[f"mergeflow.input.{index}.sha256"] = record.input_hashes[ref]
    if truncated:
        tags[TRUNCATED_TAG] = (
            f"{', '.join(truncated)} cut to {MAX_PARAM_VAL_LENGTH} characters; "
            "the full values are in the model's mergeflow-manifest.json"
        )
    return [RunTag(key, value[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]


# --- MLflow plumbing -----------------------------------------------------------------------------


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(uri))
    except MlflowException:
        # Another process may have created it between the lookup and here.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _local_artifact_root(uri: str) -> str | None:
    """For a sqlite store, artifacts go in `artifacts/` beside the database file: MLflow's own
    default is ./mlruns in whatever the current directory happens to be. A server (http) decides
    its artifact root itself."""
    if not uri.startswith("sqlite:///"):
        return None
    # sqlite:///relative.db or sqlite:////absolute.db: everything after the third slash is the
    # file path (urlparse would keep a leading "//" on absolute paths).
    database = Path(unquote(uri.removeprefix("sqlite:///").partition("?")[0])).absolute()
    return (database.parent / "artifacts").as_uri()


def _create_version(client: MlflowClient, name: str, run_id: str, record: MergeRecord) -> int:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name, description=f"Merged models of the {record.base_family} family, made by mergeflow."
            )
        except MlflowException as create_error:
            # Another registration may have created it meanwhile.
            if create_error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}",
        run_id=run_id,
        tags={"mergeflow.method": record.method}
        | ({MODEL_SHA_TAG: record.model_sha256} if record.model_sha256 else {}),
        description=f"{record.method} merge of {len(record.experts)} experts onto {record.base}",
    )
    return int(version.version)


def _version_of(client: MlflowClient, name: str, model_sha256: str) -> RegisteredVersion | None:
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in versions:
        if version.tags.get(MODEL_SHA_TAG) == model_sha256:
            return RegisteredVersion(
                version.run_id, name, int(version.version), f"models:/{name}/{version.version}"
            )
    return None


def _download(client: MlflowClient, uri: str, source: str, dest: Path) -> str:
    """Download a model version's source folder into `dest`; returns the local folder."""
    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return client.download_artifacts(run_id, path, str(dest))
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=uri)


def _verify(folder: Path, label: str, hashes: bool) -> None:
    try:
        # Downloads land in a throwaway folder: their hashes are not worth remembering.
        verify_manifest(folder, label, required=True, hashes=hashes, remember=False)
    except CheckpointError as error:
        raise RegistryError(str(error)) from None
