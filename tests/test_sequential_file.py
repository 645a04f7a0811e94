"""Files written past the page cache hold exactly the bytes written, whatever their sizes."""

import os
from pathlib import Path

import numpy as np
import pytest

from mergeflow.sequential_file import ALIGNMENT, BUFFER_BYTES, SequentialFileWriter

# Pieces around the alignment and buffer boundaries, so a file crosses full buffers, whole
# blocks and ends in a partial one.
PIECES = [0, 1, 8, ALIGNMENT - 9, ALIGNMENT, ALIGNMENT + 1]
PIECES += [BUFFER_BYTES - 3, BUFFER_BYTES, 5, 3 * BUFFER_BYTES + 7]


def write_pieces(path: Path, sizes: list[int], switch_after: int | None = None) -> tuple[bytes, bool]:
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    writer = SequentialFileWriter(str(path))
    opened_direct = writer.direct
    for i, piece in enumerate(pieces):
        writer.write(piece if i % 2 else piece.tobytes())  # arrays and bytes alike
        if i == switch_after:
            writer._stop_direct_io()
    assert writer.size == sum(sizes)
    writer.close()
    return b"".join(p.tobytes() for p in pieces), opened_direct


@pytest.mark.parametrize("sizes", [PIECES, [ALIGNMENT * 3], [BUFFER_BYTES + ALIGNMENT], [7], []])
def test_a_file_written_with_direct_io_holds_exactly_its_bytes(tmp_path, sizes):
    expected, direct = write_pieces(tmp_path / "shard", sizes)
    assert (tmp_path / "shard").read_bytes() == expected
    # The suite's temporary folders are on a disk filesystem here (ext4): this covers the
    # O_DIRECT path, its padded last block and the truncation after it.
    assert direct == hasattr(os, "O_DIRECT")


def test_a_file_that_stops_direct_io_midway_is_complete(tmp_path):
    """The path taken when a filesystem accepts O_DIRECT but refuses its writes: the rest,
    the last partial block included, goes through the page cache."""
    expected, _ = write_pieces(tmp_path / "shard", PIECES, switch_after=4)
    assert (tmp_path / "shard").read_bytes() == expected


def test_an_existing_file_is_replaced(tmp_path):
    path = tmp_path / "shard"
    path.write_bytes(b"x" * (3 * ALIGNMENT + 5))
    writer = SequentialFileWriter(str(path))
    writer.write(b"abc")
    writer.close()
    assert path.read_bytes() == b"abc"
