"""Training ranks as real processes, started fast: a pre-imported server forks them (like multiprocessing's
forkserver), so a restart costs the gloo rendezvous + DeepSpeed init, not ~20 s of imports on a loaded box.

    with RankServer() as server:
        job = server.start(config, manifest, world=2, faults={"mode": "seal", "step": 5})
        ...                        # watch job.run_dir, then job.kill() (SIGKILL to every rank) or job.signal(...)
        codes = job.wait()         # exit codes like Popen.returncode (-9 = killed, 3 = preempted, 0 = done)

Each rank is its own OS process (own pid, its own gloo socket and files) running the product's entry point,
`cratescale.launch.entry.TrainTask` (preemption flag, train, exit status 3 when preempted), in a process group
of its own: killing the group kills every rank at once, as a node failure or `scancel -s KILL` would.
`faults` plants an in-process SIGKILL of the whole group at an exact place of the commit protocol, for windows
too narrow to hit from outside (the COMMITTED->rename gap, mid-retention delete, the `latest` pointer swap).

Run as a module (`python -m tests.faults.ranks`) it is the server: JSON commands on stdin, replies on stdout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREEMPTED_EXIT = 3  # cratescale.launch.entry.PREEMPTED_EXIT (not imported: the client stays torch-free)
FAULT_MODES = ("seal", "after_rename", "retention", "pointer", "writing", "enospc", "lose")


# ---------------------------------------------------------------------------------------------- client side
@dataclass
class RankJob:
    server: "RankServer"
    pids: list[int]
    pgid: int
    run_dir: Path
    logs: list[Path]
    codes: list[int] | None = field(default=None)

    def kill(self) -> None:
        """SIGKILL every rank at once (the whole process group)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def signal(self, signum: int, ranks: list[int] | None = None) -> None:
        for rank, pid in enumerate(self.pids):
            if ranks is None or rank in ranks:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def alive(self) -> bool:
        return any(_pid_alive(pid) for pid in self.pids)

    def wait(self, timeout: float = 300) -> list[int]:
        if self.codes is None:
            self.codes = self.server.call({"op": "wait", "pids": self.pids, "timeout": timeout})["codes"]
        return self.codes

    def output(self, rank: int = 0, tail: int = 3000) -> str:
        try:
            return self.logs[rank].read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def result(self, rank: int = 0) -> dict | None:
        """The JSON line a rank printed when its TrainTask returned (None when it did not)."""
        for line in reversed(self.output(rank, tail=100_000).splitlines()):
            if line.startswith("{\"result\""):
                return json.loads(line)["result"]
        return None


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead, only not yet reaped
    except (OSError, IndexError):
        return False


class RankServer:
    """The client: starts the pre-imported server process and asks it to fork ranks."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.faults.ranks"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        self.starts = 0
        hello = self._read()
        assert hello.get("ready"), hello

    def _read(self) -> dict:
        # Blocking is fine: the server answers every command at once, except `wait`, which has its own timeout.
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"rank server died (exit {self.proc.poll()})")
        return json.loads(line)

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"rank server: {reply['error']}")
        return reply

    def start(self, config: Path, manifest: Path, world: int, faults: dict | None = None,
              log_dir: Path | None = None, umask: int | None = None) -> RankJob:
        import yaml

        run_dir = Path(yaml.safe_load(Path(config).read_text())["run_dir"])
        log_dir = Path(log_dir or run_dir.parent / f"{run_dir.name}.logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        logs = [log_dir / f"start{self.starts:04d}_rank{r}.log" for r in range(world)]
        reply = self.call({"op": "start", "config": str(config), "manifest": str(manifest), "world": world,
                           "faults": faults or {}, "logs": [str(p) for p in logs], "umask": umask})
        return RankJob(self, reply["pids"], reply["pgid"], run_dir, logs)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RankServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- server side
def _preload() -> None:
    """Everything a rank imports, so forked ranks start warm. torch._dynamo/_inductor: DeepSpeed's optimizer
    check imports them (~5-10 s here); nothing below starts a thread, so forking stays safe."""
    import importlib

    for name in ("torch", "deepspeed", "torch._dynamo", "torch._inductor.compile_fx",
                 "deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.engine",
                 "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                 "deepspeed.utils.zero_to_fp32", "pandas", "pyarrow.parquet", "pyarrow.dataset", "PIL.Image",
                 "cratescale.launch.entry", "cratescale.engine.trainer", "data_pipeline.loader",
                 "data_pipeline.pil_loader", "deepspeed.comm.torch"):
        importlib.import_module(name)
    from cratescale.compat.deepspeed import skip_shm_op_build

    skip_shm_op_build()


_REPLY_FD: int | None = None


def _kill_group() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _plant_enospc(at: int, match: str) -> None:
    """This rank's torch.save of a file whose path contains `match` fails with ENOSPC in the save of step
    `at` (the write layer, as a full disk on one node's share would)."""
    import errno

    import torch

    state, real_save = _track_saved_step(), torch.save

    def save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if state["step"] == at and match in os.path.basename(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _track_saved_step() -> dict:
    """{"step": the step whose save this rank is in}, for the synchronous and the asynchronous commit (whose
    background write of a step goes on until the next commit starts)."""
    from cratescale.engine import commit_async, trainer

    state = {"step": None}
    real_save_state, real_start = trainer.save_state, commit_async.AsyncCommitter.start

    def save_state(engine, store, step, meta, rank):
        state["step"] = step
        return real_save_state(engine, store, step, meta, rank)

    def start(self, step, meta, waited_s=0.0):
        state["step"] = step
        return real_start(self, step, meta, waited_s)

    trainer.save_state, commit_async.AsyncCommitter.start = save_state, start
    return state


def _plant_writing_kill(at: int) -> None:
    """SIGKILL every rank while rank 0's background writer is inside a file of step `at` (some bytes of it
    written, training going on meanwhile)."""
    from cratescale.checkpoint import durable

    state, real_write = _track_saved_step(), durable.ChecksumWriter.write

    def write(self, data):
        done = real_write(self, data)
        if state["step"] == at and self.size > 0:
            _kill_group()
        return done

    durable.ChecksumWriter.write = write


def _plant_faults(faults: dict) -> None:
    """At the commit of step `faults['step']`: rank 0 SIGKILLs every rank at the named place of the commit
    protocol, or ("enospc") a write of the rank `faults['rank']` fails with ENOSPC, or ("lose") the file
    `faults['file']` of the tmp dir is removed just before rank 0 seals it."""
    mode, at = faults.get("mode"), int(faults.get("step", -1))
    if not mode:
        return
    if mode not in FAULT_MODES:
        raise ValueError(f"unknown fault mode {mode!r}")
    if mode == "enospc":
        _plant_enospc(at, faults.get("match", ""))
        return
    if mode == "writing":
        _plant_writing_kill(at)
        return
    from cratescale.checkpoint import commit as commit_mod
    from cratescale.checkpoint import retention
    from tests.kill_points import kill_around_rename

    state = {"step": None}
    real_commit = commit_mod.CheckpointStore.commit

    def commit(self, step, meta=None, sealed=None):
        state["step"] = step
        if mode == "lose" and step == at:  # a file another rank wrote is gone when rank 0 seals (someone's clean-up)
            (self.tmp_path(step) / faults["file"]).unlink()
        return real_commit(self, step, meta, sealed)

    commit_mod.CheckpointStore.commit = commit
    hit = lambda: state["step"] == at  # noqa: E731
    if mode in ("seal", "after_rename"):  # sealed and fsynced, just before / just after the rename into place
        commit_mod.CheckpointStore._rename_into_place = kill_around_rename(
            commit_mod.CheckpointStore._rename_into_place, "before" if mode == "seal" else "after",
            lambda: _kill_group() if hit() else None)
    elif mode == "retention":
        # After the deleted commit's marker is gone and half its files are removed: the torn dir must be
        # invisible to readers and cleaned up later.
        real_rmtree = retention.shutil.rmtree

        class _Shutil:
            @staticmethod
            def rmtree(path, ignore_errors=False):
                if hit() and Path(path).name.startswith("step_") and Path(path).is_dir():
                    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                    for p in files[: len(files) // 2]:
                        p.unlink()
                    _kill_group()
                return real_rmtree(path, ignore_errors=ignore_errors)

        retention.shutil = _Shutil
    elif mode == "pointer":
        from contextlib import contextmanager

        from cratescale import files as files_mod

        real_replacing = files_mod.replacing

        @contextmanager
        def replacing(path, hidden=False):
            with real_replacing(path, hidden) as tmp:
                yield tmp
                if hit() and Path(path).name == commit_mod.LATEST:
                    _kill_group()  # the new pointer is written to its tmp name, not yet renamed over `latest`

        files_mod.replacing = replacing  # replace_durable looks it up at each call


def _rank_main(rank: int, world: int, port: int, command: dict) -> None:
    """In the forked child: become rank `rank` and run the product's TrainTask."""
    code = 1
    try:
        if _REPLY_FD is not None:
            os.close(_REPLY_FD)
        fd = os.open(command["logs"][rank], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if command.get("umask") is not None:
            os.umask(int(command["umask"]))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        import faulthandler

        faulthandler.enable(all_threads=True)  # a rank the server must abort (a hang) shows where it was
        faults = command.get("faults") or {}
        if rank == int(faults.get("rank", 0)):
            _plant_faults(faults)
        from cratescale.launch.entry import TrainTask

        result = TrainTask(command["config"], command["manifest"], 1e11)()  # exits 3 itself when preempted
        print(json.dumps({"result": result}), flush=True)
        code = 0
    except BaseException:  # noqa: BLE001 - report anything, exit non-zero
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)  # never run the server's atexit/pytest machinery in a child


def _start(command: dict) -> dict:
    from cratescale.distributed.rendezvous import free_port

    world, port = int(command["world"]), free_port()
    pids: list[int] = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0 if rank == 0 else pids[0])
            _rank_main(rank, world, port, command)
        os.setpgid(pid, pid if rank == 0 else pids[0])  # also here: no race with the child's own call
        pids.append(pid)
    return {"pids": pids, "pgid": pids[0]}


def _wait(pids: list[int], timeout: float) -> dict:
    """Reap every rank; past the timeout the stragglers are SIGKILLed (and reported as such)."""
    deadline, codes = time.monotonic() + timeout, {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if len(codes) < len(pids):
            if time.monotonic() > deadline:
                for sig in (signal.SIGABRT, signal.SIGKILL):  # SIGABRT: faulthandler prints the stacks
                    for pid in pids:
                        if pid not in codes:
                            try:
                                os.kill(pid, sig)
                            except ProcessLookupError:
                                pass
                    time.sleep(1.0)
                deadline = float("inf")
            time.sleep(0.01)
    return {"codes": [codes[p] for p in pids]}


def serve() -> None:
    # Replies go to the original stdout; anything a library prints (import warnings) goes to stderr.
    global _REPLY_FD
    out = os.fdopen(os.dup(1), "w")
    _REPLY_FD = out.fileno()  # forked ranks close it: they must not hold the reply pipe open
    os.dup2(2, 1)
    _preload()
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["op"] == "exit":
                break
            reply = _start(command) if command["op"] == "start" else _wait(command["pids"], command["timeout"])
        except Exception as exc:  # noqa: BLE001 - the client raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
