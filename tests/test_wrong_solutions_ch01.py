"""Chapter 01's graders name the usual mistakes: each wrong implementation below fails its check with a message that
says what is wrong, and a correct implementation passes. No notebook runs: the learner's namespace is faked."""
from pathlib import Path

import pytest
import torch
from torch import nn

from grading import NotebookRun
from graders import ch01_rmsnorm as grader


def _run(**ns) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), ns)


def rmsnorm_class(stats, upcast: bool = True, init=torch.ones, gain: bool = True):
    """An RMSNorm module whose denominator is `stats(x, eps)`; the defaults give the correct module."""

    class Norm(nn.Module):
        def __init__(self, dim: int, eps: float = 1e-6):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(init(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.float() if upcast else x
            normed = (h / stats(h, self.eps)).to(x.dtype)
            return self.weight * normed if gain else normed

    return Norm


def mean_square(x, eps):
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


CORRECT = rmsnorm_class(mean_square)


def test_a_correct_rmsnorm_passes_every_check():
    run = _run(MyRMSNorm=CORRECT)
    grader.check_my_rmsnorm_float32(run)
    grader.check_my_rmsnorm_eps(run)
    grader.check_my_rmsnorm_half_precision(run)


@pytest.mark.parametrize("cls,check,words", [
    (rmsnorm_class(lambda x, eps: (x.mean(-1, keepdim=True) + eps).sqrt()), "float32",
     "mean of x instead of the mean of its squares"),
    (rmsnorm_class(lambda x, eps: (x.var(-1, keepdim=True) + eps).sqrt()), "float32", "unbiased variance"),
    (rmsnorm_class(lambda x, eps: (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt()), "float32",
     "centred on the mean"),
    (rmsnorm_class(lambda x, eps: x.std(-1, keepdim=True) + eps), "float32", "unbiased.*Bessel"),
    (rmsnorm_class(lambda x, eps: (x.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1) + eps).sqrt()), "float32", "d-1"),
    (rmsnorm_class(lambda x, eps: (x.pow(2).mean(1, keepdim=True) + eps).sqrt()), "float32", "wrong dimension"),
    (rmsnorm_class(lambda x, eps: (x.pow(2).mean() + eps).sqrt()), "float32", "whole tensor"),
    (rmsnorm_class(mean_square, gain=False), "float32", "does not multiply by the gain"),
    (rmsnorm_class(mean_square, init=torch.randn), "float32", "expected all ones"),
    (rmsnorm_class(lambda x, eps: x.pow(2).mean(-1, keepdim=True).sqrt()), "eps", "does not depend on eps"),
    (rmsnorm_class(lambda x, eps: x.pow(2).mean(-1, keepdim=True).sqrt() + eps), "eps",
     "adds eps outside the square root"),
    (rmsnorm_class(mean_square, upcast=False), "half_precision", "no float32 upcast"),
])
def test_a_wrong_rmsnorm_is_named(cls, check, words):
    with pytest.raises(AssertionError, match=words.replace("(", r"\(")) as e:
        getattr(grader, f"check_my_rmsnorm_{check}")(_run(MyRMSNorm=cls))
    assert "MyRMSNorm" in str(e.value)


def test_rmsnorm_computed_in_bfloat16_is_named():
    """Only bfloat16 input (float16 is correct here): the bfloat16 branch of the half-precision check names it."""

    class HalfInBf16(nn.Module):
        def __init__(self, dim: int, eps: float = 1e-6):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

        def forward(self, x):
            h = x if x.dtype == torch.bfloat16 else x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    with pytest.raises(AssertionError, match="bfloat16.*no float32 upcast"):
        grader.check_my_rmsnorm_half_precision(_run(MyRMSNorm=HalfInBf16))


def layer_norm_unbiased(x, weight, bias, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt() * weight + bias


def layer_norm_std(x, weight, bias, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps) * weight + bias


@pytest.mark.parametrize("fn", [layer_norm_unbiased, layer_norm_std])
def test_layer_norm_with_the_unbiased_variance_is_named(fn):
    with pytest.raises(AssertionError, match="unbiased variance.*Bessel"):
        grader.check_layer_norm(_run(layer_norm=fn))


def test_a_correct_layer_norm_passes():
    def layer_norm(x, weight, bias, eps=1e-5):
        x32 = x.float()
        out = (x32 - x32.mean(-1, keepdim=True)) / (x32.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
        return (out * weight + bias).to(x.dtype)

    grader.check_layer_norm(_run(layer_norm=layer_norm))


def _backward(path_through_r: float = 1.0, with_d: bool = True, sum_tokens: bool = True, use_autograd: bool = False):
    """rmsnorm_backward with the path through r scaled by `path_through_r` (1 = correct, 0 = missing, -1 = sign)."""

    def rmsnorm_backward(x, g, grad_out, eps=1e-6):
        if use_autograd:
            x = x.clone().requires_grad_(True)
            y = g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return torch.autograd.grad(y, x, grad_out)[0], g
        d = x.shape[-1]
        r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        grad_g = grad_out * x / r
        dot = (grad_out * g * x).sum(-1, keepdim=True)
        grad_x = (grad_out * g - path_through_r * x * dot / ((d if with_d else 1) * r**2)) / r
        return grad_x, grad_g.reshape(-1, d).sum(0) if sum_tokens else grad_g

    return rmsnorm_backward


def test_a_correct_backward_passes():
    grader.check_rmsnorm_backward(_run(rmsnorm_backward=_backward()))


@pytest.mark.parametrize("fn,words", [
    (_backward(path_through_r=0.0), "missing the path through r"),
    (_backward(path_through_r=-1.0), "wrong sign on the path through r"),
    (_backward(with_d=False), "1/d missing"),
    (_backward(sum_tokens=False), "shared by every token"),
    (_backward(use_autograd=True), "uses autograd"),
])
def test_a_wrong_backward_is_named(fn, words):
    with pytest.raises(AssertionError, match=words.replace("(", r"\(")):
        grader.check_rmsnorm_backward(_run(rmsnorm_backward=fn))
