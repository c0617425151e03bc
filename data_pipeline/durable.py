"""The manifests' and tar shards' durable replace. cratescale/files.py is the package's; data_pipeline imports
nothing from cratescale (DESIGN.md section 2), so this is its one copy."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def replaced_by(path: Path) -> Iterator[BinaryIO]:
    """An open binary file whose bytes replace `path` when the block ends: written beside it under a dot name
    (dataset readers skip those), fsynced, renamed, the folder fsynced. Readers see the old file or the whole
    new one, also after a crash; on an error the partial file goes and `path` is untouched."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
