"""`python -m cratescale.embeddings info STORE [--verify]` | `... verify STORE [--drop-damaged]` |
`... extract EXPORT MANIFEST STORE [options]` |
`... index STORE [--feature F]` | `... neighbours STORE (--row N | --image PATH) -k K [--out PNG]` |
`... export STORE OUT --format npy|parquet`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cratescale.embeddings.extract import ExtractionError
from cratescale.embeddings.store import EmbeddingStore, StoreError, format_ranges


def _info(args: argparse.Namespace) -> int:
    s = EmbeddingStore(args.store).summary(checksums=args.verify)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    dims = ", ".join(f"{k}={v}" for k, v in s["dims"].items())
    damaged = s["damaged_shards"]
    usable = s["committed_shards"] - len(damaged)
    print(f"store     {s['root']}")
    print(f"rows      {s['rows']}")
    print(f"dims      {dims} ({s['dtype']})")
    print(f"shards    {s['total_shards']} x {s['shard_rows']} rows")
    pct = 100.0 * usable / s["total_shards"]
    print(f"coverage  {usable}/{s['total_shards']} shards committed and intact ({pct:.1f}%)")
    missing = format_ranges(s["missing_shards"])
    print(f"missing   {missing} (not committed: the extraction did not finish them; a rerun does)" if missing
          else "missing   none")
    for k, why in damaged.items():
        print(f"damaged   shard {k}: {why}")
    if not damaged:
        checked = "checksums checked" if s["checksums_checked"] else \
            f"files present; checksums not read: python -m cratescale.embeddings verify {s['root']}"
        print(f"damaged   none ({checked})")
    return 1 if damaged else 0


def _verify(args: argparse.Namespace) -> int:
    """Every committed shard's bytes against its marker; exit 1 naming the damaged ones."""
    store = EmbeddingStore(args.store)
    committed, damaged = store.committed(), store.damaged()
    for k, why in sorted(damaged.items()):
        start, stop = store.info.shard_range(k)
        print(f"damaged   shard {k} (rows {start}-{stop - 1}): {why}")
    missing = store.missing()
    print(f"verified  {len(committed) - len(damaged)}/{len(committed)} committed shards intact; "
          f"{len(missing)} not committed{' (' + format_ranges(missing) + ')' if missing else ''}")
    if damaged and args.drop_damaged:
        store.drop_shards(sorted(damaged))
        print(f"dropped   shard(s) {format_ranges(sorted(damaged))}: uncommitted, the next extraction of this store "
              f"writes them again")
    elif damaged:
        print(f"rerun     python -m cratescale.embeddings verify {store.root} --drop-damaged, then extract again",
              file=sys.stderr)
    return 1 if damaged else 0


def _extract(args: argparse.Namespace) -> int:
    from collections import Counter

    from cratescale.embeddings.extract import run_extraction
    out, records = run_extraction(
        args.export, args.manifest, args.store, features=tuple(args.features.split(",")),
        layers=tuple(int(x) for x in args.layers.split(",") if x), dtype=args.dtype, batch_size=args.batch_size,
        actors=args.actors, image_size=args.image_size, loader_kind=args.loader, shard_rows=args.shard_rows,
        chunk_rows=args.chunk_rows, split=args.split, ray_address=args.ray_address, num_cpus_per_actor=0.5,
        num_gpus_per_actor=args.gpus_per_actor, amp="auto", threads_per_actor=None,
        shards_per_task=args.shards_per_task, max_restarts=args.max_restarts,
        rss_limit=None if args.rss_limit_mb is None else int(args.rss_limit_mb * 2**20))
    print(out)
    if records:
        hosts = Counter(str(r["host"]) for r in records)
        print("shards per host: " + ", ".join(f"{h} {n}" for h, n in sorted(hosts.items())))
    return 0


def _index(args: argparse.Namespace) -> int:
    from cratescale.embeddings.index import build_index

    build_index(EmbeddingStore(args.store), args.feature, kind=args.kind, log=print)
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    from cratescale.embeddings.index import NeighbourIndex
    from cratescale.embeddings.neighbours import Samples, by_image, by_row, picture

    store = EmbeddingStore(args.store)
    index, samples = NeighbourIndex(store, args.feature), Samples(store)
    if args.row is not None:
        found = by_row(index, samples, args.row, args.k)
        m = samples.meta.loc[args.row]
        view, title = samples.image(args.row), f"query: row {args.row}\n{samples.name(int(m.label))}"
        print(f"query     row {args.row} (sample {m.sample_id}, {m.key}, label {m.label} {samples.name(int(m.label))})")
    else:
        found, view = by_image(index, samples, args.image, args.k)
        title = f"query\n{Path(args.image).name}"
        print(f"query     {args.image}")
    meta = index.meta
    print(f"index     {meta['kind']} over {meta['rows']:,} rows of {args.feature!r}, {meta['metric']}")
    print(f"{'rank':>4} {'row':>8} {'sample_id':>10} {'label':>5}  {'class':<16} {'distance':>8}  key")
    for n in found:
        print(f"{n.rank:>4} {n.row:>8} {n.sample_id:>10} {n.label:>5}  {n.name:<16} {n.distance:>8.4f}  {n.key}")
    if args.out:
        print(f"picture   {picture(view, title, found, samples, args.out)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cratescale.embeddings.tables import export_tables

    features = args.feature.split(",") if args.feature else None
    out, n, left = export_tables(EmbeddingStore(args.store), args.out, args.format, features)
    print(f"{out}: {n:,} rows ({args.format}); {left:,} rows without features left out")
    return 0


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def _int_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cratescale.embeddings")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="rows, dims, coverage and missing shards of a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true", help="also read every committed byte (as verify does)")
    v = sub.add_parser("verify", help="check every committed shard against its checksums; exit 1 naming damaged ones")
    v.add_argument("store")
    v.add_argument("--drop-damaged", action="store_true",
                   help="uncommit the damaged shards, so that the next extraction writes them again")
    e = sub.add_parser("extract", help="run the encoder of an export over a manifest into a store")
    e.add_argument("export")
    e.add_argument("manifest")
    e.add_argument("store")
    e.add_argument("--features", default="cls,mean")
    e.add_argument("--layers", default="")
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--batch-size", type=_int_or_auto, default=64, help="a number, or auto (from memory)")
    e.add_argument("--actors", type=_int_or_auto, default=2, help="0: in-process, no Ray; auto: from the nodes")
    e.add_argument("--gpus-per-actor", type=float, default=0.0)
    e.add_argument("--max-restarts", type=int, default=3, help="restarts of a dead actor before the run stops")
    e.add_argument("--rss-limit-mb", type=float, default=None,
                   help="an actor over this RSS kills itself (default: 2 x its predicted peak; 0: off)")
    e.add_argument("--image-size", type=int, default=None)
    e.add_argument("--loader", default="auto")
    e.add_argument("--shard-rows", type=int, default=4096)
    e.add_argument("--chunk-rows", type=int, default=1024)
    e.add_argument("--split", default=None)
    e.add_argument("--shards-per-task", type=int, default=0, help="0: about two tasks per actor, at most 8")
    e.add_argument("--ray-address", default=None)
    x = sub.add_parser("index", help="a FAISS nearest-neighbour index of one feature, kept in STORE/index/")
    x.add_argument("store")
    x.add_argument("--feature", default="cls")
    x.add_argument("--kind", default="auto", choices=["auto", "flat", "ivfpq"],
                   help="auto: exact up to 2,000,000 rows, IVF-PQ above")
    n = sub.add_parser("neighbours", help="the K nearest rows to a stored row or an image, with labels")
    n.add_argument("store")
    query = n.add_mutually_exclusive_group(required=True)
    query.add_argument("--row", type=int, help="a store row")
    query.add_argument("--image", help="an image file, encoded by the store's export")
    n.add_argument("-k", type=_positive, default=10)
    n.add_argument("--feature", default="cls")
    n.add_argument("--out", help="a PNG: the query and its neighbours, labels under each")
    t = sub.add_parser("export", help="features with ids and labels as plain arrays")
    t.add_argument("store")
    t.add_argument("out")
    t.add_argument("--format", required=True, choices=["npy", "parquet"])
    t.add_argument("--feature", default=None, help="comma-separated (default: every feature)")
    args = p.parse_args(argv)
    commands = {"info": _info, "verify": _verify, "extract": _extract, "index": _index, "neighbours": _neighbours,
                "export": _export}
    try:
        return commands[args.cmd](args)
    except (StoreError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExtractionError as err:  # ran, and stopped: committed shards are kept, a rerun resumes
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
