"""What `store.json` says of an embedding store (StoreInfo) and the store's errors, apart from the store itself
(store.py) so that both stay readable; store.py re-exports them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

FORMAT_VERSION = 1


class StoreError(ValueError):
    """A store is missing, malformed, or does not match what the caller asked for."""


class StoreDamagedError(StoreError):
    """Committed shards whose bytes no longer match their commit markers (disk or copy damage)."""

    def __init__(self, root: Path, damaged: Mapping[int, str]) -> None:
        self.root, self.damaged = Path(root), dict(damaged)
        first = next(iter(self.damaged.items()))
        more = f" (and {len(self.damaged) - 1} more)" if len(self.damaged) > 1 else ""
        super().__init__(f"{root}: damaged shard(s) {format_ranges(sorted(self.damaged))}: shard {first[0]}: "
                         f"{first[1]}{more}; rerun: python -m cratescale.embeddings verify {root} --drop-damaged, "
                         f"then extract again (the launcher: --stages extract,evaluate)")


class StoreWriteError(StoreError):
    """Writing a shard failed (disk full, I/O error): it stays uncommitted, its partial files are removed."""


@dataclass(frozen=True)
class StoreInfo:
    """What `store.json` holds: everything needed to interpret the arrays."""
    num_rows: int
    dims: dict[str, int]
    dtype: str = "float16"
    shard_rows: int = 4096
    chunk_rows: int = 1024
    source: dict[str, Any] = field(default_factory=dict)      # manifest path, fingerprint, row selection
    provenance: dict[str, Any] = field(default_factory=dict)  # export provenance + model config

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.num_shards:
            raise StoreError(f"shard {k} out of range [0, {self.num_shards})")
        start = k * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "num_rows": self.num_rows, "dims": dict(self.dims),
                "dtype": self.dtype, "shard_rows": self.shard_rows, "chunk_rows": self.chunk_rows,
                "num_shards": self.num_shards, "source": self.source, "provenance": self.provenance}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "StoreInfo":
        return cls(num_rows=int(d["num_rows"]), dims={k: int(v) for k, v in d["dims"].items()},
                   dtype=d["dtype"], shard_rows=int(d["shard_rows"]), chunk_rows=int(d["chunk_rows"]),
                   source=d.get("source", {}), provenance=d.get("provenance", {}))

    def validate(self) -> None:
        if self.num_rows <= 0:
            raise StoreError(f"num_rows must be > 0, got {self.num_rows}")
        if not self.dims or any(int(v) <= 0 for v in self.dims.values()):
            raise StoreError(f"dims must be a non-empty {{name: d > 0}} mapping, got {self.dims}")
        for name in self.dims:
            if not name.replace("_", "").isalnum():
                raise StoreError(f"feature name {name!r} must be alphanumeric/underscore")
        if self.dtype not in ("float16", "float32"):
            raise StoreError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.chunk_rows <= 0 or self.shard_rows <= 0 or self.shard_rows % self.chunk_rows:
            raise StoreError(f"shard_rows ({self.shard_rows}) must be a positive multiple of "
                             f"chunk_rows ({self.chunk_rows})")


def format_ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return ", ".join(out)
