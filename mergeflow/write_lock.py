"""One writer at a time per S3 destination.

A local commit is one atomic rename, but an S3 commit is many requests (remove the old objects,
upload each file, the manifest last), so two writers committing to one prefix at once could
interleave and leave a manifest that lists another writer's shards. The commit therefore holds
a lock object, `<prefix>/.write-lock`, created with a conditional PUT (`If-None-Match: *`):
the server lets exactly one writer create it. The holder refreshes it before each upload with
`If-Match` on the ETag it last wrote, so a writer that lost the lock finds out before it
uploads anything more, and removes it the same way when done.

A lock is taken over, again by a conditional PUT that only one contender wins, when its
holder is gone: a process on this host that no longer runs, a lock this process left behind
because the server was away when it tried to remove it, or one not refreshed for
`STALE_AFTER_S`. Otherwise the writer waits up to `WAIT_S`, then fails naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from mergeflow.errors import StorageError
from mergeflow.storage import Location, guarded

LOCK_NAME = ".write-lock"
STALE_AFTER_S = 15 * 60  # far longer than one file upload between refreshes
WAIT_S = 30 * 60
POLL_S = 1.0

# This process's identity, and the lock URIs its threads hold right now: a lock that names this
# process but no live commit of it was left behind by a failed release and may be taken over.
_PROCESS = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


@dataclass
class WriteLock:
    """A held lock: `refresh()` before each upload, which raises once the lock was lost."""

    location: Location
    etag: str

    def refresh(self) -> None:
        self.etag = _put(self.location, {"IfMatch": self.etag}, lost=True)


@contextmanager
def write_lock(prefix: Location) -> Iterator[WriteLock]:
    location = prefix.child(LOCK_NAME)
    lock = WriteLock(location, _acquire(location))
    with _HELD_GUARD:
        _HELD.add(location.uri)
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.discard(location.uri)
        _release(lock)


def _acquire(location: Location) -> str:
    deadline = time.monotonic() + WAIT_S
    while True:
        etag = _put(location, {"IfNoneMatch": "*"})
        if etag is not None:
            return etag
        holder, holder_etag = _read(location)
        if holder is None:  # released between our two requests
            continue
        if _abandoned(location, holder):
            taken = _put(location, {"IfMatch": holder_etag})
            if taken is not None:
                return taken
            continue  # another contender took it over first
        if time.monotonic() >= deadline:
            raise StorageError(
                f"{location.uri}: another writer ({holder.get('owner')}) has held this destination since "
                f"{holder.get('refreshed')}; try again later, or delete the lock object if that writer died"
            )
        time.sleep(POLL_S)


def _abandoned(location: Location, holder: dict) -> bool:
    owner = str(holder.get("owner", ""))
    if owner == _PROCESS:
        with _HELD_GUARD:
            return location.uri not in _HELD
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and not process_runs(int(pid)):
        return True
    age = time.time() - float(holder.get("refreshed_at", 0))
    return age > STALE_AFTER_S


def process_runs(pid: int) -> bool:
    """Whether process `pid` runs on this machine (as any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _body() -> bytes:
    now = time.time()
    refreshed = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    return json.dumps({"owner": _PROCESS, "refreshed_at": now, "refreshed": refreshed}).encode()


def _put(location: Location, condition: dict, lost: bool = False) -> str | None:
    """A conditional PUT of a fresh lock body: its ETag, or None when the condition fails
    (with `lost`, a StorageError instead: this writer no longer holds the lock)."""
    bucket, key = _bucket_and_key(location)

    def put() -> str | None:
        try:
            response = location.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=_body(), **condition)
        except OSError as error:
            if not _precondition_failed(error):
                raise
            if lost:
                raise StorageError(
                    f"{location.uri}: this writer lost the destination's lock to another writer "
                    "and stopped before uploading more"
                ) from error
            return None
        return response["ETag"]

    return guarded(location, put, "write lock")


def _read(location: Location) -> tuple[dict | None, str]:
    """The lock's content and ETag, or (None, "") when there is no lock."""
    bucket, key = _bucket_and_key(location)

    async def get_object() -> tuple[bytes, str]:
        response = await location.fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            return await body.read(), response["ETag"]
        finally:
            body.close()

    def get() -> tuple[dict | None, str]:
        from fsspec.asyn import sync  # S3 only; local merges never import fsspec

        try:
            data, etag = sync(location.fs.loop, get_object)
        except FileNotFoundError:
            return None, ""
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {"owner": "unknown (unreadable lock)", "refreshed_at": 0}
        return holder, etag

    return guarded(location, get, "write lock")


def _release(lock: WriteLock) -> None:
    bucket, key = _bucket_and_key(lock.location)
    # Lost to another writer, or the server is away: a lock left behind is taken over later
    # (it names this process, which holds it no longer), so there is nothing more to do.
    with contextlib.suppress(StorageError):
        guarded(
            lock.location,
            lambda: lock.location.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=lock.etag),
        )


def _bucket_and_key(location: Location) -> tuple[str, str]:
    bucket, key = location.path.split("/", 1)
    return bucket, key


def _precondition_failed(error: OSError) -> bool:
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)
