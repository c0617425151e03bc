"""Safety: no pickle where untrusted bytes come in, checkpoints of another run refused, Ray on loopback with
token auth, run directories made with the user's umask."""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist.harness import write_config
from tests.faults.conftest import REPO, TINY_JOB


def test_load_export_runs_no_pickle(tmp_path, monkeypatch):
    from cratescale.checkpoint.export import export_weights, load_export
    from cratescale.models import create_model

    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 7}, tmp_path / "export")

    def forbidden(*args, **kwargs):
        raise AssertionError("load_export unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    state, config, provenance = load_export(tmp_path / "export")
    monkeypatch.undo()
    assert provenance["step"] == 7 and config == json.loads(json.dumps(model.config))
    want = model.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k].float()) for k in want)


def _torch_load_calls(root: Path):
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load" \
                    and isinstance(func.value, ast.Name) and func.value.id in ("torch", "pickle"):
                yield path, node, lines[node.lineno - 1:node.end_lineno]


def test_every_torch_load_is_weights_only_or_marked_trusted():
    found, bad = 0, []
    for package in ("cratescale", "data_pipeline"):
        for path, call, lines in _torch_load_calls(REPO / package):
            found += 1
            weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
            trusted = any("# trusted:" in line and len(line.split("# trusted:")[1].strip()) >= 5 for line in lines)
            if not (safe or trusted):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}: {lines[0].strip()}")
    assert found >= 3, "the scan found no torch.load at all: is it still looking at the right tree?"
    assert bad == [], "torch.load without weights_only=True and without a '# trusted: why' comment:\n" + \
        "\n".join(bad)


def test_rng_state_file_loads_without_pickle(tmp_path):
    """The per-rank RNG file of a checkpoint holds tensors and plain values only (weights_only=True)."""
    from cratescale.engine import state

    path = tmp_path / "rank0_rng.pt"
    torch.save(state._rng_state(), path)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"torch", "numpy", "python"}
    state._set_rng_state(path)  # and restores from it


def test_checkpoint_of_another_run_is_refused(tmp_path):
    from cratescale.checkpoint import CheckpointStore
    from cratescale.engine.state import ResumeError, plan_resume

    saved, other = ({"version": 2, "fields": {"seed": seed}, "manifest": "aaaa"} for seed in (0, 1))
    store = CheckpointStore(tmp_path)
    store.save(4, lambda p: (p / "w.bin").write_bytes(b"w"), {"identity": saved, "global_batch": 16, "world_size": 2})
    with pytest.raises(ResumeError, match="continues with: seed 0 -> 1. Use checkpoint.allow_config_change"):
        plan_resume(store, other, 16, 2)
    plan = plan_resume(store, other, 16, 2, allow_config_change=True)
    assert plan.commit.step == 4 and not plan.elastic
    with pytest.raises(ResumeError, match="global batch 16, the job asks for 32"):
        plan_resume(store, saved, 32, 2, allow_config_change=True)  # the data order cannot change


@pytest.mark.dist
def test_trainer_refuses_a_foreign_checkpoint(tmp_path, fault_manifest, rank_server):
    """Checkpoints copied from run A into run B (another seed: another config hash) are refused by the real
    trainer, unless checkpoint.allow_config_change=true; and the run directories follow the umask (027)."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    common = ["schedule.steps=2", "checkpoint.every_steps=1"]
    job = rank_server.start(write_config(TINY_JOB, run_a, common), fault_manifest, 2, umask=0o027)
    assert job.wait() == [0, 0], job.output(0)
    _assert_umask(run_a, 0o027, at_least=10)  # run dir, metrics, samples, checkpoints, commits

    shutil.copytree(run_a / "checkpoints", run_b / "checkpoints")
    config_b = write_config(TINY_JOB, run_b, [*common, "schedule.steps=4", "seed=4"])
    job = rank_server.start(config_b, fault_manifest, 2)
    assert job.wait() == [1, 1]
    for rank in (0, 1):
        last = [line for line in job.output(rank).splitlines() if line.strip()][-1]
        assert last.startswith("cratescale.engine.state.ResumeError: ") and "seed 3 -> 4" in last, last
    config_b = write_config(TINY_JOB, run_b, [*common, "schedule.steps=4", "seed=4",
                                              "checkpoint.allow_config_change=true"])
    job = rank_server.start(config_b, fault_manifest, 2)
    assert job.wait() == [0, 0], job.output(0)
    assert job.result(0) == {"status": "completed", "step": 4, "rank": 0}


def _assert_umask(root: Path, umask: int, at_least: int = 1) -> None:
    """Nothing under root has a permission bit the umask takes away (so nothing is world-writable)."""
    entries = [root, *root.rglob("*")]
    assert len(entries) >= at_least
    loose = [f"{p.relative_to(root.parent)} {stat.filemode(p.lstat().st_mode)}" for p in entries
             if not p.is_symlink() and p.lstat().st_mode & umask]
    assert loose == [], loose


def test_launcher_run_dir_follows_the_umask(tmp_path, monkeypatch):
    import cratescale.launch.run as run
    from cratescale.launch.__main__ import main

    started = []
    monkeypatch.setattr(run, "start_ray", lambda address: started.append(address))
    monkeypatch.setattr(run, "STAGES", {name: (lambda *args: None) for name in run.STAGES})
    old = os.umask(0o027)
    try:
        assert main([str(REPO / "jobs" / "demo.yaml"), f"run_dir={tmp_path / 'runs' / 'demo'}", "stages=[ingest]",
                     "data.source=synthetic://shapes?n=16&classes=2&size=32"]) == 0
    finally:
        os.umask(old)
    assert started == [None]
    run_dir = tmp_path / "runs" / "demo"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((run_dir / "config.yaml").stat().st_mode) == 0o640
    _assert_umask(tmp_path / "runs", 0o027, at_least=3)


RAY_PROBE = r"""
import json, os, sys
os.environ.pop("RAY_AUTH_MODE", None)
from cratescale.launch.run import start_ray
start_ray(None)
import psutil, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
listen = []
for p in psutil.Process().children(recursive=True):
    try:
        listen += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "node_ip": ray.util.get_node_ip_address(),
                  "token": get_authentication_mode() == AuthenticationMode.TOKEN, "listen": listen,
                  "leaked_env": sorted(k for k in os.environ if k.startswith("RAY_ENABLE_"))}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only_with_token_auth():
    """The launcher's local Ray: GCS address on 127.0.0.1, every listening socket of every Ray process on
    loopback, token authentication on (Ray's default for a new local cluster; nothing here turns it off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", RAY_PROBE], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["gcs"].startswith("127.0.0.1:") and info["node_ip"] == "127.0.0.1", info
    assert info["token"], "token authentication is off"
    # The single-machine switch stays with the Ray it started: a later sbatch or `ray start` from this process
    # (a multi-node Ray in an allocation) must not inherit it.
    assert info["leaked_env"] == [], info["leaked_env"]
    names = {name for name, _, _ in info["listen"]}
    assert {"gcs_server", "raylet"} <= names, info["listen"]
    exposed = [entry for entry in info["listen"] if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    for package in ("cratescale", "data_pipeline"):
        for path in (REPO / package).rglob("*.py"):
            assert "RAY_AUTH_MODE" not in path.read_text(), f"{path} touches Ray's auth mode"
