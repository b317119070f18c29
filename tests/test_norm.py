"""RMSnorm against independent references: torch's F.rms_norm and Hugging Face's LlamaRMSNorm."""
import pytest
import torch
import torch.nn.functional as F

from zer02llm import RMSnorm


def _norm(dim: int, seed: int = 0) -> RMSnorm:
    norm = RMSnorm(dim)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("shape", [(4, 64), (2, 7, 96), (1, 1, 3, 8)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_matches_torch_rms_norm_float32(shape, eps):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4
    norm = _norm(shape[-1])
    norm.eps = eps
    ref = F.rms_norm(x, (shape[-1],), norm.weight, eps=eps)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)


def test_bf16_reduces_in_float32():
    """bf16 in, bf16 out; the statistics must be float32, so the only error is the final bf16 rounding."""
    x = (torch.randn(4, 33, 256, generator=torch.Generator().manual_seed(2)) * 10).to(torch.bfloat16)
    norm = _norm(256).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = (norm.weight.float() * F.rms_norm(x.float(), (256,), eps=1e-6).to(torch.bfloat16).float())
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=8e-3)  # one bf16 rounding of the product
    # a naive bf16 reduction (mean of squares in bf16) is measurably worse than ours
    naive = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight
    exact = norm.weight.double() * F.rms_norm(x.double(), (256,), eps=1e-6)
    assert (out.double() - exact).abs().mean() < (naive.double() - exact).abs().mean()


def test_matches_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3))
    ours, hf = _norm(48), LlamaRMSNorm(48, eps=1e-6)
    hf.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-6)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(ours.to(torch.bfloat16)(xb), hf.to(torch.bfloat16)(xb), atol=0, rtol=0)


def test_gradients_match_torch():
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ours = _norm(32)
    w2 = ours.weight.detach().clone().requires_grad_()
    up = torch.randn(2, 9, 32)
    ours(x).backward(up)
    F.rms_norm(x2, (32,), w2, eps=1e-6).backward(up)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_zero_input_is_finite_and_bad_dim_is_rejected():
    assert torch.isfinite(RMSnorm(8)(torch.zeros(2, 8))).all()
    with pytest.raises(ValueError, match="positive"):
        RMSnorm(0)
