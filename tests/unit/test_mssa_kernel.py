"""The q = k = v MSSA Triton kernel against the reference attention, in Triton's interpreter (no GPU here).

TRITON_INTERPRET must be set before triton decorates the kernels, so before the kernel module is first imported;
speed is measured on a GPU by bench/gpu.sh, not here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cratescale.distributed.wrap import apply_mssa_kernel  # noqa: E402
from cratescale.kernels.mssa_triton import mssa_self_attention  # noqa: E402
from cratescale.models import create_model  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="impossible: TRITON_INTERPRET was set to something else before this module")


def reference(x: torch.Tensor) -> torch.Tensor:
    scores = (x @ x.transpose(-1, -2)) * x.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ x


def run(x: torch.Tensor, fn, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (out.float() * grad).sum().backward()
    return out.detach().float(), x.grad.float()


@pytest.mark.parametrize("tokens,heads,width", [(197, 3, 64), (50, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_the_reference(tokens, heads, width, dtype):
    torch.manual_seed(tokens + heads)
    token_major = torch.randn(2, tokens, heads, width)  # MSSA hands the kernel this layout's head view
    grad = torch.randn(2, heads, tokens, width)
    x64 = token_major.double().transpose(1, 2)
    exact_out, exact_grad = run(x64, reference, grad.double())
    out, dx = run(token_major.to(dtype).transpose(1, 2), mssa_self_attention, grad)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact_out.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, exact_grad.float(), rtol=1e-4, atol=1e-4)
        return
    # bf16: no worse than the reference attention computed in bf16 (plus a little for summation order).
    ref_out, ref_grad = run(token_major.to(dtype).transpose(1, 2).contiguous(), reference, grad.to(dtype).float())
    for mine, ref, exact in ((out, ref_out, exact_out), (dx, ref_grad, exact_grad)):
        assert (mine - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-3


def test_output_is_token_major_so_merging_heads_is_a_view():
    x = torch.randn(2, 50, 4, 32).transpose(1, 2)
    out = mssa_self_attention(x)
    assert out.transpose(1, 2).is_contiguous()


def test_crate_model_with_the_kernel_equals_the_plain_model():
    torch.manual_seed(0)
    plain = create_model("crate_mae_debug", img_size=32, patch_size=8)
    kernel = create_model("crate_mae_debug", img_size=32, patch_size=8)
    kernel.load_state_dict(plain.state_dict())
    assert apply_mssa_kernel(kernel) == len(kernel.blocks) + len(kernel.decoder_blocks)
    assert kernel.state_dict().keys() == plain.state_dict().keys()
    images = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 16)
    losses = []
    for model in (plain, kernel):
        loss = model(images, noise=noise)[0]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), kernel.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_refused_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="mssa_triton: needs a CUDA device"):
        apply_mssa_kernel(create_model("crate_mae_debug", img_size=32, patch_size=8))
