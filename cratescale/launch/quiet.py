"""The launcher's console speaks for the project (issue 30 item 3): what Ray, Ray Data and DeepSpeed log, and the
warnings of libraries, go to `<run_dir>/logs/launcher.log`; the console keeps the stages' own lines.

Ray's token warning (which suggests turning token authentication off) is logged there too: tokens stay on.
Native code that writes to fd 2 itself (Ray's core worker during extraction) is sorted by `native_lines_to_log`.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import BinaryIO, Iterator

# A line that native code writes to fd 2 itself, in glog's format: Ray's core worker, e.g.
# "[2026-12-07 11:05:30,008 E 25982 25982] core_worker.cc:2465: Actor ... max_restarts > 0 ..." (ray#57733)
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")
# Loggers that install their own console handlers on import: replaced by the file handler, not propagated.
LIBRARY_LOGGERS = ("ray", "ray.data", "DeepSpeed", "py.warnings")
_handler: logging.FileHandler | None = None


def log_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "launcher.log"


def _route(name: str, handler: logging.Handler) -> None:
    logger = logging.getLogger(name)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)


def _file_handler(run_dir: Path) -> logging.FileHandler:
    """The one handler on this run's launcher.log (a launch in the same process for another run replaces it)."""
    global _handler
    path = log_path(run_dir)
    if _handler is None or Path(_handler.baseFilename) != path.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        if _handler is not None:
            _handler.close()
        _handler = logging.FileHandler(path)
        _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    return _handler


def route_library_logs(run_dir: Path) -> Path:
    """From here on (this process), library logs and warnings append to the run's launcher.log."""
    import ray.data  # Ray Data installs its handlers when imported: import first, then replace them

    handler = _file_handler(run_dir)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        _route(name, handler)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage prints its own lines
    return Path(handler.baseFilename)


@contextmanager
def library_output(run_dir: Path) -> Iterator[None]:
    """Around code that prints (DeepSpeed's zero_to_fp32: print() and tqdm, and its import's accelerator line):
    stdout and stderr go to launcher.log for the duration; DeepSpeed's logger stays routed there afterwards."""
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, redirect_stdout(f), redirect_stderr(f):
        import deepspeed.utils.logging  # noqa: F401 - its handler binds to the stream of the moment: this file

        _route("DeepSpeed", _file_handler(run_dir))
        yield


def _sort_lines(pipe_fd: int, console_fd: int, library: BinaryIO) -> None:
    """Until every writer of the pipe has closed it: native lines to `library`, the rest to the console, in order.
    It never stops draining (a stopped reader would block every write to fd 2): a line the log cannot take (a
    full disk) goes to the console, one the console cannot take is dropped."""
    def emit(line: bytes) -> None:
        for out in ((library, console) if NATIVE_LINE.match(line) else (console,)):
            try:
                out.write(line)
                return
            except OSError:
                continue

    pending = b""
    with open(pipe_fd, "rb", buffering=0) as pipe, open(console_fd, "wb", buffering=0) as console, library:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                emit(line + b"\n")
        if pending:
            emit(pending)


@contextmanager
def native_lines_to_log(run_dir: Path) -> Iterator[None]:
    """For the duration, the lines native code writes to fd 2 past Python's streams (Ray's core worker, at each
    Ray Data actor-pool start) append to launcher.log; every other stderr line (the project's own fallbacks and
    errors) still reaches the console. Ray must already run: a process started inside would inherit the pipe."""
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    library = open(path, "ab", buffering=0)  # here, not in the sorter: a log that cannot open fails this call
    sys.stderr.flush()
    console_fd = os.dup(2)
    pipe_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # the sorter owns its own copy of the console: it drains the pipe to the end even after this block left
    sorter = threading.Thread(target=_sort_lines, args=(pipe_fd, os.dup(console_fd), library), daemon=True,
                              name="native-stderr")
    sorter.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console_fd, 2)  # the pipe's last writer closes: the sorter reads to the end and stops
        os.close(console_fd)
        sorter.join(timeout=10)
