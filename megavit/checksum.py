"""File checksums recorded in a directory's metadata (shards, statistics, EnSF problems), verified on read.

A writer records ``sha256_of(file)`` next to each file's shape and dtype; a reader calls
:func:`verify` before trusting the contents, so a file overwritten with well-formed but different
values, or damaged in a copy, stops the reader with the file's name instead of changing results.
SHA-256 reads about 1.7 GB/s on one core here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 8 << 20


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, expected: str | None, record: str | Path) -> None:
    """Raise ValueError naming ``path`` if its SHA-256 is not ``expected`` (as listed in ``record``).

    ``expected`` None (a directory written before checksums were recorded) checks nothing.
    """
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(f"{path}: checksum mismatch: {record} lists sha256 {expected[:16]}..., the file has "
                         f"{actual[:16]}... (changed or damaged after it was written); regenerate it")
