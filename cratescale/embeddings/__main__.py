"""`python -m cratescale.embeddings info STORE` | `... extract EXPORT MANIFEST STORE [options]`."""
from __future__ import annotations

import argparse
import json
import sys

from cratescale.embeddings.extract import ExtractionError
from cratescale.embeddings.store import EmbeddingStore, StoreError, format_ranges


def _info(args: argparse.Namespace) -> int:
    s = EmbeddingStore(args.store).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    dims = ", ".join(f"{k}={v}" for k, v in s["dims"].items())
    pct = 100.0 * s["committed_shards"] / s["total_shards"]
    print(f"store     {s['root']}")
    print(f"rows      {s['rows']}")
    print(f"dims      {dims} ({s['dtype']})")
    print(f"shards    {s['total_shards']} x {s['shard_rows']} rows")
    print(f"coverage  {s['committed_shards']}/{s['total_shards']} shards committed ({pct:.1f}%)")
    print(f"missing   {format_ranges(s['missing_shards']) or 'none'}")
    return 0


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


def _int_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cratescale.embeddings")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="rows, dims, coverage and missing shards of a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
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
    args = p.parse_args(argv)
    try:
        return _info(args) if args.cmd == "info" else _extract(args)
    except (StoreError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExtractionError as err:  # ran, and stopped: committed shards are kept, a rerun resumes
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
