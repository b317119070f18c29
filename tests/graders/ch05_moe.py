"""Grader for exercises/05_moe_exercises.ipynb: router z-loss, capacity with token dropping, expert-choice routing."""
import math

import torch

from grading import NotebookRun, assert_close, call

NOTEBOOK = "05_moe_exercises.ipynb"


def _z_reference(logits: torch.Tensor) -> torch.Tensor:
    """(log Σ exp z)^2 averaged over tokens, in float64 with the max subtracted by hand."""
    z = logits.double().reshape(-1, logits.shape[-1])
    m = z.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(dim=-1))
    return (lse**2).mean().float()


def check_z_loss_values(run: NotebookRun) -> None:
    torch.manual_seed(0)
    for shape in ((6, 4), (2, 5, 8), (3, 2, 2, 16)):
        logits = torch.randn(shape) * 3
        got = call(run, "router_z_loss", logits)
        assert_close(got, _z_reference(logits), f"router_z_loss for logits of shape {shape}", atol=1e-5, rtol=1e-5)


def check_z_loss_is_stable_and_float32(run: NotebookRun) -> None:
    torch.manual_seed(1)
    big = 1000 + torch.randn(5, 8)
    got = call(run, "router_z_loss", big)
    assert torch.isfinite(got).all(), "router_z_loss(1000 + noise) is not finite: use torch.logsumexp instead of exp/log"
    assert_close(got, _z_reference(big), "router_z_loss for logits around 1000", atol=1e-2, rtol=1e-5)
    bf16 = (torch.randn(4, 6) * 2).to(torch.bfloat16)
    got = call(run, "router_z_loss", bf16)
    assert_close(got, _z_reference(bf16.float()), "router_z_loss for bf16 logits (compute and return float32)")
    logits = torch.randn(3, 4, requires_grad=True)
    got = call(run, "router_z_loss", logits)
    assert got.requires_grad, "router_z_loss must be differentiable (it is a training loss)"
    (g,) = torch.autograd.grad(got, logits)
    want = 2 * torch.logsumexp(logits.detach(), -1, keepdim=True) * logits.detach().softmax(-1) / 3
    assert_close(g, want, "gradient of router_z_loss (2·lse·softmax/N)")


def check_expert_capacity(run: NotebookRun) -> None:
    for n, e, k, cf in ((16, 4, 2, 1.0), (16, 4, 2, 1.25), (10, 3, 1, 1.0), (7, 8, 2, 0.5), (1024, 64, 8, 1.5)):
        got = call(run, "expert_capacity", n, e, k, cf)
        want = math.ceil(cf * n * k / e)
        assert isinstance(got, int) and got == want, f"expert_capacity({n}, {e}, {k}, {cf}) = {got!r}, expected {want} (an int)"


def _random_topk(n: int, e: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


def _keep_reference(topk_idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Loop in GShard priority: slot 0 of all tokens, then slot 1, ...; each expert takes the first `capacity`."""
    n, k = topk_idx.shape
    used = [0] * n_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        for t in range(n):
            e = int(topk_idx[t, j])
            if used[e] < capacity:
                keep[t, j], used[e] = True, used[e] + 1
    return keep


def check_capacity_keep_mask(run: NotebookRun) -> None:
    for n, e, k, cap, seed in ((12, 4, 2, 3, 0), (20, 5, 1, 2, 1), (9, 6, 3, 4, 2), (8, 4, 2, 100, 3), (8, 2, 2, 0, 4)):
        topk_idx = _random_topk(n, e, k, seed)
        got = call(run, "capacity_keep_mask", topk_idx, e, cap)
        want = _keep_reference(topk_idx, e, cap)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bool, "capacity_keep_mask should return a bool tensor"
        assert got.shape == want.shape, f"capacity_keep_mask shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(got, want), (
            f"capacity_keep_mask(capacity={cap}) differs for topk_idx={topk_idx.tolist()}:\n got  {got.int().tolist()}\n want "
            f"{want.int().tolist()}\n(priority: all first choices in token order, then all second choices, ...)"
        )


def _moe(seed: int, n_shared: int = 1):
    from zer02llm.moe import MoEFFN
    from zer02llm.utils import seed_everything

    seed_everything(seed)
    return MoEFFN(12, 4, 2, n_shared_experts=n_shared, hidden_dim=20).eval()


def check_capacity_moe_forward(run: NotebookRun) -> None:
    moe = _moe(10)
    torch.manual_seed(11)
    x = torch.randn(2, 8, 12)
    h = x.reshape(-1, 12)
    idx, w, _ = moe.gate(x)
    for cf in (0.5, 1.0, 100.0):
        cap = math.ceil(cf * h.shape[0] * 2 / 4)
        keep = _keep_reference(idx, 4, cap)
        with torch.no_grad():
            rows = []
            for t in range(h.shape[0]):
                y_t = sum(w[t, j] * moe.experts[int(idx[t, j])](h[t]) for j in range(2) if keep[t, j])
                rows.append(y_t + moe.shared_experts[0](h[t]))
            want = torch.stack(rows).view(x.shape)
            got = call(run, "capacity_moe_forward", moe, x, cf)
        assert_close(got, want, f"capacity_moe_forward(capacity_factor={cf})")


def _ec_reference(logits: torch.Tensor, capacity: int):
    scores = logits.double().softmax(-1)
    idx, wt = [], []
    for e in range(logits.shape[1]):
        order = sorted(range(logits.shape[0]), key=lambda t: -scores[t, e].item())[:capacity]
        idx.append(order)
        wt.append([scores[t, e].item() for t in order])
    return torch.tensor(idx), torch.tensor(wt, dtype=torch.float32)


def check_expert_choice_route(run: NotebookRun) -> None:
    torch.manual_seed(20)
    for n, e, cap in ((10, 4, 3), (16, 8, 2), (6, 3, 6)):
        logits = torch.randn(n, e) * 2
        got = call(run, "expert_choice_route", logits, cap)
        assert isinstance(got, tuple) and len(got) == 2, "expert_choice_route should return (token_idx, weight)"
        want_idx, want_w = _ec_reference(logits, cap)
        assert got[0].shape == want_idx.shape and torch.equal(got[0].long(), want_idx), (
            f"expert_choice_route token_idx: got {got[0].tolist()}, expected {want_idx.tolist()} (each row: expert e's top "
            f"{cap} tokens by softmax score, highest first)"
        )
        assert_close(got[1], want_w, "expert_choice_route weights (the softmax scores s[t, e], float32)", atol=1e-6)


def check_expert_choice_forward(run: NotebookRun) -> None:
    moe = _moe(30)
    torch.manual_seed(31)
    x = torch.randn(2, 5, 12)
    h = x.reshape(-1, 12)
    for cap in (2, 4, 10):
        idx, w = _ec_reference(h @ moe.gate.weight.detach().T, cap)
        with torch.no_grad():
            rows = []
            for t in range(h.shape[0]):
                y_t = moe.shared_experts[0](h[t])
                for e in range(4):
                    hits = (idx[e] == t).nonzero()
                    if len(hits):
                        y_t = y_t + w[e, hits[0, 0]] * moe.experts[e](h[t])
                rows.append(y_t)
            want = torch.stack(rows).view(x.shape)
            got = call(run, "expert_choice_forward", moe, x, cap)
        assert_close(got, want, f"expert_choice_forward(capacity={cap})")
