"""Chapter 05's graders name the usual mistakes: each wrong implementation below fails its check with a message that
says what is wrong, and a correct implementation passes. No notebook runs: the learner's namespace is faked."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun
from graders import ch05_moe as grader


def _run(**ns) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), ns)


def make_route(softmax_dim: int = -1, float32: bool = True, weights: str = "probabilities", renormalise=None):
    """`route` with switches for the usual mistakes; the defaults give the correct one. `renormalise` overrides
    norm_topk_prob (True / False = always / never); `weights="logits"` returns the top-k logits as weights."""

    def route(logits, k, norm_topk_prob=True):
        scores = logits.softmax(dim=softmax_dim, dtype=torch.float32 if float32 else None).float()
        topk_weight, topk_idx = scores.topk(k, dim=-1)
        if weights == "logits":
            topk_weight = logits.gather(1, topk_idx).float()
        if norm_topk_prob if renormalise is None else renormalise:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight.to(logits.dtype), scores

    return route


def make_balance_loss(scale=None, use_mask: bool = True, divide_by_all: bool = False, mean_over_all: bool = False,
                      flip_seq_aux: bool = False):
    """`balance_loss` with switches for the usual mistakes; the defaults give the correct one. `scale` replaces E/k."""

    def balance_loss(scores, topk_idx, alpha, token_mask=None, seq_aux=True):
        e, k = scores.shape[-1], topk_idx.shape[-1]
        real = torch.ones(scores.shape[:2], dtype=torch.bool)
        if token_mask is not None and use_mask:
            real = token_mask.bool()
        if seq_aux == flip_seq_aux:
            scores, topk_idx, real = scores.reshape(1, -1, e), topk_idx.reshape(1, -1, k), real.reshape(1, -1)
        m = real.float()
        n = torch.full_like(m.sum(1), m.shape[1]) if divide_by_all else m.sum(1)
        counts = (F.one_hot(topk_idx, e).float() * m[..., None, None]).sum(dim=(1, 2))
        f = counts * (e / k if scale is None else scale) / n.clamp(min=1)[:, None]
        p = (scores * m[..., None]).sum(1) / n.clamp(min=1)[:, None]
        per_sequence = alpha * (f * p).sum(1)
        if mean_over_all:
            return per_sequence.mean()
        return per_sequence.sum() / (m.sum(1) > 0).sum().clamp(min=1)

    return balance_loss


ROUTE, BALANCE_LOSS = make_route(), make_balance_loss()


def make_gate(pass_mask: bool = True, loss_in_eval: bool = False, route=ROUTE, balance_loss=BALANCE_LOSS):
    """MyMoEGate built on `route` and `balance_loss`; the defaults give the correct one."""

    class Gate(nn.Module):
        def __init__(self, dim, n_routed_experts, num_experts_per_tok, norm_topk_prob=True, aux_loss_alpha=0.01,
                     seq_aux=True):
            super().__init__()
            self.k, self.norm, self.alpha, self.seq_aux = num_experts_per_tok, norm_topk_prob, aux_loss_alpha, seq_aux
            self.weight = nn.Parameter(torch.randn(n_routed_experts, dim))

        def forward(self, x, token_mask=None):
            b, t, d = x.shape
            idx, w, scores = route(F.linear(x.reshape(-1, d), self.weight), self.k, self.norm)
            if (self.training or loss_in_eval) and self.alpha > 0:
                mask = token_mask if pass_mask else None
                aux = balance_loss(scores.view(b, t, -1), idx.view(b, t, -1), self.alpha, mask, self.seq_aux)
            else:
                aux = scores.new_zeros(())
            return idx, w, aux

    return Gate


def test_a_correct_router_passes_every_part_a_check():
    run = _run(route=ROUTE, balance_loss=BALANCE_LOSS, MyMoEGate=make_gate())
    for check in (grader.check_route, grader.check_route_bf16, grader.check_balance_loss,
                  grader.check_balance_loss_edges, grader.check_my_moe_gate, grader.check_my_moe_gate_modes):
        check(run)


@pytest.mark.parametrize("route,check,words", [
    (make_route(softmax_dim=0), "check_route", "softmax over the wrong dimension"),
    (make_route(renormalise=False), "check_route", "not renormalised"),
    (make_route(renormalise=True), "check_route", "softmax over the top-k logits only"),
    (make_route(weights="logits"), "check_route", "top-k logits themselves"),
    (make_route(float32=False), "check_route_bf16", "computed in bfloat16"),
])
def test_a_wrong_route_is_named(route, check, words):
    with pytest.raises(AssertionError, match=words):
        getattr(grader, check)(_run(route=route))


@pytest.mark.parametrize("loss,words", [
    (make_balance_loss(use_mask=False), "counts the padding tokens"),
    (make_balance_loss(divide_by_all=True), "divides by all T positions"),
    (make_balance_loss(mean_over_all=True), "including those with no real token"),
    (make_balance_loss(scale=1.0), "missing the E/k scaling"),
    (make_balance_loss(scale=4.0), "missing the 1/k"),
    (make_balance_loss(scale=0.5), "missing the factor E"),
    (make_balance_loss(flip_seq_aux=True), "seq_aux"),
])
def test_a_wrong_balance_loss_is_named(loss, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_balance_loss(_run(balance_loss=loss))


def test_a_loss_with_a_differentiable_count_is_named():
    """f built from the probabilities (a soft count) carries a gradient it must not have."""

    def soft_count_loss(scores, topk_idx, alpha, token_mask=None, seq_aux=True):
        hard = BALANCE_LOSS(scores, topk_idx, alpha, token_mask, seq_aux)
        return hard + (scores - scores.detach()).sum() * 0.1  # same value, wrong gradient

    with pytest.raises(AssertionError, match="f_i is a count"):
        grader.check_balance_loss_edges(_run(balance_loss=soft_count_loss))


@pytest.mark.parametrize("gate,check,words", [
    (make_gate(pass_mask=False), "check_my_moe_gate", "token_mask does not reach the loss"),
    (make_gate(loss_in_eval=True), "check_my_moe_gate_modes", "training loss"),
])
def test_a_wrong_gate_is_named(gate, check, words):
    with pytest.raises(AssertionError, match=words):
        getattr(grader, check)(_run(MyMoEGate=gate))
