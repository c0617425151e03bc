"""The one way to start or join Ray, shared by ingest, extraction, the launcher, the benchmarks and the tests,
and the project's one door to Ray's internals (here, not in cratescale/compat: data_pipeline imports nothing
from cratescale, DESIGN.md section 2, and everything that starts Ray comes through this module).

Ray internals (written against ray==2.60.0, pyproject.toml's pin; tests/unit/test_compat.py fails naming it
when an upgrade moves them):
- `ray._private.ray_constants.ENABLE_RAY_CLUSTER`: False puts the driver in Ray's single-machine mode, where
  every server listens on loopback; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is the same switch for the processes
  it starts (the variable Ray reads for it, whatever the OS).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY_PINNED = "2.60.0"


def runtime_env() -> dict:
    """The one runtime_env policy: workers import this checkout (first on PYTHONPATH), as the SLURM ranks do.
    On a cluster the checkout sits on the file system every node shares (the sbatch scripts assume it too).

    Workers run at the raylet's priority: Ray renices each worker by +15 (RAY_worker_niceness) to keep its own
    servers responsive, and the training ranks the supervisor starts under the local executor, the ingest tasks
    and the extraction actors inherit it. On a machine shared with other work (two busy loops beside a CI run)
    a nice-15 job got 3% of the CPU: 0 adds nothing to the niceness the launcher itself runs at."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "RAY_worker_niceness": "0"}}


def start_or_join_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int = 256,
                      log_to_driver: bool = False) -> bool:
    """Join the Ray cluster at `address` (else $RAY_ADDRESS: inside an allocation, the one that
    cluster/ray_in_allocation.sbatch started; its token comes from $RAY_AUTH_TOKEN_PATH), or start a fresh
    local Ray. Returns False when Ray was already initialised in this process (the caller does not own it).

    Local: address="local" never attaches to some other Ray found on this machine. Ray swaps 127.0.0.1 for
    the host's routable address and listens on all interfaces unless it runs in its single-machine mode, which
    keeps every server on loopback; token auth is on and the object store capped.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env())
        return True
    with single_machine_mode():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2,
                 object_store_memory=object_store_mb * 2**20, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=log_to_driver, runtime_env=runtime_env())
    return True


@contextmanager
def single_machine_mode():
    """Ray's single-machine mode for the local Ray started inside the block: every server on loopback. The
    variable is put back afterwards (the GCS and raylet keep it, and the raylet hands it to its workers): a job
    this process submits later, or a `ray start` it runs, must not inherit it, or a multi-node Ray there refuses
    to start ("not supported on Windows and OSX")."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this driver
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
