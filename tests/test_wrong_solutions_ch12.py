"""Chapter 12's graders name the typical mistakes: each deliberately wrong solution below fails its check with a
message that says what is wrong, and a right solution passes.

No notebook runs: the wrong function is put into a fake `NotebookRun` namespace and the grader's check is called.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graders import ch12_dpo
from grading import NotebookRun

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / ch12_dpo.NOTEBOOK
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")  # transformers 5 on TRL's config


def _run(**functions) -> NotebookRun:
    return NotebookRun(NOTEBOOK, dict(functions))


def _fails(check, named: str, **functions) -> None:
    with pytest.raises(AssertionError) as e:
        check(_run(**functions))
    assert named in str(e.value), e.value


# ---- A1: sequence_logprob ---------------------------------------------------------------------------------------
def _gathered(logp, targets, ignore=True):
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, picked, 0.0).sum(-1) if ignore else picked.sum(-1)


def logprob_right(logits, labels):
    return _gathered(logits[:, :-1].float().log_softmax(-1), labels[:, 1:])


def logprob_cross_entropy(logits, labels):
    """Another right one: F.cross_entropy ignores -100 by default."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")
    return -nll.sum(-1)


def logprob_no_shift(logits, labels):
    return _gathered(logits.float().log_softmax(-1), labels)


def logprob_wrong_way(logits, labels):
    return _gathered(logits[:, 1:].float().log_softmax(-1), labels[:, :-1])


def logprob_mean(logits, labels):
    targets = labels[:, 1:]
    return logprob_right(logits, labels) / (targets != -100).sum(-1).clamp(min=1)


def logprob_counts_ignored(logits, labels):
    return _gathered(logits[:, :-1].float().log_softmax(-1), labels[:, 1:], ignore=False)


def logprob_gathers_minus_100(logits, labels):
    return logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)


def logprob_loop_reads_minus_100(logits, labels):
    """Token by token, without skipping -100: Python's negative indexing reads token V - 100."""
    logp = logits.float().log_softmax(-1)
    rows = [sum(logp[b, t, labels[b, t + 1]] for t in range(labels.shape[1] - 1)) for b in range(labels.shape[0])]
    return torch.stack(rows)


def logprob_softmax(logits, labels):
    return _gathered(logits[:, :-1].float().softmax(-1), labels[:, 1:])


def logprob_raw_logits(logits, labels):
    return _gathered(logits[:, :-1].float(), labels[:, 1:])


def logprob_wrong_dim(logits, labels):
    return _gathered(logits.float().log_softmax(1)[:, :-1], labels[:, 1:])


def logprob_nll(logits, labels):
    return -logprob_right(logits, labels)


def logprob_summed_over_batch(logits, labels):
    return logprob_right(logits, labels).sum()


def logprob_bfloat16(logits, labels):
    return _gathered(logits[:, :-1].log_softmax(-1), labels[:, 1:]).float()


def logprob_keeps_dtype(logits, labels):
    return logprob_right(logits, labels).to(logits.dtype)


def logprob_detached(logits, labels):
    return logprob_right(logits.detach(), labels)


@pytest.mark.parametrize("right", [logprob_right, logprob_cross_entropy])
def test_right_sequence_logprob_passes(right):
    ch12_dpo.check_sequence_logprob(_run(sequence_logprob=right))


@pytest.mark.parametrize("wrong,named", [
    (logprob_no_shift, "no shift"),
    (logprob_wrong_way, "shifted the wrong way"),
    (logprob_mean, "a mean, not a sum"),
    (logprob_counts_ignored, "-100 labels are counted"),
    (logprob_gathers_minus_100, "-100 is not a token id"),
    (logprob_loop_reads_minus_100, "-100 labels are counted"),
    (logprob_softmax, "softmax instead of log_softmax"),
    (logprob_raw_logits, "the raw logits, not log-probabilities"),
    (logprob_wrong_dim, "log_softmax over the wrong dimension"),
    (logprob_nll, "the sign: that is the negative log-likelihood"),
    (logprob_summed_over_batch, "one log-probability per sequence"),
    (logprob_bfloat16, "the log-softmax ran in bfloat16"),
    (logprob_keeps_dtype, "return float32 whatever the logits' dtype"),
    (logprob_detached, "no gradient reaches the logits"),
])
def test_wrong_sequence_logprob_is_named(wrong, named):
    _fails(ch12_dpo.check_sequence_logprob, named, sequence_logprob=wrong)


# ---- A2: dpo_loss -----------------------------------------------------------------------------------------------
def _dpo(z_fn, rewards=lambda pc, pr, rc, rr, beta: (beta * (pc - rc).detach(), beta * (pr - rr).detach())):
    """A DPO loss from a per-pair loss z_fn(pc, pr, rc, rr, beta) and a rewards function."""
    def loss(pc, pr, rc, rr, beta):
        return (z_fn(pc, pr, rc, rr, beta), *rewards(pc, pr, rc, rr, beta))
    return loss


def _margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def _nll(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * _margin(pc, pr, rc, rr))


dpo_right = _dpo(_nll)
dpo_softplus = _dpo(lambda pc, pr, rc, rr, beta: F.softplus(-beta * _margin(pc, pr, rc, rr)))  # also right


@pytest.mark.parametrize("right", [dpo_right, dpo_softplus])
def test_right_dpo_loss_passes(right):
    ch12_dpo.check_dpo_loss(_run(dpo_loss=right))


@pytest.mark.parametrize("wrong,named", [
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(_margin(pc, pr, rc, rr))), "beta is missing"),
    (_dpo(lambda pc, pr, rc, rr, beta: -beta * F.logsigmoid(_margin(pc, pr, rc, rr))),
     "beta multiplies the loss, outside the sigmoid"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(_margin(pc, pr, rc, rr) / beta)), "beta divides the margin"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr))), "the reference terms are dropped"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _margin(pr, pc, rr, rc))),
     "the sign is flipped"),  # chosen and rejected swapped
    (_dpo(lambda pc, pr, rc, rr, beta: -torch.log1p(-torch.sigmoid(beta * _margin(pc, pr, rc, rr)))),
     "the sign is flipped"),  # -log(1 - sigma)
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((rc - pc) - (rr - pr)))),
     "the sign is flipped"),  # reference - policy
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc - rr) - (pr - rc)))),
     "the reference log-probabilities are crossed"),
    (_dpo(lambda pc, pr, rc, rr, beta: F.logsigmoid(beta * _margin(pc, pr, rc, rr))), "log sigma without its minus"),
    (_dpo(lambda pc, pr, rc, rr, beta: torch.log1p(-torch.sigmoid(beta * _margin(pc, pr, rc, rr)))),
     "log(1 - sigma(...))"),
    (_dpo(lambda pc, pr, rc, rr, beta: -torch.sigmoid(beta * _margin(pc, pr, rc, rr))),
     "the likelihood, not its log"),
    (_dpo(lambda pc, pr, rc, rr, beta: 1 - torch.sigmoid(beta * _margin(pc, pr, rc, rr))),
     "1 - sigma(...), not -log sigma(...)"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))),
     "each reply's reward goes through its own sigmoid"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _margin(pc, pr, rc, rr)).mean()), "one loss per pair"),
    (_dpo(lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * _margin(pc, pr, rc, rr)))),
     "use F.logsigmoid(z)"),  # fine on narrow margins, -inf on wide ones
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _margin(pc.detach(), pr.detach(), rc, rr))),
     "no gradient reaches policy_chosen and policy_rejected"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - rc))), "the rejected reply is left out"),
    (_dpo(lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _margin(pc, pr.detach(), rc, rr))),
     "no gradient reaches policy_rejected -"),
    (_dpo(_nll, lambda pc, pr, rc, rr, beta: ((pc - rc).detach(), (pr - rr).detach())),
     "the rewards are not scaled by beta"),
    (_dpo(_nll, lambda pc, pr, rc, rr, beta: ((pc - rc).detach() / beta, (pr - rr).detach() / beta)),
     "the rewards are divided by beta"),
    (_dpo(_nll, lambda pc, pr, rc, rr, beta: (beta * pc.detach(), beta * pr.detach())),
     "the rewards leave out the reference"),
    (_dpo(_nll, lambda pc, pr, rc, rr, beta: (beta * (pr - rr).detach(), beta * (pc - rc).detach())),
     "the rewards are swapped"),
    (_dpo(_nll, lambda pc, pr, rc, rr, beta: (beta * (pc - rc), beta * (pr - rr))),
     "the rewards carry gradients - detach them"),
])
def test_wrong_dpo_loss_is_named(wrong, named):
    _fails(ch12_dpo.check_dpo_loss, named, dpo_loss=wrong)


def test_dpo_loss_returning_the_loss_alone_is_told_the_contract():
    _fails(ch12_dpo.check_dpo_loss, "should return a tuple (losses, chosen_rewards, rejected_rewards)",
           dpo_loss=lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _margin(pc, pr, rc, rr)))


# ---- B1: robust_dpo_loss ----------------------------------------------------------------------------------------
def _robust(combine):
    def robust(pc, pr, rc, rr, beta, eps):
        clean, swapped = dpo_right(pc, pr, rc, rr, beta)[0], dpo_right(pr, pc, rr, rc, beta)[0]
        return combine(clean, swapped, eps)
    return robust


def test_right_robust_dpo_loss_passes():
    right = _robust(lambda clean, swapped, eps: ((1 - eps) * clean - eps * swapped) / (1 - 2 * eps))
    ch12_dpo.check_robust_dpo_loss(_run(robust_dpo_loss=right))


@pytest.mark.parametrize("wrong,named", [
    (_robust(lambda clean, swapped, eps: (1 - eps) * clean + eps * swapped), "that is conservative DPO"),
    (_robust(lambda clean, swapped, eps: (1 - eps) * clean - eps * swapped), "the 1 / (1 - 2 eps) is missing"),
    (_robust(lambda clean, swapped, eps: (eps * clean - (1 - eps) * swapped) / (1 - 2 * eps)),
     "eps and 1 - eps are exchanged"),
    (_robust(lambda clean, swapped, eps: clean), "that is the plain DPO loss"),
])
def test_wrong_robust_dpo_loss_is_named(wrong, named):
    _fails(ch12_dpo.check_robust_dpo_loss, named, robust_dpo_loss=wrong)
