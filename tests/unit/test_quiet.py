"""The lines native code writes to fd 2 itself (Ray's core worker, past Python's streams) go to launcher.log;
every other stderr line still reaches the console, in order and whole. Run in a child process: its fd 2 is the
console this test reads."""
import io
import os
import subprocess
import sys
from pathlib import Path

from cratescale.launch.quiet import _sort_lines

RAY_LINE = ("[2026-12-07 11:05:30,008 E 25982 25982] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(ShardWorker))' and ID: '5fb8' has constructor arguments in the object store "
            "and max_restarts > 0.")
CHILD = f"""
import os, sys
from pathlib import Path
from cratescale.launch.quiet import native_lines_to_log
print("before", file=sys.stderr, flush=True)
with native_lines_to_log(Path(sys.argv[1])):
    os.write(2, {RAY_LINE!r}.encode() + b"\\n")
    print("extract: 1 of 2 actors started, going on with 1", file=sys.stderr)
    os.write(2, b"[12:00:00] a bracketed line of ours\\n" + b"x" * 100000 + b"\\nhalf a li")
    os.write(2, b"ne, then the rest")
print("after", file=sys.stderr)
"""


def test_native_lines_go_to_the_log_and_the_projects_lines_to_the_console(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("before\nextract: 1 of 2 actors started, going on with 1\n[12:00:00] a bracketed line of "
                           f"ours\n{'x' * 100000}\nhalf a line, then the restafter\n")
    assert (tmp_path / "logs/launcher.log").read_text() == RAY_LINE + "\n"


class FullDisk(io.RawIOBase):
    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")


def test_a_line_the_log_cannot_take_reaches_the_console_and_draining_goes_on(tmp_path):
    pipe_r, pipe_w = os.pipe()
    console = tmp_path / "console"
    console_fd = os.open(console, os.O_WRONLY | os.O_CREAT)
    os.write(pipe_w, RAY_LINE.encode() + b"\nours\n")
    os.close(pipe_w)
    _sort_lines(pipe_r, console_fd, FullDisk())
    assert console.read_text() == RAY_LINE + "\nours\n"
