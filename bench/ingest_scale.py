"""Resumable ingest at scale (issue 31 item 3): a synthetic ImageFolder of tiny JPEGs, listed and ingested.

    PYTHONPATH=$PWD .venv/bin/python bench/ingest_scale.py [--classes 1000] [--per-class 1000] [--dir /tmp]

Targets, written before any measurement (never changed after):
- A kill at half-way loses at most the units in flight: time of the killed run + the rerun - one uninterrupted
  run <= 2 units' time + one start-up (the process and Ray starting, and the plan: listing the tree again).
- The folder listing in parallel (one Ray task per class directory) is >= 1.3x the serial listing on 2 cores
  (the same listing code run serially, as --workers 0 does; today's os.walk listing is reported beside it).
- Reported, no target: ingest files/s per core (check-only, no reshard), and the journal's cost.
"""
