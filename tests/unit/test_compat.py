"""The doors to library internals (cratescale/compat/, data_pipeline/local_ray.py): each fails loudly, naming
the pinned version, when the installed library is not the pin or an internal a door uses has moved. No mocks:
the installed libraries are inspected."""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import tomllib
from pathlib import Path

import pytest

from cratescale.compat import deepspeed as ds_compat
from cratescale.compat import submitit as submitit_compat
from data_pipeline import local_ray

REPO = Path(__file__).resolve().parents[2]
DOORS = {"deepspeed": ("cratescale/compat/deepspeed.py", ds_compat.PINNED),
         "submitit": ("cratescale/compat/submitit.py", submitit_compat.PINNED),
         "ray": ("data_pipeline/local_ray.py", local_ray.RAY_PINNED)}


def pyproject_pin(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(rf"{name}(?:\[[^]]*\])?==([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml pins {name} {len(pins)} times, expected once with =="
    return pins[0]


def moved(name: str, what: str) -> str:
    door, pinned = DOORS[name]
    installed = importlib.metadata.version(name)
    return (f"{name} {installed} (door {door}, written against {name}=={pinned}): {what}; "
            f"check the door against the new {name} before changing the pin")


@pytest.mark.parametrize("name", sorted(DOORS))
def test_installed_version_is_the_pin(name: str) -> None:
    door, pinned = DOORS[name]
    pin, installed = pyproject_pin(name), importlib.metadata.version(name)
    assert pin == pinned, f"pyproject.toml pins {name}=={pin}, {door} was written against {pinned}: check the door"
    assert installed == pin, f"{name} {installed} is installed, pyproject.toml pins {pin} ({door} relies on its internals)"


def _has(obj: object, attr: str, name: str) -> object:
    assert hasattr(obj, attr), moved(name, f"{getattr(obj, '__name__', obj)}.{attr} is gone")
    return getattr(obj, attr)


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_deepspeed_internals_are_where_the_door_expects_them() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    comm = importlib.import_module("deepspeed.comm.torch")
    assert _params(_has(comm, "build_shm_op", "deepspeed")) == [], moved("deepspeed", "build_shm_op takes arguments")
    assert "= build_shm_op()" in inspect.getsource(comm), moved("deepspeed", "deepspeed.comm.torch no longer calls "
                                                                "build_shm_op() through its module global")
    assert TorchCheckpointEngine.__name__ == ds_compat.TORCH_ENGINE
    assert _params(_has(TorchCheckpointEngine, "save", "deepspeed"))[:3] == ["self", "state_dict", "path"], \
        moved("deepspeed", "TorchCheckpointEngine.save is not save(state_dict, path)")
    engine = TorchCheckpointEngine()
    assert isinstance(_has(engine, "zipfile_serialization", "deepspeed"), bool)
    assert _params(_has(DeepSpeedEngine, "_copy_recovery_script", "deepspeed")) == ["self", "save_path"], \
        moved("deepspeed", "DeepSpeedEngine._copy_recovery_script is not (save_path)")
    assert {"save_dir", "tag", "save_latest"} <= set(_params(DeepSpeedEngine.save_checkpoint)), \
        moved("deepspeed", "save_checkpoint lost save_dir/tag/save_latest")
    # The replaced methods are what save_checkpoint calls: through the instance, so an attribute shadows them.
    source = inspect.getsource(DeepSpeedEngine)
    for call in ("self.checkpoint_engine.save(", "self._copy_recovery_script("):
        assert call in source, moved("deepspeed", f"save_checkpoint no longer calls {call}...)")


def test_deepspeed_door_replaces_and_restores_the_writes() -> None:
    """replaced_checkpoint_writes shadows the two methods for its block only (a real TorchCheckpointEngine)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:  # the two attributes of a DeepSpeedEngine the door touches; building one needs a process group
        def __init__(self) -> None:
            self.checkpoint_engine = TorchCheckpointEngine()

        def _copy_recovery_script(self, save_path: str) -> None:
            raise AssertionError("the engine's own copy ran inside the block")

    engine, seen = Engine(), []
    own_save = ds_compat.checkpoint_save(engine)
    assert ds_compat.writes_with_torch_save(engine)
    assert ds_compat.zipfile_serialization(engine) is engine.checkpoint_engine.zipfile_serialization
    with ds_compat.replaced_checkpoint_writes(engine, lambda sd, path: seen.append(path), seen.append):
        engine.checkpoint_engine.save({}, "a.pt")
        engine._copy_recovery_script("dir")
    assert seen == ["a.pt", "dir"]
    assert ds_compat.checkpoint_save(engine) == own_save and "save" not in vars(engine.checkpoint_engine)
    assert "_copy_recovery_script" not in vars(engine)


def test_submitit_internals_are_where_the_door_expects_them(tmp_path: Path) -> None:
    slurm = importlib.import_module("submitit.slurm.slurm")
    make = _has(slurm, "_make_sbatch_string", "submitit")
    assert {"command", "folder", "job_name", "setup", "signal_delay_s", "additional_parameters"} <= set(_params(make)), \
        moved("submitit", "_make_sbatch_string lost a parameter the door passes")
    importlib.import_module(submitit_compat.SUBMIT_MODULE)  # the module the job's command runs
    text = submitit_compat.sbatch_text(tmp_path / "logs dir", {"job_name": "t", "ntasks_per_node": 2})
    assert text.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=2" in text, moved("submitit", "other script")
    assert f"-m {submitit_compat.SUBMIT_MODULE} '{tmp_path / 'logs dir'}'" in text, moved("submitit", "other command")


def test_ray_internals_are_where_the_door_expects_them() -> None:
    constants = importlib.import_module("ray._private.ray_constants")
    assert isinstance(_has(constants, "ENABLE_RAY_CLUSTER", "ray"), bool)
    assert _has(constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "ray") == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    services = importlib.import_module("ray._private.services")
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services), \
        moved("ray", "ray._private.services no longer reads ray_constants.ENABLE_RAY_CLUSTER at start")


def test_ray_workers_run_at_the_drivers_priority(ray_session) -> None:
    """Ray renices its workers by +15 unless RAY_worker_niceness says otherwise (the runtime_env does): a task and
    an actor (where the supervisor and the extraction run) keep the niceness of the process that started Ray."""
    assert _has(importlib.import_module("ray._private.ray_constants"), "RAY_WORKER_NICENESS", "ray") == \
        "RAY_worker_niceness"

    @ray_session.remote(num_cpus=0.1)
    def niceness() -> int:
        return os.nice(0)

    @ray_session.remote(num_cpus=0.1)
    class Niceness:
        def get(self) -> int:
            return os.nice(0)

    assert ray_session.get(niceness.remote()) == ray_session.get(Niceness.remote().get.remote()) == os.nice(0)
