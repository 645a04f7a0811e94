"""Uniform access to local paths, file:// and s3:// URIs.

Local files are read with os.pread (no mmap, so resident memory stays bounded while
streaming); S3 objects with ranged GETs through s3fs. S3 settings come from the usual
AWS environment variables plus MERGEFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) for
S3-compatible servers such as SeaweedFS or MinIO.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import ConfigError, StorageError, TransientStorageError

S3_ENDPOINT_ENV = "MERGEFLOW_S3_ENDPOINT_URL"


def s3_storage_options() -> dict:
    """s3fs options from the environment.

    Env credentials are passed explicitly so that they are part of fsspec's instance cache
    key: changing them gives a new client instead of silently reusing the old one. Without
    them, s3fs falls back to botocore's usual chain (profiles, instance roles).
    """
    options: dict = {}
    endpoint = os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
    return options


def s3_filesystem():
    import fsspec  # here, not at the top: a merge of local models never needs it (0.04 s to import)

    # Our writes commit through a manifest, so s3fs's listing cache must not hide new objects.
    return fsspec.filesystem("s3", use_listings_cache=False, **s3_storage_options())


@dataclass(frozen=True)
class Location:
    """A file or folder, local or in S3. `uri` is what users see in messages."""

    uri: str
    path: str
    is_local: bool

    @property
    def fs(self):
        """The s3fs filesystem of an S3 location; local locations use os and pathlib."""
        if self.is_local:
            raise TypeError(f"{self.uri} is local: use os and pathlib")
        return s3_filesystem()

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def child(self, name: str) -> Location:
        if self.is_local:
            return Location(str(Path(self.path) / name), str(Path(self.path) / name), True)
        return Location(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", False)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.path)
        return guarded(self, lambda: self.fs.exists(self.path))

    def is_dir(self) -> bool:
        if self.is_local:
            return os.path.isdir(self.path)
        return guarded(self, lambda: self.fs.isdir(self.path))

    def size(self) -> int:
        if self.is_local:
            return os.path.getsize(self.path)
        return int(guarded(self, lambda: self.fs.size(self.path)))

    def has_files(self) -> bool:
        """A file at this path or anywhere under it; S3 folder entries and 'x/' markers don't count."""
        if self.is_local:
            path = Path(self.path)
            return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))
        found = guarded(self, lambda: self.fs.find(self.path, detail=True))
        return any(i["type"] == "file" and not i["name"].endswith("/") for i in found.values())

    def list_names(self) -> list[str]:
        """Names of the files directly inside this folder."""
        if self.is_local:
            return sorted(p.name for p in Path(self.path).iterdir() if p.is_file())
        entries = guarded(self, lambda: self.fs.ls(self.path, detail=True, refresh=True))
        return sorted(posixpath.basename(e["name"]) for e in entries if e["type"] == "file")

    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.path).read_bytes()
        return guarded(self, lambda: self.fs.cat_file(self.path))

    def write_bytes(self, data: bytes) -> None:
        """Write a whole small file; locally through a temporary name, so readers never see half."""
        if self.is_local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(data)
            partial.replace(path)
            return
        guarded(self, lambda: self.fs.pipe_file(self.path, data))

    def read_range(self, start: int, length: int) -> bytes:
        if self.is_local:
            with open(self.path, "rb") as f:
                return os.pread(f.fileno(), length, start)
        return guarded(self, lambda: self.fs.cat_file(self.path, start=start, end=start + length))


# Names that become one segment of a storage path (base family, task): no separators, and no
# leading "." (so never "." or ".."); also valid as part of an MLflow registered model name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    if not NAME.match(value):
        raise ConfigError(
            f"{kind} name {value!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (it becomes part of a storage path)"
        )
    return value


def locate(ref: str) -> Location:
    """Turn a local path, file:// or s3:// reference into a Location."""
    if ref.startswith("s3://"):
        return Location(ref.rstrip("/"), ref[len("s3://") :].rstrip("/"), False)
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    if "://" in ref:
        scheme = ref.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in '{ref}': use a path, file:// or s3://")
    path = str(Path(ref).expanduser().resolve())
    return Location(path, path, True)


def guarded(location: Location, action, what: str | None = None):
    """Run an S3 action, turning botocore/s3fs failures into one clear line naming `location`
    (and `what` was being done): TransientStorageError where a retry may cure it."""
    prefix = f"{location.uri}: {what + ': ' if what else ''}"
    try:
        return action()
    except FileNotFoundError as exc:
        raise StorageError(f"{prefix}not found") from exc
    except PermissionError as exc:
        raise StorageError(f"{prefix}access denied (check the S3 credentials)") from exc
    except OSError as exc:
        raise TransientStorageError(f"{prefix}{type(exc).__name__}: {_redact(str(exc))}") from exc
    except _botocore_errors() as exc:  # the endpoint is unreachable or the connection broke
        raise TransientStorageError(f"{prefix}{_redact(str(exc))}") from exc


def _botocore_errors() -> tuple[type[Exception], ...]:
    # Imported only once an error is being handled: botocore is slow to import.
    from botocore.exceptions import BotoCoreError

    return (BotoCoreError,)


def _redact(message: str) -> str:
    """Never echo a secret key back in an error."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return message.replace(secret, "***") if secret else message
