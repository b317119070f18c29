"""Grader for exercises/01_rmsnorm_exercises.ipynb: RMSNorm built from scratch (Part A); LayerNorm, timing and
RMSNorm's backward pass derived by hand (Part B).

Where a learner's output is wrong, the grader recomputes the usual wrong implementations on the same input and,
when one of them reproduces the learner's numbers, names that mistake and says why it matters."""
import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun, assert_close, call, expect, gap, same

NOTEBOOK = "01_rmsnorm_exercises.ipynb"


# --- Part A: MyRMSNorm --------------------------------------------------------------------------------------------


def _rms_mistakes(x: torch.Tensor, w: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """What the usual wrong RMSNorms output for (x, w, eps), each with the message that names it."""
    d = x.shape[-1]
    ms = x.pow(2).mean(-1, keepdim=True)
    centred = "is centred on the mean"
    why_rms = "RMSNorm divides by the root mean square of x itself, sqrt((1/d)·Σ x_i² + eps): no centring, 1/d"
    return {
        "divides by sqrt(mean(x) + eps), the mean of x instead of the mean of its squares: "
        "RMS(x) = sqrt(mean(x²) + eps), i.e. x.pow(2).mean(-1)": w * x / (x.mean(-1, keepdim=True) + eps).sqrt(),
        f"normalises by the unbiased variance: x.var() {centred} and divides by d-1 by default (Bessel's correction). "
        + why_rms: w * x / (x.var(-1, keepdim=True) + eps).sqrt(),
        f"normalises by the (biased) variance, which {centred}. " + why_rms:
            w * x / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt(),
        f"divides by the standard deviation: x.std() {centred}, divides by d-1 (unbiased, Bessel's correction) and "
        "puts eps outside the square root. " + why_rms: w * x / (x.std(-1, keepdim=True) + eps),
        "divides the sum of squares by d-1 (the 'unbiased' estimator): the mean of squares divides by d":
            w * x / (x.pow(2).sum(-1, keepdim=True) / (d - 1) + eps).sqrt(),
        "divides by the square root of the *sum* of squares: RMS uses their mean (divide by d)":
            w * x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt(),
        "divides by mean(x²) + eps without the square root: RMS(x) = sqrt(mean(x²) + eps)": w * x / (ms + eps),
        "subtracts the mean first, as LayerNorm does: RMSNorm does not centre the token":
            w * (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt(),
        "normalises over the wrong dimension (dim 1, the positions): each token, i.e. the LAST dimension, must be "
        "normalised on its own (mean(-1, keepdim=True))": w * x / (x.pow(2).mean(1, keepdim=True) + eps).sqrt(),
        "normalises over the wrong dimension (dim 0, the batch): each token, i.e. the LAST dimension, must be "
        "normalised on its own (mean(-1, keepdim=True))": w * x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt(),
        "normalises over the whole tensor: each token, i.e. the LAST dimension, must be normalised on its own "
        "(mean(-1, keepdim=True))": w * x / (x.pow(2).mean() + eps).sqrt(),
        "does not multiply by the gain `self.weight`": x / (ms + eps).sqrt(),
    }


def _module(run: NotebookRun, dim: int, **kwargs) -> nn.Module:
    m = call(run, "MyRMSNorm", dim, **kwargs)
    if not isinstance(m, nn.Module):
        raise AssertionError(f"MyRMSNorm({dim}) should be an nn.Module, got {type(m).__name__}")
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise AssertionError("MyRMSNorm needs a learnable gain: an nn.Parameter named `weight` "
                             "(self.weight = nn.Parameter(...))")
    if tuple(w.shape) != (dim,):
        raise AssertionError(f"MyRMSNorm({dim}).weight has shape {tuple(w.shape)}, expected ({dim},): "
                             "one gain per feature")
    return m


def _forward(run: NotebookRun, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    __tracebackhide__ = True
    try:
        with torch.no_grad():
            return m(x)
    except NotImplementedError:
        raise AssertionError("MyRMSNorm.forward is not implemented yet: replace `raise NotImplementedError()`") \
            from None
    except Exception as e:
        raise AssertionError(f"MyRMSNorm.forward raised {type(e).__name__}: {e}") from e


def check_my_rmsnorm_float32(run: NotebookRun) -> None:
    """Structure, then float32 values against zer02llm.norm.RMSnorm and F.rms_norm, with the mistakes named."""
    from zer02llm.norm import RMSnorm

    m = _module(run, 48)
    if not torch.equal(m.weight.detach(), torch.ones(48)):
        raise AssertionError(
            f"MyRMSNorm(48).weight starts at {m.weight.detach()[:4].tolist()}..., expected all ones: a fresh RMSNorm "
            "is a pure re-scaling (torch.ones(dim))"
        )
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 7, 48, generator=g) * 3 + 1  # distinct B, T, d; a mean far from 0
    w = torch.randn(48, generator=g)
    with torch.no_grad():
        m.weight.copy_(w)
    ref = RMSnorm(48)
    with torch.no_grad():
        ref.weight.copy_(w)
        want = ref(x)
    got = _forward(run, m, x)
    expect("MyRMSNorm vs zer02llm.norm.RMSnorm (same weight, float32)", got, want, _rms_mistakes(x, w, 1e-6))
    assert_close(got, F.rms_norm(x, (48,), w, eps=1e-6), "MyRMSNorm vs torch.nn.functional.rms_norm (float32)")
    x.requires_grad_(True)
    try:
        m(x).square().sum().backward()
    except Exception as e:
        raise AssertionError(f"MyRMSNorm's output cannot be back-propagated ({type(e).__name__}: {e})") from e
    if m.weight.grad is None:
        raise AssertionError("MyRMSNorm.weight gets no gradient: multiply by self.weight (not a detached copy)")


def check_my_rmsnorm_eps(run: NotebookRun) -> None:
    """eps is stored and used inside the square root; its default is 1e-6; an all-zero token gives zeros."""
    from zer02llm.norm import RMSnorm

    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 16, generator=g) * 0.05  # mean(x²) ≈ 2.5e-3: eps = 0.1 matters a lot
    small = _forward(run, _module(run, 16, eps=1e-6), x)
    large = _forward(run, _module(run, 16, eps=0.1), x)
    if same(small, large, 1e-6, 1e-5):
        raise AssertionError(
            "MyRMSNorm's output does not depend on eps (eps=1e-6 and eps=0.1 give the same result for a token with "
            f"mean(x²) = {x.pow(2).mean().item():.1e}): store eps in __init__ and add it inside the square root, "
            "sqrt(mean(x²) + eps); it is what keeps the division finite for an all-zero token"
        )
    want = RMSnorm(16, eps=0.1)(x).detach()
    expect("MyRMSNorm(16, eps=0.1) vs zer02llm.norm.RMSnorm(16, eps=0.1)", large, want, {
        "adds eps outside the square root, sqrt(mean(x²)) + eps: it belongs inside, sqrt(mean(x²) + eps) (the "
        "definition the package, Hugging Face and F.rms_norm share)":
            x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 0.1),
    })
    tiny = x * 1e-3  # mean(x²) ≈ 2.5e-9: the default eps dominates
    got, want = _forward(run, _module(run, 16), tiny), RMSnorm(16)(tiny).detach()
    if not same(got, want, 1e-5, 1e-5):
        raise AssertionError(f"MyRMSNorm(16) with its default eps differs from RMSnorm(16) on a token with mean(x²) = "
                             f"{tiny.pow(2).mean().item():.1e} ({gap(got, want)}): the default should be eps=1e-6")
    zeros = _forward(run, _module(run, 16), torch.zeros(2, 16))
    if not torch.isfinite(zeros).all() or zeros.abs().max() != 0:
        raise AssertionError(f"MyRMSNorm on an all-zero token gives {zeros[0, :3].tolist()}..., expected zeros: "
                             "eps inside the square root keeps 0 / sqrt(0 + eps) finite")


def check_my_rmsnorm_half_precision(run: NotebookRun) -> None:
    """Statistics in float32 (float16 values of 400 square to more than float16 can hold), the input's dtype out."""
    from zer02llm.norm import RMSnorm

    g = torch.Generator().manual_seed(12)
    w = torch.randn(64, generator=g)
    for dtype, scale in ((torch.float16, 400.0), (torch.bfloat16, 3.0)):
        x = (torch.randn(2, 8, 64, generator=g) * scale).to(dtype)
        m = _module(run, 64)
        ref = RMSnorm(64)
        with torch.no_grad():
            m.weight.copy_(w)
            ref.weight.copy_(w)
        name = str(dtype).removeprefix("torch.")
        if not same(_forward(run, m, x.float()), ref(x.float()).detach(), 1e-5, 1e-5):
            raise AssertionError(f"MyRMSNorm is already wrong in float32, on the float32 copy of the {name} test "
                                 "input: fix what check_my_rmsnorm_float32 reports first")
        m, ref = m.to(dtype), ref.to(dtype)
        got, want = _forward(run, m, x), ref(x).detach()
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"MyRMSNorm should return a tensor, got {type(got).__name__}")
        if got.dtype != dtype:
            raise AssertionError(f"MyRMSNorm (module and input in {name}) returns {got.dtype}: cast the normalised "
                                 f"value back with .to(x.dtype) before multiplying by the gain")
        no_upcast = (
            f"no float32 upcast: the statistics are computed in {name}. "
            + ("x² of values around 400 exceeds float16's maximum (65504) and overflows to inf; "
               if dtype == torch.float16 else "bfloat16 keeps 8 significant bits, too few to average squares with; ")
            + "compute x.float().pow(2).mean(-1) and cast the normalised value back to x.dtype"
        )
        if not torch.isfinite(got).all() or (got == 0).float().mean() > 0.5:
            raise AssertionError(f"MyRMSNorm on {name} input gives {int((~torch.isfinite(got)).sum())} non-finite and "
                                 f"{int((got == 0).sum())} zero outputs of {got.numel()} - {no_upcast}")
        if not same(got, want, 1e-6, 1e-2):  # 1e-2 relative: about one bfloat16 step (the order of cast and gain)
            raise AssertionError(f"MyRMSNorm vs RMSnorm, both in {name}: {gap(got, want)}, more than one {name} "
                                 f"step - probably {no_upcast}")


# --- Part B ---------------------------------------------------------------------------------------------------------


def check_layer_norm(run: NotebookRun):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 48, generator=g) * 5 + 2
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    for eps in (1e-5, 1e-2):
        mu = x.mean(-1, keepdim=True)
        unbiased = (
            "uses the unbiased variance: x.var() and x.std() divide by d-1 by default (Bessel's correction, meant for "
            "estimating a population from a sample); LayerNorm normalises with the biased variance, the plain mean of "
            "(x - mu)² over the d features: x.var(-1, unbiased=False) or (x - mu).pow(2).mean(-1)"
        )
        mistakes = {
            unbiased: (x - mu) / (x.var(-1, keepdim=True) + eps).sqrt() * w + b,
            unbiased + "; it also adds eps outside the square root (x.std() + eps)":
                (x - mu) / (x.std(-1, keepdim=True) + eps) * w + b,
            "adds eps outside the square root: it belongs inside, sqrt(var + eps)":
                (x - mu) / (x.var(-1, keepdim=True, unbiased=False).sqrt() + eps) * w + b,
        }
        got = call(run, "layer_norm", x, w, b, eps)
        expect(f"layer_norm(eps={eps})", got, F.layer_norm(x, (48,), w, b, eps), mistakes)
    xb = x.to(torch.bfloat16)
    out = call(run, "layer_norm", xb, w, b)
    want = F.layer_norm(xb.float(), (48,), w, b).to(torch.bfloat16)
    assert_close(out, want, "layer_norm on bf16 input", atol=0.05, rtol=0.02)


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
        raise AssertionError(f"time_norm(fn, x, repeats=4) should call fn 5 times (1 warm-up + 4 timed), it called "
                             f"it {len(calls)} times")


def check_rmsnorm_backward(run: NotebookRun):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 32, generator=g, requires_grad=True)
    w = torch.randn(32, generator=g, requires_grad=True)
    up = torch.randn(2, 6, 32, generator=g)
    F.rms_norm(x, (32,), w, eps=1e-6).backward(up)
    xd, wd = x.detach(), w.detach()
    try:
        with torch.no_grad():
            result = call(run, "rmsnorm_backward", xd, wd, up, 1e-6)
    except AssertionError as e:
        if "does not require grad" in str(e) or "does not have a grad_fn" in str(e):
            raise AssertionError("rmsnorm_backward uses autograd, which the grader switches off (torch.no_grad()): "
                                 "derive the gradient by hand and compute it with tensor operations") from None
        raise
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"rmsnorm_backward should return (grad_x, grad_g), got {type(result).__name__}")
    grad_x, grad_g = result
    if isinstance(grad_g, torch.Tensor) and grad_g.shape == x.shape:
        raise AssertionError(f"grad_g has shape {tuple(grad_g.shape)}, expected (32,): the gain is shared by every "
                             "token, so its gradient sums the per-token contributions over all leading dimensions")
    d = x.shape[-1]
    r = torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    dot = (up * wd * xd).sum(-1, keepdim=True)
    expect("grad_x", grad_x, x.grad, {
        "is missing the path through r: r depends on every x_j of the token, which adds "
        "-x/(d·r³)·Σ_i ȳ_i·g_i·x_i to the direct term ȳ⊙g/r": up * wd / r,
        "has the wrong factor on the path through r: ∂r/∂x_j = x_j / (d·r), so that term is "
        "-x/(d·r³)·Σ_i ȳ_i·g_i·x_i (is the 1/d missing?)": (up * wd - xd * dot / r**2) / r,
        "has the wrong sign on the path through r: a larger x_j makes r larger, which shrinks every output of the "
        "token": (up * wd + xd * dot / (d * r**2)) / r,
    })
    assert_close(grad_g, w.grad, "grad_g", atol=1e-5)
