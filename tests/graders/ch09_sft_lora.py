"""Grader for solutions|exercises/09_sft_lora_exercises.ipynb.

Part A (build it): a LoRA layer and its merge, compared with the package's `zer02llm.lora.LoRALinear` (holding the
same A and B) and with the formula y = x W^T + b + (alpha / r) x A^T B^T written out here. The `peft` library is
not a dependency of the course, so it is not a reference. When an answer is wrong, the usual mistakes (B not zero
at the start, the scale upside down, A B instead of B A, a trainable base) are recomputed and named.
Part B (beyond the chapter): rsLoRA, DoRA, LoRA on embeddings.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun, assert_close, call, get, invoke
from zer02llm.lora import LoRALinear
from zer02llm.utils import seed_everything

NOTEBOOK = "09_sft_lora_exercises.ipynb"


def _layer(run: NotebookRun, in_features: int, out_features: int, rank: int, alpha: float, seed: int):
    """(the learner's layer, its base nn.Linear, a copy of the base's weights as they were, an input)."""
    seed_everything(seed)
    base = nn.Linear(in_features, out_features)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    layer = call(run, "MyLoRALinear", base, rank, alpha)
    if not isinstance(layer, nn.Module):
        raise AssertionError(f"MyLoRALinear(...) should be an nn.Module, got {type(layer).__name__}")
    for name, shape in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
        p = getattr(layer, name, None)
        if not isinstance(p, nn.Parameter) or tuple(p.shape) != shape:
            raise AssertionError(f"MyLoRALinear.{name} should be an nn.Parameter of shape {shape} (rank {rank}, "
                                 f"nn.Linear({in_features}, {out_features})), got "
                                 f"{tuple(p.shape) if isinstance(p, torch.Tensor) else p!r}")
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(seed))
    return layer, base, before, x


def _set_adapter(layer: nn.Module, seed: int) -> None:
    """Random A and B, as after some training (B is no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _package_twin(base: nn.Linear, layer: nn.Module, rank: int, alpha: float) -> LoRALinear:
    """zer02llm's LoRALinear around the same base, holding the learner's A and B."""
    twin = LoRALinear(base, rank, alpha)
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
        twin.lora_B.copy_(layer.lora_B)
    return twin


def check_lora_init(run: NotebookRun):
    rank, alpha = 4, 8.0
    layer, base, before, x = _layer(run, 20, 12, rank, alpha, seed=1)
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    if any(p.requires_grad for p in base.parameters()):
        raise AssertionError(f"the base layer's weights are left trainable (trainable: {trainable}): freeze them "
                             "(requires_grad_(False)). LoRA trains A and B only; that is where its saving comes from - "
                             "no gradient and no optimizer state for the big matrix W")
    if trainable != ["lora_A", "lora_B"]:
        raise AssertionError(f"only lora_A and lora_B should be trainable, got {trainable}")
    with torch.no_grad():
        start = invoke("MyLoRALinear.forward", layer, x)
        base_out = base(x)
    if not isinstance(start, torch.Tensor) or start.shape != base_out.shape:
        raise AssertionError(f"MyLoRALinear(x) should return shape {tuple(base_out.shape)}, got "
                             f"{getattr(start, 'shape', type(start).__name__)}")
    A_zero, B_zero = bool((layer.lora_A == 0).all()), bool((layer.lora_B == 0).all())
    if A_zero and not B_zero:
        raise AssertionError("lora_A is zero and lora_B random: the layer does start as the base layer, but that is "
                             "the convention for embeddings (Part B); a linear layer's LoRA starts A random "
                             "(Kaiming-uniform, as nn.Linear does) and B at zero, as the package does")
    if not B_zero:
        raise AssertionError(f"lora_B is not zero at initialisation, so the adapted layer's output differs from the "
                             f"pretrained layer's (max |adapted - base| = {(start - base_out).abs().max().item():.3g}) "
                             "before any training. Start B at zero (and A random): the update B A is then exactly 0")
    if A_zero:
        raise AssertionError("lora_A is zero too: with A = 0 and B = 0 the gradient of B (which goes through A) and "
                             "of A (which goes through B) are both zero, and nothing ever trains. Start A random "
                             "(Kaiming-uniform, as nn.Linear does) and B at zero")
    assert_close(start, base_out, "MyLoRALinear at initialisation (B = 0) vs the base layer", atol=1e-6)
    layer(x).pow(2).sum().backward()
    if base.weight.grad is not None or layer.lora_B.grad is None or not bool((layer.lora_B.grad != 0).any()):
        raise AssertionError("after a backward pass at initialisation lora_B should have a non-zero gradient (through "
                             "the random A), and the frozen base weight none")
    for k, v in before.items():
        if not torch.equal(base.state_dict()[k], v):
            raise AssertionError(f"MyLoRALinear changed the base layer's {k}: wrap it, leave its weights as they are")


SCALE_MISTAKES = {
    "the scale is upside down, r / alpha instead of alpha / r": lambda r, a: r / a,
    "the update is not divided by the rank: the scale is alpha / r, not alpha": lambda r, a: a,
    "the update is not scaled: LoRA multiplies B A by alpha / r": lambda r, a: 1.0,
    "the scale is alpha / sqrt(r): that is rsLoRA (Part B); plain LoRA uses alpha / r": lambda r, a: a / math.sqrt(r),
}


def check_lora_forward(run: NotebookRun):
    for (n_in, n_out, rank, alpha) in ((20, 12, 4, 8.0), (16, 16, 2, 6.0)):
        layer, base, _, x = _layer(run, n_in, n_out, rank, alpha, seed=2)
        _set_adapter(layer, seed=3)
        with torch.no_grad():
            got = invoke("MyLoRALinear.forward", layer, x)
            update = x @ layer.lora_A.T @ layer.lora_B.T
            expected = base(x) + alpha / rank * update
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected,
                                                                                                   atol=1e-5):
                for mistake, scale in SCALE_MISTAKES.items():
                    if torch.allclose(got, base(x) + scale(rank, alpha) * update, atol=1e-5):
                        raise AssertionError(f"MyLoRALinear(rank={rank}, alpha={alpha:g}).forward: {mistake}. "
                                             "alpha / r keeps the update's size comparable when r changes, so a "
                                             "learning rate tuned at one rank still works at another (chapter 09)")
            assert_close(got, expected, f"MyLoRALinear(rank={rank}, alpha={alpha:g}) with B != 0 vs "
                                        "x W^T + b + (alpha / r) x A^T B^T", atol=1e-5)
            assert_close(got, _package_twin(base, layer, rank, alpha)(x),
                         f"MyLoRALinear(rank={rank}, alpha={alpha:g}) vs zer02llm's LoRALinear with the same A, B",
                         atol=1e-5)


def check_lora_merge(run: NotebookRun):
    for (n_in, n_out, rank, alpha) in ((16, 16, 2, 6.0), (20, 12, 4, 8.0)):  # square first: (B A)^T fits it
        layer, base, before, x = _layer(run, n_in, n_out, rank, alpha, seed=4)
        _set_adapter(layer, seed=5)
        what = f"MyLoRALinear(nn.Linear({n_in}, {n_out}), rank={rank}).merged()"
        try:
            merged = invoke(what, layer.merged)
        except AssertionError as e:
            if "RuntimeError" in str(e) and ("shape" in str(e) or "size" in str(e)):
                raise AssertionError(f"{e} -- the update is B A: (out, r) @ (r, in) = (out, in), the weight's shape; "
                                     "A @ B, (r, in) @ (out, r), multiplies only when in == out and is then (r, r), "
                                     "and A^T B^T is (in, out), the transpose") from None
            raise
        if not isinstance(merged, nn.Linear):
            raise AssertionError(f"{what} should return a new nn.Linear, got {type(merged).__name__}")
        for k, v in before.items():
            if not torch.equal(base.state_dict()[k], v):
                raise AssertionError(f"{what} changed the base layer's {k} in place: build a new nn.Linear. The "
                                     "adapter layer must keep computing W0 x + ..., or a second merge adds B A twice")
        with torch.no_grad():
            delta = alpha / rank * layer.lora_B @ layer.lora_A
            if n_in == n_out and torch.allclose(merged.weight, base.weight + delta.T, atol=1e-5):
                raise AssertionError(f"{what}: the update is transposed, (A^T B^T) = (B A)^T; nn.Linear stores its "
                                     "weight as (out, in), and the update that matches it is B A")
            assert_close(merged.weight, base.weight + delta, f"{what}.weight vs W + (alpha / r) B A", atol=1e-5)
            assert_close(merged.weight, _package_twin(base, layer, rank, alpha).merged().weight,
                         f"{what}.weight vs zer02llm's LoRALinear(...).merged().weight", atol=1e-5)
            if merged.bias is None or not torch.equal(merged.bias, base.bias):
                raise AssertionError(f"{what} should keep the base layer's bias")
            assert_close(merged(x), invoke("MyLoRALinear.forward", layer, x), f"{what}(x) vs the adapted layer",
                         atol=1e-5)


def check_rslora(run: NotebookRun):
    seed_everything(0)
    base = nn.Linear(20, 12)
    layer = call(run, "RSLoRALinear", base, 4, 8.0)
    if not isinstance(layer, LoRALinear):
        raise AssertionError("RSLoRALinear should subclass LoRALinear")
    if not math.isclose(layer.scaling, 8.0 / 2.0):
        raise AssertionError(f"rsLoRA scaling for alpha=8, rank=4 is 8 / sqrt(4) = 4.0, got {layer.scaling}")
    x = torch.randn(3, 20)
    assert_close(layer(x), base(x), "RSLoRALinear at initialisation (B = 0) vs the base layer")
    with torch.no_grad():
        layer.lora_B.normal_()
    assert_close(layer(x), base(x) + 4.0 * x @ layer.lora_A.T @ layer.lora_B.T, "RSLoRALinear forward", atol=1e-5)


def _update_size(cls, rank, alpha=16.0, d=256, seed=0):
    seed_everything(seed)
    layer = cls(nn.Linear(d, d), rank, alpha)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    return (layer.delta_weight().norm() / math.sqrt(d)).item()


def check_update_size(run: NotebookRun):
    rs = get(run, "RSLoRALinear", "class")
    for cls, name in ((LoRALinear, "LoRALinear"), (rs, "RSLoRALinear")):
        for rank in (1, 8, 32):
            got = call(run, "update_size", cls, rank, 16.0, 64, 1)
            want = _update_size(cls, rank, 16.0, 64, 1)
            if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-4):
                raise AssertionError(f"update_size({name}, rank={rank}, alpha=16, d=64, seed=1) = {got!r}, "
                                     f"expected {want:.6g}")


def check_dora(run: NotebookRun):
    seed_everything(1)
    base = nn.Linear(16, 6)
    dora = call(run, "DoRALinear", base, 3, 6.0)
    x = torch.randn(4, 16)
    assert_close(dora(x), base(x), "DoRALinear at initialisation vs the base layer", atol=1e-6)
    trainable = sorted(n for n, p in dora.named_parameters() if p.requires_grad)
    if trainable != ["lora_A", "lora_B", "magnitude"]:
        raise AssertionError(f"DoRALinear should train lora_A, lora_B and magnitude only (the base is frozen), "
                             f"trains {trainable}")
    if tuple(dora.lora_A.shape) != (3, 16) or tuple(dora.lora_B.shape) != (6, 3) or tuple(dora.magnitude.shape) != (6,):
        raise AssertionError("shapes: lora_A (rank, in), lora_B (out, rank), magnitude (out,)")
    assert_close(dora.magnitude.detach(), base.weight.detach().norm(dim=1), "the initial magnitude (row norms of W0)")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        dora.lora_A.copy_(torch.randn(3, 16, generator=g))
        dora.lora_B.copy_(torch.randn(6, 3, generator=g))
        dora.magnitude.copy_(torch.rand(6, generator=g) + 0.5)
    v = base.weight + 2.0 * dora.lora_B @ dora.lora_A
    want_w = dora.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    assert_close(dora.merged_weight().detach(), want_w.detach(), "DoRALinear.merged_weight()", atol=1e-5)
    assert_close(dora(x).detach(), F.linear(x, want_w, base.bias).detach(), "DoRALinear.forward", atol=1e-5)
    dora(x).sum().backward()
    if base.weight.grad is not None or dora.magnitude.grad is None:
        raise AssertionError("gradients should reach magnitude, lora_A and lora_B, not the frozen base weight")


def check_lora_embedding(run: NotebookRun):
    seed_everything(3)
    emb = nn.Embedding(30, 8)
    layer = call(run, "LoRAEmbedding", emb, 2, 4.0)
    ids = torch.randint(0, 30, (3, 5))
    assert_close(layer(ids), emb(ids), "LoRAEmbedding at initialisation (A = 0) vs the base table")
    if tuple(layer.lora_A.shape) != (2, 30) or tuple(layer.lora_B.shape) != (8, 2):
        raise AssertionError(f"lora_A should be (rank, num_embeddings) = (2, 30) and lora_B (dim, rank) = (8, 2), got "
                             f"{tuple(layer.lora_A.shape)} and {tuple(layer.lora_B.shape)}")
    if not bool((layer.lora_A == 0).all()) or bool((layer.lora_B == 0).all()):
        raise AssertionError("for an embedding, A starts at zero and B is random")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(2, 30, generator=g))
    delta = 2.0 * (layer.lora_B @ layer.lora_A).T  # (30, 8)
    assert_close(layer(ids).detach(), (emb.weight + delta)[ids].detach(), "LoRAEmbedding forward", atol=1e-5)
    assert_close(layer.merged_weight().detach(), (emb.weight + delta).detach(), "LoRAEmbedding.merged_weight()",
                 atol=1e-5)
    layer(ids).sum().backward()
    if emb.weight.grad is not None or layer.lora_A.grad is None:
        raise AssertionError("the base table must stay frozen; lora_A and lora_B get the gradients")
