"""What training applies to a plain model from outside before DeepSpeed takes it: the attention kernel,
activation checkpointing and torch.compile. None of them changes the model's parameter names, so
checkpoints and exports do not see them."""
from __future__ import annotations

import functools
import os
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS = ("blocks", "decoder_blocks")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "mssa_triton")


def select_attention_backend(name: str) -> None:
    """Let F.scaled_dot_product_attention use only `name` on accelerators (math stays as the fallback for
    inputs the kernel refuses); "auto" leaves torch's choice. Process-wide rather than a context manager
    around forward, so activation checkpointing's recompute in backward takes the same kernel (a different
    one saves differently shaped tensors and the recompute check fails)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {ATTENTION_BACKENDS}")
    if name in ("auto", "mssa_triton"):  # mssa_triton: MSSA takes its own kernel, the rest torch's choice
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(True)


def apply_mssa_kernel(model: nn.Module) -> int:
    """Give every MSSA the q = k = v Triton kernel (cratescale/kernels/mssa_triton.py). Needs a CUDA device, or
    Triton's interpreter (TRITON_INTERPRET=1, how CI runs it on the CPU). Returns how many MSSA modules took it."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("parallel.attention=mssa_triton: needs a CUDA device (or TRITON_INTERPRET=1 to run the "
                         f"kernel in Triton's interpreter); torch {torch.__version__} sees no GPU")
    from cratescale.kernels.mssa_triton import mssa_self_attention

    modules = [m for m in model.modules() if hasattr(m, "self_attention")]
    if not modules:
        raise ValueError(f"parallel.attention=mssa_triton: {type(model).__name__} has no MSSA layer")
    for module in modules:
        module.self_attention = mssa_self_attention
    return len(modules)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # eval/extraction: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def transformer_blocks(model: nn.Module, lists: Iterable[str] = BLOCK_LISTS) -> list[nn.Module]:
    blocks = [blk for name in lists for blk in getattr(model, name, ())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of the block lists {tuple(lists)}")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each encoder/decoder block's activations in backward instead of storing them: memory per
    image drops to about one block's activations plus the block inputs, for about one extra forward.
    Patches the instances' forward (no wrapper module), so state_dict keys stay the same. Returns how
    many blocks were wrapped."""
    blocks = transformer_blocks(model)
    for blk in blocks:
        if not getattr(blk, "_activation_checkpointed", False):
            blk.forward = _checkpointed(blk.forward)
            blk._activation_checkpointed = True
    return len(blocks)


def compile_model(model: nn.Module, mode: str | None = None) -> nn.Module:
    """In-place `nn.Module.compile`: the module (and its parameter names) stay as they are, unlike the
    `_orig_mod.` wrapper that `torch.compile(model)` returns."""
    model.compile(mode=mode)
    return model
