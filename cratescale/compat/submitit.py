"""submitit internals (written against submitit==1.5.4, pyproject.toml's pin; tests/unit/test_compat.py fails
naming it when an upgrade moves them). What we reach into, and why:

- `submitit.slurm.slurm._make_sbatch_string(command=, folder=, **parameters)`: the sbatch file a SlurmExecutor
  would write, shown by --dry-run without submitting anything (no public API renders it).
- `python -m submitit.core._submit <folder>`: the command submitit's executors run in the job, which that
  sbatch file must name for the dry run to show what a real submission runs.
- `SlurmExecutor._make_submission_file_text(command, uid)`: where the sbatch text is made; `RangeSlurmExecutor`
  rewrites its node request there (`--nodes=MIN-MAX --ntasks=N`, see `with_node_range`), because submitit's
  `nodes` parameter is an int it multiplies into its task count.
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


def with_node_range(text: str, min_nodes: int, max_nodes: int, tasks_per_node: int) -> str:
    """The sbatch text asking for MIN-MAX nodes (SLURM's requeue after a lost node then starts the job on the nodes
    it can get) and MAX x tasks_per_node tasks. The task count, not --ntasks-per-node, is what makes SLURM give
    the maximum when the nodes are free (SLURM_RECOVERY.md section 3: a bare range gets the minimum, and
    --ntasks-per-node would not fit on fewer nodes); the job's own srun lays its tasks out per node."""
    if min_nodes >= max_nodes:
        return text
    out = []
    for line in text.splitlines():
        if line.startswith("#SBATCH --ntasks-per-node="):
            continue
        if line.startswith("#SBATCH --nodes="):
            out += [f"#SBATCH --nodes={min_nodes}-{max_nodes}", f"#SBATCH --ntasks={max_nodes * tasks_per_node}"]
            continue
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def range_executor_class():
    """submitit.SlurmExecutor whose sbatch text asks for a node range (`node_range`: (min, max, tasks_per_node))."""
    import submitit

    class RangeSlurmExecutor(submitit.SlurmExecutor):
        node_range: tuple[int, int, int] | None = None

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            text = super()._make_submission_file_text(command, uid)
            return with_node_range(text, *self.node_range) if self.node_range else text

    return RangeSlurmExecutor
