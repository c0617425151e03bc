"""submitit internals (written against submitit==1.5.4, pyproject.toml's pin; tests/unit/test_compat.py fails
naming it when an upgrade moves them). What we reach into, and why:

- `submitit.slurm.slurm._make_sbatch_string(command=, folder=, **parameters)`: the sbatch file a SlurmExecutor
  would write, shown by --dry-run without submitting anything (no public API renders it).
- `python -m submitit.core._submit <folder>`: the command submitit's executors run in the job, which that
  sbatch file must name for the dry run to show what a real submission runs.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

PINNED = "1.5.4"
SUBMIT_MODULE = "submitit.core._submit"


def sbatch_text(folder: Path | str, parameters: dict[str, Any]) -> str:
    """The sbatch script submitit writes for a job with these SlurmExecutor parameters in `folder`."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"python -u -m {SUBMIT_MODULE} " + shlex.quote(str(folder))
    return _make_sbatch_string(command=command, folder=str(folder), **parameters)
