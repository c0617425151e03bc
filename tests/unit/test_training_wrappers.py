"""What training wraps around the plain model (cratescale/distributed/wrap.py): activation checkpointing, the
attention kernel choice, in-place torch.compile, and how the job's parallel section turns them on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cratescale.config import load_job
from cratescale.distributed import deepspeed_config
from cratescale.distributed.wrap import (apply_activation_checkpointing, compile_model, select_attention_backend,
                                         transformer_blocks)
from cratescale.engine.model_build import build_model, wrap_for_training
from cratescale.models import create_model

DEMO = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


def _loss_and_grads(model: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss, _, _ = model(images, noise)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _debug_pair():
    torch.manual_seed(0)
    plain = create_model("crate_mae_debug")
    wrapped = create_model("crate_mae_debug")
    wrapped.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, plain.img_size, plain.img_size)
    noise = torch.rand(2, plain.num_patches)
    return plain, wrapped, images, noise


def test_activation_checkpointing_recomputes_blocks_with_identical_gradients():
    plain, wrapped, images, noise = _debug_pair()
    keys = list(wrapped.state_dict())
    n = apply_activation_checkpointing(wrapped)
    assert n == len(wrapped.blocks) + len(wrapped.decoder_blocks) == len(transformer_blocks(wrapped))
    assert apply_activation_checkpointing(wrapped) == n  # a second call does not wrap twice
    assert list(wrapped.state_dict()) == keys  # checkpoints and exports see the same names

    calls = []
    wrapped.blocks[0].mssa.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = _loss_and_grads(plain, images, noise)
    loss_ckpt, grads_ckpt = _loss_and_grads(wrapped, images, noise)
    assert len(calls) == 2  # once in forward, once more when backward recomputes the block
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-5, atol=1e-6, msg=k)
    calls.clear()
    with torch.no_grad():
        wrapped(images, noise)
    assert len(calls) == 1  # nothing to recompute without autograd


def test_select_attention_backend_is_process_wide_and_validated():
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in flags]
    try:
        select_attention_backend("cudnn")
        assert [f() for f in flags] == [False, True, False, True]  # math stays as the fallback
        select_attention_backend("flash")
        assert [f() for f in flags] == [True, False, False, True]
        select_attention_backend("auto")  # leaves whatever is set
        assert [f() for f in flags] == [True, False, False, True]
        with pytest.raises(ValueError, match="attention backend 'flash3'"):
            select_attention_backend("flash3")
    finally:
        for enable, on in zip((torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_cudnn_sdp,
                               torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.enable_math_sdp),
                              before):
            enable(on)


def test_compile_in_place_keeps_names_and_values():
    plain, compiled, images, noise = _debug_pair()
    keys = list(compiled.state_dict())
    assert compile_model(compiled) is compiled
    assert list(compiled.state_dict()) == keys  # no "_orig_mod." prefix
    loss, grads = _loss_and_grads(plain, images, noise)
    loss_c, grads_c = _loss_and_grads(compiled, images, noise)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_job_switches_reach_the_model_and_the_deepspeed_config():
    job = load_job(DEMO, ["parallel.activation_checkpointing=true", "parallel.overlap_comm=true"])
    model = wrap_for_training(build_model(job), job)
    assert all(getattr(blk, "_activation_checkpointed", False) for blk in transformer_blocks(model))
    assert model._compiled_call_impl is None  # compile stays off unless asked for
    assert deepspeed_config(job, 2)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    plain = build_model(job)  # export, planning and extraction take the model unwrapped
    assert not any(getattr(blk, "_activation_checkpointed", False) for blk in transformer_blocks(plain))
