"""One training rank for the 2-process tests: `python tests/dist/train_worker.py CONFIG MANIFEST [STOP_AFTER]`.

The launcher sets RANK/WORLD_SIZE/MASTER_*; STOP_AFTER makes the stop flag rise at that step boundary (the
graceful preemption path, deterministic), so a run can be stopped and resumed at a known step.
COUNT_COLLECTIVES=1 counts the collectives that cratescale's own modules issue (not DeepSpeed's), by module.
FINETUNE_SPEC='{"arm": ..., "set_name": ..., "export": ..., "class_names": [...]}' trains that fine-tune arm
(engine/finetune_task.py) instead of pretraining; CONFIG is then the fine-tune run's job (launch finetune_job).
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from cratescale.config import JobConfig, load_job
from cratescale.distributed import exit_without_teardown, shutdown_distributed, world_from_env
from cratescale.engine.finetune_task import FinetuneSpec, FinetuneTask
from cratescale.engine.trainer import train


def count_collectives() -> Counter:
    """Wrap torch.distributed's collectives: calls from a cratescale module are counted under its name."""
    counts: Counter = Counter()
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("cratescale."):
                counts[f"{caller}.{_name}"] += 1
            return _real(*args, **kwargs)
        setattr(dist, name, counted)
    return counts


def finetune_task(job: JobConfig, manifest: Path) -> FinetuneTask | None:
    spec = os.environ.get("FINETUNE_SPEC")
    if not spec:
        return None
    fields = json.loads(spec)
    return FinetuneTask(job, manifest, FinetuneSpec(**{**fields, "class_names": tuple(fields["class_names"])}))


def main() -> None:
    config, manifest = sys.argv[1], sys.argv[2]
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    boundaries = {"n": 0}

    def should_stop() -> bool:
        boundaries["n"] += 1
        return stop_after is not None and boundaries["n"] > stop_after

    counts = count_collectives() if os.environ.get("COUNT_COLLECTIVES") else None
    job = load_job(config)
    outcome = train(job, Path(job.run_dir), Path(manifest), world_from_env(), 1e11, should_stop=should_stop,
                    task=finetune_task(job, Path(manifest)))
    shutdown_distributed()
    result = {"status": outcome.status, "step": outcome.step}
    if counts is not None:
        result["collectives"] = dict(counts)
    print(json.dumps(result), flush=True)
    exit_without_teardown(0)  # as TrainTask does


if __name__ == "__main__":
    main()
