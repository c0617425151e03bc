"""Resumable ingest at scale (issue 31 item 3): a synthetic ImageFolder of tiny JPEGs, listed and ingested.

    PYTHONPATH=$PWD .venv/bin/python bench/ingest_scale.py [--classes 1000] [--per-class 1000] [--dir /tmp]

Targets, written before any measurement (never changed after):
- A kill at half-way loses at most the units in flight: time of the killed run + the rerun - one uninterrupted
  run <= 2 units' time + one start-up (the process and Ray starting, and the plan: listing the tree again).
- The folder listing in parallel (one Ray task per class directory) is >= 1.3x the serial listing on 2 cores
  (the same listing code run serially, as --workers 0 does; today's os.walk listing is reported beside it).
- Reported, no target: ingest files/s per core (check-only, no reshard), and the journal's cost.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "ingest_scale.json"
PY = sys.executable

# Times a listing in a fresh process: `map` is "serial" or "ray" (2 CPUs, started and warmed before the clock).
_LIST = """
import json, sys, time
from data_pipeline.sources import plan_source
root, how = sys.argv[1], sys.argv[2]
jobs = None
if how == "ray":
    from data_pipeline.listing import list_subtrees, ray_map
    from data_pipeline.local_ray import start_or_join_ray
    import ray
    start_or_join_ray(num_cpus=2)
    jobs = ray_map(ray)
    list(jobs(list_subtrees, [(root, ["c0000"])] * 4))  # both workers up, data_pipeline imported in them
t = time.perf_counter()
plan = plan_source(root, None, 1000, jobs) if jobs else plan_source(root, None, 1000)
import data_pipeline
print(json.dumps({"seconds": time.perf_counter() - t, "files": sum(u.count for u in plan.units),
                  "code": data_pipeline.__file__}))
"""


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 40, 200)).save(buf, "JPEG", quality=75)
    return buf.getvalue()


def check_room(where: Path, files: int, size: int) -> None:
    st = os.statvfs(where)
    need_bytes, need_inodes = files * (max(size, st.f_bsize) + 256) * 1.2, files * 1.1
    if st.f_bavail * st.f_frsize < need_bytes or st.f_favail < need_inodes:
        sys.exit(f"bench/ingest_scale.py: {where} has {st.f_bavail * st.f_frsize / 2**30:.1f} GiB and {st.f_favail} "
                 f"inodes free; {files} files need {need_bytes / 2**30:.1f} GiB and {need_inodes:.0f} inodes")


def build_tree(root: Path, classes: int, per_class: int, data: bytes) -> float:
    t = time.perf_counter()
    for c in range(classes):
        d = root / f"c{c:04d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            fd = os.open(d / f"{i:06d}.jpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    return time.perf_counter() - t


def base_checkout(dest: Path) -> Path:
    """main's data_pipeline (today's serial os.walk listing, no journal), for the baselines."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "main", "data_pipeline"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def env(pythonpath: Path) -> dict:
    # the command also runs in `pythonpath`: `python -m` and `-c` put their working directory first on sys.path
    return {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}


def time_listing(root: Path, how: str, code: Path) -> dict:
    out = subprocess.run([PY, "-c", _LIST, str(root), how], env=env(code), cwd=code, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def committed(out: Path) -> int:
    return sum(1 for p in (out / ".ingest").glob("*/*.parquet") if not p.name.startswith("."))


def ingest(root: Path, out: Path, code: Path, kill_at: int | None = None) -> dict:
    """The ingest CLI (2 Ray workers) in a fresh process, timed from its launch; the journal is polled for commit
    times; with `kill_at`, SIGKILLed once that many units are committed."""
    cmd = [PY, "-m", "data_pipeline.ingest", str(root), str(out), "--workers", "2", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(code), cwd=code, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    first = last = None
    seen = before = committed(out)  # a rerun starts with the killed run's units
    while proc.poll() is None:
        n = committed(out)
        now = time.perf_counter() - t0
        if n > before and first is None:
            first = now
        if n > seen:
            seen, last = n, now
        if kill_at is not None and n >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    _reap_session(proc.pid)
    res = {"wall_s": wall, "rc": proc.returncode, "first_commit_s": first, "last_commit_s": last,
           "committed_at_end": committed(out)}
    if kill_at is None:
        if proc.returncode != 0:
            sys.exit(f"ingest failed: {stderr[-2000:]}")
        m = re.search(r"in ([\d.]+) s \(([\d.]+) s starting Ray", stdout)
        r = re.search(r"resumed: (\d+) of (\d+) units", stdout)
        res.update(seconds=float(m.group(1)), ray_start_s=float(m.group(2)), summary=stdout.strip().splitlines())
        if r:
            res.update(resumed=int(r.group(1)), units=int(r.group(2)))
        res["manifest_sha256"] = hashlib.sha256((out / "manifest.parquet").read_bytes()).hexdigest()
    return res


def _reap_session(sid: int) -> None:
    """Processes the killed ingest started (its Ray) and left behind, ended one by one by id."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in ps:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) == sid and int(parts[0]) != os.getpid():
            try:
                os.kill(int(parts[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    work = a.dir / f"ingest_scale.{os.getpid()}"
    root, files = work / "tree", a.classes * a.per_class
    data = tiny_jpeg()
    check_room(a.dir, files, len(data))
    rec: dict = {"files": files, "classes": a.classes, "jpeg_bytes": len(data), "cpus": os.cpu_count(),
                 "load_before": os.getloadavg()}
    try:
        rec["create_s"] = build_tree(root, a.classes, a.per_class, data)
        os.sync()  # else the first run's fsyncs wait for the tree's gigabytes of dirty pages
        print(f"tree of {files} files built in {rec['create_s']:.0f} s", flush=True)
        base = base_checkout(work / "base")
        time_listing(root, "serial", REPO)  # warm the directory cache once for all
        listing = {k: [] for k in ("today_serial", "serial", "ray")}
        for _ in range(a.repeats):  # interleaved: the machine is shared
            listing["today_serial"].append(time_listing(root, "serial", base))
            listing["serial"].append(time_listing(root, "serial", REPO))
            listing["ray"].append(time_listing(root, "ray", REPO))
        assert all(x["files"] == files for v in listing.values() for x in v)
        rec["listing"] = listing
        print("listing", json.dumps(listing), flush=True)
        runs = {"today": ingest(root, work / "out_today", base), "whole": ingest(root, work / "out", REPO)}
        print("whole", json.dumps(runs["whole"]["summary"]), flush=True)
        shutil.rmtree(work / "out")
        units = runs["whole"]["units"]
        runs["killed"] = ingest(root, work / "out", REPO, kill_at=units // 2)
        runs["rerun"] = ingest(root, work / "out", REPO)
        rec["runs"] = runs
    finally:
        rec["load_after"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    rec.update(derive(rec))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(rec, indent=1) + "\n")
    report(rec)


def derive(rec: dict) -> dict:
    runs, files = rec["runs"], rec["files"]
    whole, killed, rerun = runs["whole"], runs["killed"], runs["rerun"]
    units = whole["units"]
    # one worker's time on one unit: the commit rate of the whole run, times the 2 workers
    unit_s = (whole["last_commit_s"] - whole["first_commit_s"]) / (units - 1) * 2
    startup_s = whole["first_commit_s"] - unit_s  # launch to the first unit's start: imports, Ray, listing
    lost = killed["wall_s"] + rerun["wall_s"] - whole["wall_s"]
    # The same loss taken apart, free of the runs' different speeds on a shared machine: the killed run's work
    # since its last commit (the units in flight), then the rerun's time to its first new unit's start
    # (imports, Ray, listing, replaying the committed units).
    in_flight_s = killed["wall_s"] - killed["last_commit_s"]
    restart_s = rerun["first_commit_s"] - unit_s
    best = {k: min(x["seconds"] for x in v) for k, v in rec["listing"].items()}
    per_core = (lambda r: files / (r["seconds"] - r["ray_start_s"]) / 2)
    return {"derived": {
        "unit_s": unit_s, "startup_s": startup_s, "lost_s": lost, "lost_budget_s": 2 * unit_s + startup_s,
        "in_flight_s": in_flight_s, "restart_s": restart_s, "lost_parts_s": in_flight_s + restart_s,
        "kill_met": lost <= 2 * unit_s + startup_s,
        "same_manifest": rerun["manifest_sha256"] == whole["manifest_sha256"],
        "resumed": rerun.get("resumed"), "units": units, "committed_at_kill": killed["committed_at_end"],
        "listing_best_s": best, "listing_ratio_vs_serial": best["serial"] / best["ray"],
        "listing_ratio_vs_today": best["today_serial"] / best["ray"],
        "listing_met": best["serial"] / best["ray"] >= 1.3,
        "files_per_s_per_core": per_core(whole), "files_per_s_per_core_today": per_core(runs["today"])}}


def report(rec: dict) -> None:
    d = rec["derived"]
    b = d["listing_best_s"]
    print(f"\nbench/ingest_scale.py  {rec['files']} files in {rec['classes']} classes, local Ray 2 CPUs, "
          f"load {rec['load_before'][0]:.1f} -> {rec['load_after'][0]:.1f}")
    print(f"listing files/s: today (os.walk) {rec['files'] / b['today_serial']:.0f}, "
          f"serial {rec['files'] / b['serial']:.0f}, "
          f"Ray {rec['files'] / b['ray']:.0f}  ratio {d['listing_ratio_vs_serial']:.2f}x vs serial "
          f"({d['listing_ratio_vs_today']:.2f}x vs today), target >= 1.3x: {'met' if d['listing_met'] else 'MISSED'}")
    print(f"ingest files/s per core: {d['files_per_s_per_core']:.0f} (today {d['files_per_s_per_core_today']:.0f})")
    print(f"kill at half-way: lost {d['lost_s']:.1f} s, budget {d['lost_budget_s']:.1f} s "
          f"(2 units of {d['unit_s']:.2f} s "
          f"+ start-up {d['startup_s']:.1f} s): {'met' if d['kill_met'] else 'MISSED'}; taken apart: in flight "
          f"{d['in_flight_s']:.1f} s + restart {d['restart_s']:.1f} s; resumed {d['resumed']} of "
          f"{d['units']} units; same manifest bytes: {d['same_manifest']}")


if __name__ == "__main__":
    main()
