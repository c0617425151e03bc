"""Ingest's journal of finished work units, so a killed ingest resumes instead of starting over.

    OUT/.ingest/<key>/                 key: a digest of the source and the options that shape a unit's result
        settings.json                  what the key covers (for a reader)
        <index>-<cover>.parquet        one finished unit: its rows; rejects, items seen and host in the metadata

The driver commits a unit when its result arrives (tmp, fsync, rename, folder fsync: durable.replaced_by, on
a writer thread), so a kill loses at most the units in flight and the commits not yet on disk. A rerun with the
same key feeds the committed units' results back and runs only the others; the manifest does not depend on
which run produced a unit (build_table sorts the rows), so it is byte-identical to an uninterrupted ingest's.
A rerun with other settings (another key) removes the old journal and starts clean. The journal goes once the
manifest is written.

A unit's id is its position in the plan plus a digest of what it covers (the file names of a chunk, an
archive's members and offsets, a streamed member's bytes; an archive's size and mtime), so a unit whose
source changed between the runs is run again. A file of a folder rewritten in place under the same name
between the kill and the rerun is not noticed (its listing is the same): the manifest then mixes the two
versions, as an uninterrupted ingest racing the same write would.
A compressed tar is one stream: the rerun must read it again up to its end, and skips only the processing
(validation, re-encoding, shard writing) of the committed units.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq

from .durable import replaced_by
from .sources import Unit
from .work import IngestOptions

JOURNAL_DIR = ".ingest"
FORMAT = 1  # of a committed unit's file; part of the key, so a changed format starts clean
_META = b"cratescale.unit"


def unit_id(unit: Unit) -> str:
    """`<index>-<digest of what the unit covers>`; see the module docstring."""
    params = unit.params
    if unit.kind == "bytes":  # streamed members: their bytes are what the unit covers
        params = {**params, "members": [(n, hashlib.blake2b(d, digest_size=16).hexdigest())
                                        for n, d in params["members"]]}
    elif "path" in params:  # an archive rewritten between the runs is another source
        st = os.stat(params["path"])
        params = {**params, "stat": (st.st_size, st.st_mtime_ns)}
    text = json.dumps([unit.kind, params], sort_keys=True)
    return f"{unit.index:06d}-{hashlib.blake2b(text.encode(), digest_size=10).hexdigest()}"


class Journal:
    """The committed units of one ingest of `source` with `opts` into opts.out_dir."""

    def __init__(self, source_id: str, opts: IngestOptions):
        settings = {"format": FORMAT, "source": source_id, **dataclasses.asdict(opts)}
        text = json.dumps(settings, sort_keys=True)
        key = hashlib.blake2b(text.encode(), digest_size=10).hexdigest()
        self.base = Path(opts.out_dir) / JOURNAL_DIR
        self.dir = self.base / key
        if self.base.is_dir():
            for old in self.base.iterdir():  # another source or other settings: those units do not apply
                if old.name != key and old.is_dir():
                    shutil.rmtree(old)
                elif old.name != key:
                    old.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "settings.json").exists():
            with replaced_by(self.dir / "settings.json") as f:
                f.write(text.encode())
        self.done = {p.name[:-len(".parquet")] for p in self.dir.iterdir()
                     if p.name.endswith(".parquet") and not p.name.startswith(".")}
        self.ids: dict[int, str] = {}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="ingest-journal")
        self.writes: list[Future] = []
        self.units = 0    # units seen in the plan
        self.resumed = 0  # of them, committed by an earlier run

    def pending(self, units: Iterable[Unit], on_result: Callable[[Unit, dict], None]) -> Iterator[Unit]:
        """The units still to run; each committed one is handed to `on_result` instead, as it comes."""
        for unit in units:
            self.units += 1
            uid = self.ids[unit.index] = unit_id(unit)
            if uid in self.done:
                self.resumed += 1
                on_result(unit, self._load(uid))
            else:
                yield unit

    def commit(self, unit: Unit, res: dict) -> None:
        """Make `res` (process_unit's result for `unit`) durable, on the writer thread: the driver goes on handing
        out units meanwhile (a commit's two fsyncs cost ~25 ms on a loaded disk, and workers waited on them)."""
        for done in [f for f in self.writes if f.done()]:
            self.writes.remove(done)
            done.result()  # a failed commit stops the ingest here, naming its file
        meta = {"rejects": res["rejects"], "seen": res["seen"], "host": res["host"]}
        table = res["rows"].replace_schema_metadata({_META: json.dumps(meta).encode()})
        self.writes.append(self.writer.submit(self._write, table, self.dir / f"{self.ids[unit.index]}.parquet"))

    @staticmethod
    def _write(table, path: Path) -> None:
        try:
            with replaced_by(path) as f:
                pq.write_table(table, f, compression="zstd")
        except OSError as e:  # ENOSPC on write names no file
            raise OSError(e.errno, f"ingest journal: cannot commit {path}: {e.strerror or e}") from e

    def flush(self) -> None:
        """Wait for every commit (raising the first that failed)."""
        for f in self.writes:
            f.result()
        self.writes = []

    def _load(self, uid: str) -> dict:
        table = pq.read_table(self.dir / f"{uid}.parquet")
        meta = json.loads(table.schema.metadata[_META])
        return {"rows": table.replace_schema_metadata(None), "rejects": meta["rejects"], "seen": meta["seen"],
                "seconds": 0.0, "host": "resumed"}

    def remove(self) -> None:
        self.flush()
        self.writer.shutdown()
        shutil.rmtree(self.base, ignore_errors=True)
