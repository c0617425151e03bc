"""Embedding extraction (Ray actors) and the zarr/Parquet embedding store.

`extract` is imported lazily: reading a store needs neither torch nor Ray.
"""
from typing import Any

from cratescale.embeddings.store import EmbeddingStore, StoreError, StoreInfo

__all__ = ["EmbeddingStore", "StoreError", "StoreInfo", "extract"]


def __getattr__(name: str) -> Any:
    if name == "extract":
        from cratescale.embeddings.extract import extract
        return extract
    raise AttributeError(name)
