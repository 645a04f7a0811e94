"""mergeflow's settings: environment variables, then an optional TOML file, then defaults.

The settings file is `mergeflow.toml` in the working directory, or the file named by
MERGEFLOW_SETTINGS; its keys are the field names below (`bucket = "models"`, `s3_port = 9000`).
Variables of mergeflow's own are `MERGEFLOW_<FIELD>`; the S3 endpoint, the MLflow tracking URI
and the Prefect API URL use the names their own tools read (AWS_ENDPOINT_URL,
MLFLOW_TRACKING_URI, PREFECT_API_URL), so one environment serves mergeflow, boto, MLflow and
Prefect alike. Credentials are not settings: they come from the environment (AWS_*) or from
Prefect Secret blocks (tasks/credentials.py), and the settings file refuses them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mergeflow.errors import MergeflowError

SETTINGS_FILE_ENV = "MERGEFLOW_SETTINGS"
SETTINGS_FILE_NAME = "mergeflow.toml"
CREDENTIAL_KEYS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
# S3 bucket naming rules, checked early so a typo fails here rather than deep inside a request.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SettingsError(MergeflowError):
    """The settings file or an environment variable holds an invalid value."""


def settings_file() -> Path | None:
    """The settings file in effect: MERGEFLOW_SETTINGS (which must exist), else ./mergeflow.toml."""
    named = os.environ.get(SETTINGS_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise SettingsError(f"{SETTINGS_FILE_ENV}={named}: no such settings file")
        return path
    local = Path(SETTINGS_FILE_NAME)
    return local if local.is_file() else None


class Settings(BaseSettings):
    """Where mergeflow keeps state and which S3, MLflow and Prefect it talks to."""

    # env_prefix gives every field its MERGEFLOW_<FIELD> variable; fields that mirror another
    # tool's variable declare it as an alias. populate_by_name lets the settings file and
    # Settings(...) use field names. Unknown keys in the settings file are errors, not ignored.
    model_config = SettingsConfigDict(env_prefix="MERGEFLOW_", populate_by_name=True, extra="forbid")

    home: Path = Field(
        default=Path("~/.mergeflow"),
        description="State folder: the stack's data, logs, pid files and credentials; embedded MLflow store.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MERGEFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="S3-compatible endpoint (SeaweedFS, MinIO); None means AWS S3.",
    )
    bucket: str = Field(default="mergeflow", description="Bucket for mergeflow's artifacts and models.")
    artifacts: str | None = Field(
        default=None,
        description="Where the pipeline keeps task vectors, merged models and score tables (path or "
        "s3:// prefix); None means s3://<bucket> when an S3 endpoint is set, else <home>/artifacts.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking URI; empty means sqlite:///<home>/mlflow/mlflow.db (embedded).",
    )
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias="PREFECT_API_URL",
        description="Prefect API URL; None means Prefect's ephemeral in-process API.",
    )
    s3_port: int = Field(default=8333, ge=1, le=65535, description="Port of the stack's SeaweedFS S3.")
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="Port of the stack's MLflow server.")
    prefect_port: int = Field(default=4200, ge=1, le=65535, description="Port of the stack's Prefect server.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit values, then the environment, then the settings file. No .env or secrets
        # folder: one documented file is easier to reason about.
        path = settings_file()
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_the_file(cls, data):
        # Only the file can bring these keys (the fields do not exist). Refuse them by name, without
        # the value: credentials come from the environment or Prefect Secret blocks, nowhere else.
        found = sorted(CREDENTIAL_KEYS & set(data)) if isinstance(data, dict) else []
        if found:
            raise ValueError(
                f"{', '.join(found)} cannot be set in the settings file: credentials are read from the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or from Prefect Secret blocks"
            )
        return data

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().absolute()

    @field_validator("bucket")
    @classmethod
    def _valid_bucket(cls, bucket: str) -> str:
        if not BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(f"'{bucket}' is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        return bucket

    @field_validator("s3_endpoint_url", "prefect_api_url", "artifacts")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _defaults_from_home(self) -> Settings:
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        if not self.artifacts:
            self.artifacts = f"s3://{self.bucket}" if self.s3_endpoint_url else str(self.home / "artifacts")
        return self


def env_names(field: str) -> list[str]:
    """The environment variables that set a field, in order of precedence."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [alias] if isinstance(alias, str) else [f"MERGEFLOW_{field.upper()}"]


def load_settings(**overrides) -> Settings:
    """Settings from explicit overrides, the environment and the settings file, in that order.

    Invalid values raise SettingsError naming the variable or key; secret values are never
    echoed (pydantic's messages would include the input).
    """
    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {settings_file()}: invalid TOML: {exc}") from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            name = f"{field} ({' or '.join(env_names(field))})" if field in Settings.model_fields else field
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name or 'settings'}: {message}")
        where = settings_file()
        source = f" (environment or {where})" if where else " (environment)"
        raise SettingsError("invalid settings" + source + ": " + "; ".join(problems)) from None
