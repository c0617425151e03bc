"""`python -m cratescale.evaluation predict EXPORT FOLDER [--json] [options]`: top-1 of a fine-tuned (classifier)
export on a folder of class folders (evaluation/predict.py). Bad input is one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from cratescale.evaluation.predict import PredictError, predict


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _predict(args: argparse.Namespace) -> int:
    r = predict(args.export, args.folder, work_dir=args.work_dir, batch_size=args.batch_size, loader=args.loader)
    if args.json:
        print(json.dumps({"top1": r["top1"], "n": r["n"]}))
        return 0
    print(f"top-1 {100 * r['top1']:.2f}% ({r['correct']} of {r['n']} images, {len(r['classes'])} classes: "
          f"{', '.join(r['classes'][:10])}{' ...' if len(r['classes']) > 10 else ''})")
    if r["rejected"] or r["undecodable"]:
        print(f"left out: {r['rejected']} files ingest rejected, {r['undecodable']} that did not decode")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cratescale.evaluation")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("predict", help="top-1 of a fine-tuned export on a folder of class folders")
    q.add_argument("export", help="a fine-tuned (classifier) export directory")
    q.add_argument("folder", help="a folder of class folders of images; class names as the export names them")
    q.add_argument("--json", action="store_true", help='print {"top1": ..., "n": ...} only')
    q.add_argument("--work-dir", default=None, help="where the folder's manifest is written (default: a temporary "
                                                    "directory, removed afterwards)")
    q.add_argument("--batch-size", type=_positive, default=64)
    q.add_argument("--loader", default="auto", choices=["auto", "dali", "pil"])
    args = p.parse_args(argv)
    try:
        return _predict(args)
    except (PredictError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
