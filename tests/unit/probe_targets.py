"""Tiny, import-light targets for gpu_decode.run_isolated's spawned child (tests/unit/test_gpu_route.py)."""
import os
import signal


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)  # what nvImageCodec #55 does to a rank on its first ImageNet batch


def fail() -> None:
    raise ValueError("nvImageCodec: unsupported sampling\nsecond line")


def ok() -> None:
    pass
