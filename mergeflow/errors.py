"""Errors that users see. Each message names the file, model, tensor or field at fault."""


class MergeflowError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ConfigError(MergeflowError, ValueError):
    """The merge configuration is invalid. A ValueError, so pydantic validators can raise it."""


class CheckpointError(MergeflowError):
    """A checkpoint is missing, unreadable, truncated or in a refused format."""


class IncompatibleModelsError(MergeflowError):
    """Models cannot be merged: architectures, tensor names, shapes or vocab sizes differ."""


class NonFiniteError(MergeflowError):
    """An input tensor holds NaN or Inf values."""


class StorageError(MergeflowError):
    """A storage location (local path or S3) cannot be reached or written."""


class TransientStorageError(StorageError):
    """A storage request failed in a way a retry may cure (connection, timeout, server error),
    as opposed to a missing object or refused credentials."""


class DataError(MergeflowError):
    """A data source (package archive, text file) is missing, corrupt or not in the expected format."""


class ZooError(MergeflowError):
    """A zoo model could not be built, or was built but fails its quality checks."""
