"""The safetensors format, read and written in pieces.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor
names to dtype, shape and byte offsets, then the raw little-endian data. Reading our own
headers (instead of mmap-ing through the safetensors package) lets us validate a file before
any heavy work, read any byte range of a tensor from disk or S3, and keep resident memory
bounded: a whole tensor is mapped only while a statistic scans it. (A file cut short while one
of its tensors is mapped ends the process with SIGBUS, as in any reader that maps files; every
file is checked against its header when opened.) Writing our own lets us stream a tensor out
in chunks while hashing the shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mergeflow.errors import CheckpointError
from mergeflow.sequential_file import SequentialFileWriter
from mergeflow.storage import Location

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class DType:
    """A safetensors dtype and the numpy dtype its bytes are held in. numpy has no bfloat16:
    bfloat16 tensors are held as their uint16 bit patterns, which the kernels widen."""

    name: str  # safetensors' name, e.g. "BF16"
    storage: type  # numpy dtype of the stored elements
    long_name: str  # torch's and HF configs' name, e.g. "bfloat16"
    is_float: bool = False

    @property
    def itemsize(self) -> int:
        return np.dtype(self.storage).itemsize

    def __str__(self) -> str:
        return self.long_name


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", np.float64, "float64", is_float=True),
        DType("F32", np.float32, "float32", is_float=True),
        DType("F16", np.float16, "float16", is_float=True),
        DType("BF16", np.uint16, "bfloat16", is_float=True),
        DType("I64", np.int64, "int64"),
        DType("I32", np.int32, "int32"),
        DType("I16", np.int16, "int16"),
        DType("I8", np.int8, "int8"),
        DType("U8", np.uint8, "uint8"),
        DType("BOOL", np.bool_, "bool"),
    )
}
DTYPES_BY_LONG_NAME = {d.long_name: d for d in DTYPES.values()}
FLOAT32, BFLOAT16 = DTYPES["F32"], DTYPES["BF16"]


def dtype_of(tensor) -> DType | None:
    """The DType of a torch tensor, or None for a dtype safetensors files here do not hold."""
    return DTYPES_BY_LONG_NAME.get(str(tensor.dtype).removeprefix("torch."))


def numpy_view(tensor) -> np.ndarray:
    """A torch tensor as the numpy array the writers take (bfloat16 as its bit patterns),
    for the callers that build tensors with torch: the zoo and pickle conversion. The merge
    engine itself never imports torch (importing it is most of a small merge's time)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


class TensorSize:
    """Elements and bytes of a tensor, from its `shape` and `dtype`."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class ComputedTensor(TensorSize):
    """A tensor computed whenever a range of it is read, standing in a model's tensor table for
    the model's own tensor `model` (an AdaptedTensor, a RealignedTensor): TensorFileReader.read
    hands reads of it to its `read(reader, start, count, into)`."""

    model: TensorEntry | ComputedTensor

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def dtype(self) -> DType:
        return self.model.dtype

    def output(self, count: int, into: np.ndarray | None) -> np.ndarray:
        """Where a read of `count` elements goes, in the storage dtype: the front of the uint8
        array `into` when given, as TensorFileReader.read does."""
        nbytes = count * self.dtype.itemsize
        buffer = np.empty(nbytes, dtype=np.uint8) if into is None else into[:nbytes]
        return buffer.view(self.dtype.storage)


@dataclass(frozen=True)
class TensorEntry(TensorSize):
    """Where one tensor lives: file, dtype, shape and absolute byte offset."""

    name: str
    file: Location
    dtype: DType
    shape: tuple[int, ...]
    offset: int


def read_header(file: Location) -> list[TensorEntry]:
    """Parse and check a safetensors header; a truncated or corrupt file fails here."""
    size = file.size()
    if size < 8:
        raise CheckpointError(f"{file.uri}: not a safetensors file ({size} bytes, truncated?)")
    (header_len,) = struct.unpack("<Q", file.read_range(0, 8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{file.uri}: corrupt safetensors header (declares {header_len} header bytes, file has {size})"
        )
    try:
        header = json.loads(file.read_range(8, header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file.uri}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.uri}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries.append(_entry(file, name, info, data_start, size))
    return entries


def _entry(file: Location, name: str, info: dict, data_start: int, size: int) -> TensorEntry:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file.uri}: tensor '{name}': malformed header entry") from exc
    if dtype_name not in DTYPES:
        raise CheckpointError(
            f"{file.uri}: tensor '{name}': unsupported dtype {dtype_name} (supported: {', '.join(DTYPES)})"
        )
    entry = TensorEntry(name, file, DTYPES[dtype_name], tuple(int(d) for d in shape), data_start + begin)
    if end - begin != entry.nbytes or begin < 0:
        raise CheckpointError(
            f"{file.uri}: tensor '{name}': header offsets [{begin}, {end}) do not match "
            f"shape {list(shape)} of {dtype_name}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{file.uri}: truncated: tensor '{name}' ends at byte {data_start + end}, file has {size} bytes"
        )
    return entry


class TensorFileReader:
    """Reads element ranges of tensors; keeps one open handle per local file."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        # What computed tensors (ComputedTensor) keep between reads, by their own keys; it goes
        # with the reader.
        self.derived: dict = {}

    def read(self, entry: TensorEntry, start: int, count: int, into: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, start+count) of the flattened tensor, in its storage dtype; read
        into the front of the uint8 array `into` when given (reusing a buffer saves page faults)."""
        if isinstance(entry, ComputedTensor):
            return entry.read(self, start, count, into)
        itemsize = entry.dtype.itemsize
        offset, nbytes = entry.offset + start * itemsize, count * itemsize
        buffer = np.empty(nbytes, dtype=np.uint8) if into is None else into[:nbytes]
        if entry.file.is_local:
            got = os.preadv(self._fd(entry.file.path), [buffer], offset)
        else:
            data = entry.file.read_range(offset, nbytes)
            got = len(data)
            if got == nbytes:
                buffer[:] = np.frombuffer(data, dtype=np.uint8)
        if got != nbytes:
            raise CheckpointError(
                f"{entry.file.uri}: tensor '{entry.name}': read {got} of {nbytes} bytes; "
                "the file changed or is truncated"
            )
        return buffer.view(entry.dtype.storage)

    def map(self, entry: TensorEntry) -> np.ndarray | None:
        """The bytes of a whole tensor of a local file as a read-only view of the file's pages
        (no copy), or None for a file in S3 or a tensor computed as it is read. The mapping goes
        when the last view of it does."""
        if isinstance(entry, ComputedTensor) or not entry.file.is_local:
            return None
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        try:
            length = entry.offset + entry.nbytes - start
            mapped = mmap.mmap(self._fd(entry.file.path), length, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError) as exc:  # a file cut short since its header was read
            raise CheckpointError(f"{entry.file.uri}: tensor '{entry.name}': cannot map it: {exc}") from exc
        return np.frombuffer(mapped, dtype=np.uint8, count=entry.nbytes, offset=entry.offset - start)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.derived.clear()


@dataclass(frozen=True)
class PlannedTensor(TensorSize):
    name: str
    dtype: DType
    shape: tuple[int, ...]


def header_bytes(tensors: list[PlannedTensor]) -> bytes:
    """The length prefix plus JSON header for tensors laid out in the given order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype.name,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded


class ShardFileWriter:
    """Writes one safetensors file sequentially, tensor after tensor, hashing as it goes unless
    `hashed` is off (a scratch file whose identity is that of its inputs).

    With a `hasher` (one thread), the hash is computed there, in order, while this writes: a
    write to the disk waits for the device, and hashing the same bytes meanwhile took the
    writer's time for large outputs. Pieces given to `write` must then stay unchanged."""

    HASH_QUEUE = 16  # pieces waiting for the hasher at most

    def __init__(
        self,
        path: str,
        tensors: list[PlannedTensor],
        hashed: bool = True,
        hasher: ThreadPoolExecutor | None = None,
    ) -> None:
        self.path = path
        self._pending = list(reversed(tensors))
        self._remaining = self._pending[-1].nbytes if self._pending else 0
        self._file = SequentialFileWriter(path)
        self._sha = hashlib.sha256() if hashed else None
        self._hasher = hasher
        self._hashing: deque[Future] = deque()
        self._write(header_bytes(tensors))

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next piece of tensor `name` (its storage dtype); pieces must arrive in
        layout order."""
        if not self._pending or self._pending[-1].name != name:
            expected = self._pending[-1].name if self._pending else "nothing"
            raise RuntimeError(f"{self.path}: got '{name}' but expected {expected}")
        raw = memoryview(np.ascontiguousarray(data)).cast("B")
        if raw.nbytes > self._remaining:
            raise RuntimeError(f"{self.path}: tensor '{name}' overflows its planned size")
        self._write(raw)
        self._remaining -= raw.nbytes
        if self._remaining == 0:
            self._pending.pop()
            self._remaining = self._pending[-1].nbytes if self._pending else 0

    @property
    def bytes_written(self) -> int:
        return self._file.size

    def finish(self) -> str | None:
        """Close the file, on the disk, and return its sha256 (None when not `hashed`); every
        planned byte must have been written."""
        if self._pending:
            raise RuntimeError(f"{self.path}: tensor '{self._pending[-1].name}' was not written")
        self._file.close()
        while self._hashing:
            self._hashing.popleft().result()
        return self._sha.hexdigest() if self._sha else None

    def abort(self) -> None:
        for hashing in self._hashing:
            hashing.cancel()
        self._file.abort()

    def _write(self, data) -> None:
        self._file.write(data)
        if self._sha is None:
            return
        if self._hasher is None:
            self._sha.update(data)
            return
        while len(self._hashing) >= self.HASH_QUEUE:
            self._hashing.popleft().result()
        self._hashing.append(self._hasher.submit(self._sha.update, data))
