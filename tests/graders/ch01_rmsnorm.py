"""Grader for solutions|exercises/01_rmsnorm_exercises.ipynb."""
import torch
import torch.nn.functional as F

from grading import NotebookRun, assert_close, call

NOTEBOOK = "01_rmsnorm_exercises.ipynb"


def check_layer_norm(run: NotebookRun):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 48, generator=g) * 5 + 2
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    for eps in (1e-5, 1e-2):
        assert_close(call(run, "layer_norm", x, w, b, eps), F.layer_norm(x, (48,), w, b, eps), f"layer_norm(eps={eps})")
    xb = x.to(torch.bfloat16)
    out = call(run, "layer_norm", xb, w, b)
    assert_close(out, F.layer_norm(x.to(torch.bfloat16).float(), (48,), w, b).to(torch.bfloat16), "layer_norm on bf16 input", atol=0.05, rtol=0.02)


def check_time_norm(run: NotebookRun):
    calls = []

    def fn(t):
        calls.append(t)
        return t

    x = torch.zeros(2)
    t = call(run, "time_norm", fn, x, 4)
    if not isinstance(t, float) or not (0.0 <= t < 1.0):
        raise AssertionError(f"time_norm should return a median time in seconds (a small float), got {t!r}")
    if len(calls) != 5:
        raise AssertionError(f"time_norm(fn, x, repeats=4) should call fn 5 times (1 warm-up + 4 timed), it called it {len(calls)} times")


def check_rmsnorm_backward(run: NotebookRun):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 32, generator=g, requires_grad=True)
    w = torch.randn(32, generator=g, requires_grad=True)
    up = torch.randn(2, 6, 32, generator=g)
    F.rms_norm(x, (32,), w, eps=1e-6).backward(up)
    result = call(run, "rmsnorm_backward", x.detach(), w.detach(), up, 1e-6)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"rmsnorm_backward should return (grad_x, grad_g), got {type(result).__name__}")
    assert_close(result[0], x.grad, "grad_x", atol=1e-5)
    assert_close(result[1], w.grad, "grad_g", atol=1e-5)
