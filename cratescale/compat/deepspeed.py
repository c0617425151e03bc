"""DeepSpeed internals (written against deepspeed==0.19.8, pyproject.toml's pin; tests/unit/test_compat.py
fails naming it when an upgrade moves any of them). What we reach into, and why:

- `engine.checkpoint_engine.save(state_dict, path)`: every file `save_checkpoint` writes goes through it.
  The synchronous commit writes through a Python file object (a failed write keeps its errno) and holds a
  failure back past DeepSpeed's barriers (engine/state.py); the asynchronous commit takes a host snapshot
  instead of writing (engine/commit_async.py).
- `TorchCheckpointEngine.zipfile_serialization`: the torch.save option that engine writes with, so our own
  writes give its bytes.
- `engine._copy_recovery_script(save_path)`: copies zero_to_fp32.py beside the checkpoint (rank 0, between
  two barriers); its failure is held back like a write's.
- `deepspeed.comm.torch.build_shm_op()`: JIT-compiles a shared-memory op (~30 s) at the first init on the
  CPU accelerator; gloo does not use it.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PINNED = "0.19.8"
TORCH_ENGINE = "TorchCheckpointEngine"  # deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine


def skip_shm_op_build() -> None:
    """Before deepspeed.init_distributed on gloo: the CPU accelerator's shm op is never built."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def writes_with_torch_save(engine: Any) -> bool:
    """True when the engine's checkpoint engine is DeepSpeed's plain torch.save one (not Nebula, fast, decoupled)."""
    return type(engine.checkpoint_engine).__name__ == TORCH_ENGINE


def zipfile_serialization(engine: Any) -> bool:
    """The `_use_new_zipfile_serialization` the engine's torch.save writes with (True where it does not say)."""
    return getattr(engine.checkpoint_engine, "zipfile_serialization", True)


def checkpoint_save(engine: Any) -> Callable[[Any, str], None]:
    """The checkpoint engine's own save(state_dict, path)."""
    return engine.checkpoint_engine.save


def recovery_script_copy(engine: Any) -> Callable[[str], None]:
    """The engine's own copy of zero_to_fp32.py into a checkpoint (save_path)."""
    return engine._copy_recovery_script


@contextmanager
def replaced_checkpoint_writes(engine: Any, save: Callable[[Any, str], None],
                               copy_recovery_script: Callable[[str], None] | None = None) -> Iterator[None]:
    """engine.save_checkpoint with every file write going to `save(state_dict, path)` and, when given, the
    recovery-script copy to `copy_recovery_script(save_path)`. Instance attributes shadow the methods for the
    block and are deleted after it, so nothing outlives it."""
    ckpt = engine.checkpoint_engine
    ckpt.save = save
    if copy_recovery_script is not None:
        engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        del ckpt.save
        if copy_recovery_script is not None:
            del engine._copy_recovery_script
