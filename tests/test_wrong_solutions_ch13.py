"""Chapter 13's graders name the typical mistakes: each deliberately wrong solution below fails its check with a
message that says what is wrong, and right solutions (written in other ways too) pass.

No notebook runs: the function is put into a fake `NotebookRun` namespace and the grader's check is called.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graders import ch13_grpo
from grading import NotebookRun

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / ch13_grpo.NOTEBOOK
pytestmark = pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning")  # a wrong group of one


def _run(**functions) -> NotebookRun:
    return NotebookRun(NOTEBOOK, dict(functions))


def _fails(check, named: str, **functions) -> None:
    with pytest.raises(AssertionError) as e:
        check(_run(**functions))
    assert named in str(e.value), e.value


# ---- A1: group_advantages ---------------------------------------------------------------------------------------
def _advantages(centre=lambda r: r - r.mean(-1, keepdim=True), spread=lambda r: r.std(-1, keepdim=True) + 1e-4,
                of_one=lambda r: r.clone(), always_scale=False):
    def group_advantages(rewards, scale=True):
        if rewards.shape[-1] == 1 and of_one is not None:
            return of_one(rewards)
        return centre(rewards) / spread(rewards) if scale or always_scale else centre(rewards)
    return group_advantages


def advantages_std_mean(rewards, scale=True):
    """Another right one: torch.std_mean along dim 1."""
    if rewards.size(1) == 1:
        return rewards.clone()
    std, mean = torch.std_mean(rewards, dim=1, keepdim=True)
    return (rewards - mean) / (std + 1e-4) if scale else rewards - mean


@pytest.mark.parametrize("right", [_advantages(), advantages_std_mean])
def test_right_group_advantages_pass(right):
    ch13_grpo.check_group_advantages(_run(group_advantages=right))


@pytest.mark.parametrize("wrong,named", [
    (_advantages(spread=lambda r: r.std(-1, unbiased=False, keepdim=True) + 1e-4), "the biased std"),
    (_advantages(spread=lambda r: r.std(-1, keepdim=True)), "no eps in the denominator"),
    (_advantages(spread=lambda r: (r.var(-1, keepdim=True) + 1e-4).sqrt()), "eps added to the variance"),
    (_advantages(centre=lambda r: r - r.mean(), spread=lambda r: r.std() + 1e-4), "statistics over the wrong axis"),
    (_advantages(centre=lambda r: r - r.mean(0, keepdim=True), spread=lambda r: r.std(0, keepdim=True) + 1e-4),
     "statistics over the wrong axis"),
    (_advantages(spread=lambda r: r.std() + 1e-4), "statistics over the wrong axis"),
    (_advantages(centre=lambda r: r), "the rewards are not centred"),
    (_advantages(always_scale=True), "scale=False means no division by the std"),
    (_advantages(spread=lambda r: torch.ones_like(r)), "not divided by the std"),
    (_advantages(of_one=None), "a group of one"),  # nan from the unbiased std of one sample
    (_advantages(of_one=lambda r: r - r), "a group of one"),
    (_advantages(of_one=lambda r: r.flatten()), "shape (6,), expected (6, 1)"),
    (lambda rewards, scale=True: _advantages()(rewards, scale).flatten(), "one advantage per sample"),
])
def test_wrong_group_advantages_is_named(wrong, named):
    _fails(ch13_grpo.check_group_advantages, named, group_advantages=wrong)


# ---- A2: clipped_objective --------------------------------------------------------------------------------------
def _clipped(ratio=lambda new, old: torch.exp(new - old), combine=None, adv=lambda a: a.unsqueeze(-1)):
    def clipped_objective(logps, old_logps, advantages, clip_eps):
        rho, a = ratio(logps, old_logps), adv(advantages)
        if combine is not None:
            return combine(rho, a, clip_eps)
        return -torch.min(rho * a, rho.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return clipped_objective


def clipped_where(logps, old_logps, advantages, clip_eps):
    """Another right one: the pessimistic branch chosen with torch.where, as a maximum of the negatives."""
    ratio = (logps - old_logps).exp()
    a = advantages[:, None]
    unclipped, clipped = -ratio * a, -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    return torch.where(unclipped >= clipped, unclipped, clipped)


@pytest.mark.parametrize("right", [_clipped(), clipped_where,
                                   _clipped(combine=lambda r, a, e: torch.maximum(-r * a, -r.clamp(1 - e, 1 + e) * a))])
def test_right_clipped_objective_passes(right):
    ch13_grpo.check_clipped_objective(_run(clipped_objective=right))


@pytest.mark.parametrize("wrong,named", [
    (_clipped(combine=lambda r, a, e: -torch.max(r * a, r.clamp(1 - e, 1 + e) * a)), "max instead of min"),
    (_clipped(combine=lambda r, a, e: -torch.min(r * a, r * a.clamp(1 - e, 1 + e))), "instead of the ratio"),
    (_clipped(combine=lambda r, a, e: -torch.min(r * a, a.clamp(1 - e, 1 + e))), "instead of the ratio"),
    (_clipped(combine=lambda r, a, e: -torch.min(r * a, (r * a).clamp(1 - e, 1 + e))), "instead of the ratio"),
    (_clipped(ratio=lambda new, old: torch.exp(old - new)), "the ratio is upside down"),
    (_clipped(ratio=lambda new, old: torch.exp(old) / torch.exp(new)), "the ratio is upside down"),
    (_clipped(combine=lambda r, a, e: torch.min(r * a, r.clamp(1 - e, 1 + e) * a)), "the minus sign is missing"),
    (_clipped(combine=lambda r, a, e: -r.clamp(1 - e, 1 + e) * a), "clipped without the min"),
    (_clipped(ratio=lambda new, old: new - old), "the log-ratio, not the ratio"),
    (_clipped(ratio=lambda new, old: new / old), "a ratio of log-probabilities"),
    (_clipped(adv=lambda a: a.unsqueeze(0)), "the advantages broadcast over the wrong axis"),  # the N == T case
    (_clipped(combine=lambda r, a, e: -torch.min(r * a, r.clamp(1 - e, 1 + e) * a).mean(-1)), "one loss per token"),
    (_clipped(ratio=lambda new, old: torch.exp(new - old).detach()), "no gradient reaches logps"),
    (_clipped(combine=lambda r, a, e: -torch.min(r * a, r.detach().clamp(1 - e, 1 + e) * a)),
     "gradient with respect to logps"),  # right values; ties of the min split the gradient with a detached term
])
def test_wrong_clipped_objective_is_named(wrong, named):
    _fails(ch13_grpo.check_clipped_objective, named, clipped_objective=wrong)


# ---- B1: k3_kl, exact_kl, k3_monte_carlo ------------------------------------------------------------------------
def k3_right(logps, ref_logps):
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def k3_expm1(logps, ref_logps):
    """Another right one: expm1 keeps the digits of e^delta - 1 for small delta."""
    delta = ref_logps - logps
    return torch.expm1(delta) - delta


@pytest.mark.parametrize("right", [k3_right, k3_expm1])
def test_right_k3_kl_passes(right):
    ch13_grpo.check_k3_kl(_run(k3_kl=right))


@pytest.mark.parametrize("wrong,named", [
    (lambda lp, ref: lp - ref, "that is k1"),
    (lambda lp, ref: ref - lp, "that is -k1"),
    (lambda lp, ref: (ref - lp) ** 2 / 2, "that is k2"),
    (lambda lp, ref: torch.exp(lp - ref) - (lp - ref) - 1, "delta the wrong way round"),
    (lambda lp, ref: torch.exp(ref - lp) - (ref - lp), "the - 1 is missing"),
    (lambda lp, ref: torch.exp(ref - lp) - 1, "the - delta term is missing"),
    (lambda lp, ref: torch.exp(ref - lp) + (ref - lp) - 1, "the sign of the delta term"),
    (lambda lp, ref: k3_right(lp, ref).mean(), "one estimate per sampled token"),
    (lambda lp, ref: k3_right(lp.detach(), ref), "no gradient reaches logps"),
])
def test_wrong_k3_kl_is_named(wrong, named):
    _fails(ch13_grpo.check_k3_kl, named, k3_kl=wrong)


def kl_right(logits, ref_logits):
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_div(logits, ref_logits):
    """Another right one: PyTorch's own KL, KL(target || input) with the target in log space."""
    return F.kl_div(ref_logits.log_softmax(-1), logits.log_softmax(-1), reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("right", [kl_right, kl_div])
def test_right_exact_kl_passes(right):
    ch13_grpo.check_exact_kl(_run(exact_kl=right))


@pytest.mark.parametrize("wrong,named", [
    (lambda logits, ref: kl_right(ref, logits), "the KL the wrong way round"),
    (lambda logits, ref: (logits.softmax(-1) * (logits - ref)).sum(-1), "the raw logits, not log-probabilities"),
    (lambda logits, ref: (logits.softmax(0) * (logits.log_softmax(0) - ref.log_softmax(0))).sum(-1),
     "softmax over the wrong dimension"),
    (lambda logits, ref: (logits.softmax(-1) * (logits.log_softmax(-1) - ref.log_softmax(-1))).mean(-1),
     "a mean over the vocabulary, not a sum"),
    (lambda logits, ref: (logits.log_softmax(-1) - ref.log_softmax(-1)).sum(-1), "not weighted by pi"),
    (lambda logits, ref: kl_right(logits, ref).sum(), "one KL per distribution"),
])
def test_wrong_exact_kl_is_named(wrong, named):
    _fails(ch13_grpo.check_exact_kl, named, exact_kl=wrong)


def _monte_carlo(draw_from="policy", reduce=torch.mean, estimator=k3_right, use_generator=True):
    def k3_monte_carlo(logits, ref_logits, n_samples, generator):
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        probs = {"policy": logp.exp(), "reference": ref_logp.exp(), "uniform": torch.ones_like(logp)}[draw_from]
        tokens = torch.multinomial(probs, n_samples, replacement=True, generator=generator if use_generator else None)
        return reduce(estimator(logp[tokens], ref_logp[tokens]))
    return k3_monte_carlo


@pytest.mark.parametrize("right", [_monte_carlo(), _monte_carlo(estimator=k3_expm1)])
def test_right_k3_monte_carlo_passes(right):
    ch13_grpo.check_k3_monte_carlo(_run(k3_monte_carlo=right))


@pytest.mark.parametrize("wrong,named", [
    (_monte_carlo(draw_from="reference"), "the tokens are drawn from the reference"),
    (_monte_carlo(draw_from="uniform"), "the tokens are drawn uniformly"),
    (_monte_carlo(reduce=torch.sum), "the sum over the samples, not their mean"),
    (_monte_carlo(use_generator=False), "draw the samples with the generator passed in"),
    (_monte_carlo(estimator=lambda lp, ref: (ref - lp) ** 2 / 2), "allowed: within 5 standard errors"),  # k2: biased
    (_monte_carlo(reduce=lambda k: k.mean().item()), "expected a 0-dimensional tensor"),
])
def test_wrong_k3_monte_carlo_is_named(wrong, named):
    _fails(ch13_grpo.check_k3_monte_carlo, named, k3_monte_carlo=wrong)
