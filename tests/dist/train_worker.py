"""One training rank for the 2-process tests: `python tests/dist/train_worker.py CONFIG MANIFEST [STOP_AFTER]`.

The launcher sets RANK/WORLD_SIZE/MASTER_*; STOP_AFTER makes the stop flag rise at that step boundary (the
graceful preemption path, deterministic), so a run can be stopped and resumed at a known step.
"""
import json
import sys
from pathlib import Path

from cratescale.config import load_job
from cratescale.distributed import exit_without_teardown, shutdown_distributed, world_from_env
from cratescale.engine.trainer import train


def main() -> None:
    config, manifest = sys.argv[1], sys.argv[2]
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    boundaries = {"n": 0}

    def should_stop() -> bool:
        boundaries["n"] += 1
        return stop_after is not None and boundaries["n"] > stop_after

    job = load_job(config)
    outcome = train(job, Path(job.run_dir), Path(manifest), world_from_env(), 1e11, should_stop=should_stop)
    shutdown_distributed()
    print(json.dumps({"status": outcome.status, "step": outcome.step}), flush=True)
    exit_without_teardown(0)  # as TrainTask does


if __name__ == "__main__":
    main()
