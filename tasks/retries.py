"""The retry policy of the stages that talk to S3 and MLflow: exponential backoff with jitter,
and only for failures a retry may cure. A missing expert or a corrupt shard fails at once."""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from mergeflow.errors import TransientStorageError

# MLflow's codes for a server that is down, overloaded or failing; others (a bad name, a
# missing version) would fail again.
TRANSIENT_MLFLOW_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(error, (TransientStorageError, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_MLFLOW_CODES
    # Wrapped errors (RegistryError ... from None) keep the original as __context__.
    cause = error.__cause__ or error.__context__
    return cause is not None and is_transient(cause)


def retry_on_transient_errors(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - the failed state's exception, whatever it is
        return is_transient(error)
    return False


IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient_errors,
}
