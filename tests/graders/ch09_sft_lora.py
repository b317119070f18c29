"""Grader for solutions|exercises/09_sft_lora_exercises.ipynb: rsLoRA, DoRA, LoRA on embeddings."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun, assert_close, call, get
from zer02llm.lora import LoRALinear
from zer02llm.utils import seed_everything

NOTEBOOK = "09_sft_lora_exercises.ipynb"


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
                raise AssertionError(f"update_size({name}, rank={rank}, alpha=16, d=64, seed=1) = {got!r}, expected {want:.6g}")


def check_dora(run: NotebookRun):
    seed_everything(1)
    base = nn.Linear(16, 6)
    dora = call(run, "DoRALinear", base, 3, 6.0)
    x = torch.randn(4, 16)
    assert_close(dora(x), base(x), "DoRALinear at initialisation vs the base layer", atol=1e-6)
    trainable = sorted(n for n, p in dora.named_parameters() if p.requires_grad)
    if trainable != ["lora_A", "lora_B", "magnitude"]:
        raise AssertionError(f"DoRALinear should train lora_A, lora_B and magnitude only (the base is frozen), trains {trainable}")
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
    assert_close(layer.merged_weight().detach(), (emb.weight + delta).detach(), "LoRAEmbedding.merged_weight()", atol=1e-5)
    layer(ids).sum().backward()
    if emb.weight.grad is not None or layer.lora_A.grad is None:
        raise AssertionError("the base table must stay frozen; lora_A and lora_B get the gradients")
