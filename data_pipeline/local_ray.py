"""One way to start a local Ray, shared by ingest, extraction, the launcher and the tests."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def start_local_ray(num_cpus: int | None = None, object_store_mb: int = 256, log_to_driver: bool = False) -> None:
    """A fresh local Ray on loopback with token auth on and a capped object store.

    address="local": never attach to some other Ray found on this machine. Ray swaps 127.0.0.1 for the host's
    routable address and listens on all interfaces unless it runs in its single-machine mode, which keeps every
    server on loopback. Workers get this checkout on PYTHONPATH so they import it even when not installed.
    """
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False             # this driver
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the GCS, raylet and workers it starts
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, object_store_memory=object_store_mb * 2**20,
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
