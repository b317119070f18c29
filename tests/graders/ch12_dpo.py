"""Grader for solutions|exercises/12_dpo_exercises.ipynb.

Part A (build it): a sequence's log-probability from a tiny model's logits, compared with
`zer02llm.dpo.sequence_logprobs` and a naive loop, gradients included; the DPO loss and its implicit rewards, compared
with `zer02llm.dpo.dpo_loss` and with TRL 1.16's `DPOTrainer` (its loss, its gradient, its logged rewards).
Part B (beyond the chapter): robust DPO, compared with TRL's `loss_type="robust"` and with the property that defines
it (unbiased under flipped labels).
When an answer is wrong and equals what a usual slip gives (no shift, a mean for a sum, -100 counted, beta outside the
sigmoid, the reference dropped, chosen and rejected swapped...), the message names the slip.
"""
import functools
import tempfile
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from grading import Mistakes, NotebookRun, assert_close, call, name_the_mistake
from zer02llm.config import LLMconfig
from zer02llm.dpo import dpo_loss, sequence_logprobs, token_logprobs
from zer02llm.model import LLM
from zer02llm.utils import seed_everything

NOTEBOOK = "12_dpo_exercises.ipynb"
IGNORE = -100


# ---- A1: sequence log-probabilities -----------------------------------------------------------------------------
def _batch(seed: int, vocab: int = 128) -> tuple[LLM, torch.Tensor, torch.Tensor]:
    """A tiny model and 4 rows of 16 tokens labelled like SFT: -100 on a prompt of each row's own length and on right
    padding; row 0 has no prompt (its first label must still not count: nothing predicts it), row 3 no label."""
    seed_everything(seed)
    model = LLM(LLMconfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()
    input_ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(seed))
    labels = input_ids.clone()
    for row, (prompt, padding) in enumerate(((0, 0), (5, 2), (3, 6), (16, 0))):
        labels[row, :prompt] = IGNORE
        labels[row, 16 - padding:] = IGNORE
    return model, input_ids, labels


def _picked(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp[b, t, targets[b, t]], with -100 read as token 0 (masked by the caller, or not: one of the slips)."""
    return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]


def _summed(logp: torch.Tensor, labels: torch.Tensor, shift: int = 1, ignore: bool = True) -> torch.Tensor:
    """sum over t of logp[:, t, labels[:, t + shift]] (shift -1: the wrong way), -100 skipped unless `ignore` is
    False."""
    if shift == 1:
        logp, targets = logp[:, :-1], labels[:, 1:]
    elif shift == -1:
        logp, targets = logp[:, 1:], labels[:, :-1]
    else:
        targets = labels
    picked = _picked(logp, targets)
    return (picked * (targets != IGNORE)).sum(-1) if ignore else picked.sum(-1)


def _logprob_slips(logits: torch.Tensor, labels: torch.Tensor) -> Mistakes:
    logits = logits.detach().double()
    lp = logits.log_softmax(-1)
    right = _summed(lp, labels)
    counted = (labels[:, 1:] != IGNORE).sum(-1)
    T = labels.shape[1]
    mean = ("a mean, not a sum: log pi(y | x) = sum over the reply's tokens of log p(token | the tokens before it) - "
            "the probability of a sequence is the product of its tokens' probabilities")
    ignored = ("-100 labels are counted: they mark tokens that are not scored (the prompt, the padding); mask those "
               "positions out (labels != -100) after reading the others")
    return [
        ("no shift: logits[:, t] is the distribution of the NEXT token, so it scores labels[:, t + 1] - pair "
         "logits[:, :-1] with labels[:, 1:]", lambda: _summed(lp, labels, shift=0)),
        ("shifted the wrong way: logits[:, t] predicts labels[:, t + 1], so drop the LAST logit and the FIRST label "
         "(logits[:, :-1] with labels[:, 1:])", lambda: _summed(lp, labels, shift=-1)),
        (mean, lambda: right / counted),
        (mean, lambda: right / counted.clamp(min=1)),
        (mean, lambda: right / (T - 1)),
        (mean, lambda: right / T),
        (ignored, lambda: _summed(lp, labels, ignore=False)),
        (ignored, lambda: (lp[:, :-1].gather(-1, (labels[:, 1:] % lp.shape[-1])[..., None])[..., 0]).sum(-1)),
        ("softmax instead of log_softmax: that sums probabilities; log pi(y | x) is a sum of LOG-probabilities",
         lambda: _summed(logits.softmax(-1), labels)),
        ("the raw logits, not log-probabilities: normalise them with log_softmax over the vocabulary first",
         lambda: _summed(logits, labels)),
        ("log_softmax over the wrong dimension: it normalises over the sequence; the distribution of a token is over "
         "the vocabulary (dim=-1)", lambda: _summed(logits.log_softmax(1), labels)),
        ("the sign: that is the negative log-likelihood (a cross-entropy); a log-probability is <= 0",
         lambda: -right),
    ]


def _naive_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64, token by token: an independent formulation."""
    out = torch.zeros(labels.shape[0], dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE:
                out[b] += logits[b, t].double().log_softmax(-1)[labels[b, t + 1]]
    return out


def _call_logprob(run: NotebookRun, logits: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    __tracebackhide__ = True
    try:
        got = call(run, "sequence_logprob", logits, labels)
    except AssertionError as e:
        if "out of bounds" in str(e) or "index -100" in str(e):
            raise AssertionError(f"{e} -- -100 is not a token id: replace it by any valid id (labels.clamp(min=0)) to "
                                 "read the log-probabilities, then zero the positions it marks") from None
        raise
    if isinstance(got, torch.Tensor) and got.shape != labels.shape[:1]:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(labels.shape[:1])} - one "
                             "log-probability per sequence (sum over its tokens, not over the batch)")
    return got


def check_sequence_logprob(run: NotebookRun):
    for seed in (0, 1):
        model, input_ids, labels = _batch(seed)
        with torch.no_grad():
            package = sequence_logprobs(model, input_ids, labels)
            logits = model(input_ids).logits
        what = f"sequence_logprob(logits {tuple(logits.shape)}, labels), seed {seed}"
        leaf = logits.clone().requires_grad_()
        got = _call_logprob(run, leaf, labels, what)
        name_the_mistake(what, got, package, _logprob_slips(logits, labels), atol=1e-4)
        assert_close(got, package, f"{what} vs zer02llm.dpo.sequence_logprobs", atol=1e-4, rtol=1e-5)
        assert_close(got, _naive_logprob(logits, labels).float(), f"{what} vs a token-by-token loop", atol=1e-4,
                     rtol=1e-5)
        if not got.requires_grad:
            raise AssertionError(f"{what}: no gradient reaches the logits - the policy learns through these "
                                 "log-probabilities (no torch.no_grad(), .detach(), .item() or argmax inside)")
        (mine,) = torch.autograd.grad(got.sum(), leaf)
        reference = logits.clone().requires_grad_()
        (theirs,) = torch.autograd.grad(token_logprobs(reference, labels).sum(), reference)
        assert_close(mine, theirs, f"{what}: gradient with respect to the logits", atol=1e-6, rtol=1e-5)
    _check_bfloat16(run)


def _check_bfloat16(run: NotebookRun) -> None:
    """A model trained in bfloat16 returns bfloat16 logits: the answer must still be float32, from float32 math."""
    model, input_ids, labels = _batch(2)
    with torch.no_grad():
        logits = model(input_ids).logits.to(torch.bfloat16)
    what = "sequence_logprob(bfloat16 logits, labels)"
    got = _call_logprob(run, logits, labels, what)
    if not isinstance(got, torch.Tensor) or got.dtype != torch.float32:
        raise AssertionError(f"{what} returned {getattr(got, 'dtype', type(got).__name__)}: return float32 whatever "
                             "the logits' dtype (compute the log-softmax in float32)")
    want = _naive_logprob(logits, labels).float()
    if (got.detach() - want).abs().max() > 1e-3:
        raise AssertionError(f"{what}: max |yours - float32 computation| = {(got.detach() - want).abs().max():.3g} "
                             "- the log-softmax ran in bfloat16, which keeps about 3 significant digits (DPO then "
                             "subtracts such sums): cast the logits with .float() first")
    assert_close(got, want, what, atol=1e-4, rtol=1e-5)


# ---- A2: the DPO loss -------------------------------------------------------------------------------------------
def _logps(B: int, seed: int, spread: float) -> tuple[torch.Tensor, ...]:
    """Sequence log-probabilities (policy chosen, policy rejected, ref chosen, ref rejected), each (B,): the
    reference's anywhere in [-60, -5], the policy's `spread` nats around them (wide spreads: saturated sigmoids)."""
    g = torch.Generator().manual_seed(seed)
    ref_chosen, ref_rejected = (-5 - 55 * torch.rand(B, generator=g) for _ in range(2))
    return (ref_chosen + spread * torch.randn(B, generator=g), ref_rejected + spread * torch.randn(B, generator=g),
            ref_chosen, ref_rejected)


CASES = ((8, 0, 4.0, 0.1), (8, 1, 4.0, 0.5), (6, 2, 1.0, 2.0))  # (B, seed, spread, beta)
WIDE = (8, 3, 150.0, 1.0)  # margins of hundreds of nats


def _loss_slips(pc, pr, rc, rr, beta) -> Mistakes:
    pc, pr, rc, rr = (t.detach().double() for t in (pc, pr, rc, rr))
    z = (pc - rc) - (pr - rr)
    sign = ("the sign is flipped: that is -log sigma(-beta * margin) = -log(1 - sigma(beta * margin)), the loss of the "
            "REJECTED reply winning - chosen and rejected swapped, reference - policy instead of policy - reference, "
            "or 1 - sigma where sigma belongs; the observed preference y_w > y_l has likelihood sigma(r_w - r_l)")
    return [
        ("beta is missing: the implicit reward is beta * log(pi / pi_ref), so the margin inside the sigmoid is beta "
         "times the difference of the log-ratios", lambda: -F.logsigmoid(z)),
        ("beta multiplies the loss, outside the sigmoid: it scales the rewards, so it belongs inside, "
         "-log sigma(beta * margin)", lambda: -beta * F.logsigmoid(z)),
        ("beta divides the margin: the reward is beta * log(pi / pi_ref) (r = beta log(pi/pi_ref) + beta log Z, "
         "from the optimal policy pi = pi_ref exp(r / beta) / Z)", lambda: -F.logsigmoid(z / beta)),
        ("the reference terms are dropped: the implicit reward is beta * log(pi / pi_ref), so each log-probability "
         "is measured against the reference's (policy - reference)", lambda: -F.logsigmoid(beta * (pc - pr))),
        (sign, lambda: -F.logsigmoid(-beta * z)),
        ("the reference log-probabilities are crossed: ref_chosen goes with policy_chosen, ref_rejected with "
         "policy_rejected", lambda: -F.logsigmoid(beta * ((pc - rr) - (pr - rc)))),
        ("log sigma without its minus sign: minimising log sigma(beta * margin) pushes the rejected reply up; the "
         "loss is the NEGATIVE log-likelihood of the preference", lambda: F.logsigmoid(beta * z)),
        ("log(1 - sigma(...)): that is the log-likelihood of the rejected reply winning; the loss is "
         "-log sigma(beta * margin)", lambda: F.logsigmoid(-beta * z)),
        ("the likelihood, not its log: the loss is the negative LOG-likelihood -log sigma(beta * margin)",
         lambda: -torch.sigmoid(beta * z)),
        ("1 - sigma(...), not -log sigma(...): the loss is the negative log-likelihood of the preference",
         lambda: 1 - torch.sigmoid(beta * z)),
        ("the rejected reply is left out: Bradley-Terry compares the two replies' rewards, so the margin is the "
         "chosen reward minus the rejected one", lambda: -F.logsigmoid(beta * (pc - rc))),
        ("each reply's reward goes through its own sigmoid: Bradley-Terry compares the two rewards, one sigmoid of "
         "their difference", lambda: -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))),
    ]


def _reward_slips(pc, pr, rc, rr, beta) -> Mistakes:
    pc, pr, rc, rr = (t.detach().double() for t in (pc, pr, rc, rr))
    return [
        ("the rewards are not scaled by beta: the implicit reward is beta * (log pi - log pi_ref)",
         (pc - rc, pr - rr)),
        ("the rewards are divided by beta: the implicit reward is beta * (log pi - log pi_ref)",
         ((pc - rc) / beta, (pr - rr) / beta)),
        ("the rewards leave out the reference: the implicit reward is beta * (log pi - log pi_ref)",
         (beta * pc, beta * pr)),
        ("the rewards are swapped: return (loss, chosen rewards, rejected rewards)",
         (beta * (pr - rr), beta * (pc - rc))),
    ]


def _call_dpo(run: NotebookRun, name: str, logps: tuple[torch.Tensor, ...], *args, what: str):
    """The learner's loss on leaf copies of the four log-probabilities (for the gradients): (result, leaves)."""
    __tracebackhide__ = True
    leaves = [t.clone().requires_grad_() for t in logps]
    return call(run, name, *leaves, *args), leaves


def _per_pair(losses, B: int, what: str) -> None:
    __tracebackhide__ = True
    if isinstance(losses, torch.Tensor) and losses.shape != (B,):
        raise AssertionError(f"{what}: losses of shape {tuple(losses.shape)}, expected ({B},) - one loss per pair; "
                             "the caller takes the mean over the pairs (DPOObjective, TRL)")


def _finite(got: torch.Tensor, z: torch.Tensor, what: str) -> None:
    __tracebackhide__ = True
    if isinstance(got, torch.Tensor) and got.shape == z.shape and not torch.isfinite(got.detach()).all():
        where = z[~torch.isfinite(got.detach())][0].item()
        raise AssertionError(f"{what}: not finite where beta * margin is {where:.4g} - "
                             "in float32 torch.sigmoid(z) rounds to 0 once z < -104 (and 1 - sigmoid(z) once z > 17), "
                             "so log(sigmoid(z)) becomes log 0 = -inf: use F.logsigmoid(z) (= -softplus(-z)), which "
                             "never forms the sigmoid")


def _gradients(got: torch.Tensor, leaves: list[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum of the losses) / d(policy chosen, policy rejected): what trains the policy."""
    __tracebackhide__ = True
    grads = (torch.autograd.grad(got.sum(), leaves[:2], allow_unused=True, retain_graph=True) if got.requires_grad
             else (None, None))
    missing = [name for name, g in zip(("policy_chosen", "policy_rejected"), grads) if g is None]
    if missing:
        raise AssertionError(f"{what}: no gradient reaches {' and '.join(missing)} - the loss trains the policy, "
                             "pushing the chosen reply up and the rejected one down: keep it differentiable in both "
                             "of the policy's log-probabilities (no .detach(), .item() or torch.no_grad() there)")
    return grads


def _check_rewards(got: tuple, logps: tuple[torch.Tensor, ...], beta: float, what: str) -> None:
    __tracebackhide__ = True
    _, chosen, rejected = got
    _, want_chosen, want_rejected = dpo_loss(*logps, beta)
    name_the_mistake(f"{what}: rewards", (chosen, rejected), (want_chosen, want_rejected),
                     _reward_slips(*logps, beta))
    assert_close(chosen, want_chosen, f"{what}: chosen rewards vs zer02llm.dpo.dpo_loss")
    assert_close(rejected, want_rejected, f"{what}: rejected rewards vs zer02llm.dpo.dpo_loss")
    if chosen.requires_grad or rejected.requires_grad:
        raise AssertionError(f"{what}: the rewards carry gradients - detach them: they are for reading and logging "
                             "(reward margin, accuracy), and a reward with a graph would train the policy if it "
                             "reached a loss")


def check_dpo_loss(run: NotebookRun):
    for B, seed, spread, beta in (*CASES, WIDE):
        logps = _logps(B, seed, spread)
        what = f"dpo_loss on {B} pairs, beta={beta}" + (" (margins of hundreds of nats)" if spread > 100 else "")
        got, leaves = _call_dpo(run, "dpo_loss", logps, beta, what=what)
        if not (isinstance(got, tuple) and len(got) == 3):
            raise AssertionError(f"{what} should return a tuple (losses, chosen_rewards, rejected_rewards), got "
                                 f"{type(got).__name__}")
        losses = got[0]
        _per_pair(losses, B, what)
        want = dpo_loss(*logps, beta)[0]
        _finite(losses, beta * ((logps[0] - logps[2]) - (logps[1] - logps[3])), what)
        name_the_mistake(what, losses, want, _loss_slips(*logps, beta))
        assert_close(losses, want, f"{what} vs zer02llm.dpo.dpo_loss")
        mine = _gradients(losses, leaves, what)
        package_leaves = [t.clone().requires_grad_() for t in logps]
        theirs = torch.autograd.grad(dpo_loss(*package_leaves, beta)[0].sum(), package_leaves[:2])
        for name, m, t in zip(("policy_chosen", "policy_rejected"), mine, theirs):
            assert_close(m, t, f"{what}: gradient with respect to {name} vs zer02llm.dpo.dpo_loss", atol=1e-6)
        _check_rewards(got, logps, beta, what)
        if seed in (0, 3):
            _against_trl(got, leaves, logps, beta, "sigmoid", 0.0, what)


# ---- TRL: its DPOTrainer's loss on given sequence log-probabilities ---------------------------------------------
class _FixedLogprobs(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: per-token log-probabilities (2B, 1), one "token" per sequence whose
    log-probability is the sequence's."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, input_ids, labels=None, **kw):
        zeros = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@functools.lru_cache(maxsize=None)
def _trl_trainer(loss_type: str, beta: float, label_smoothing: float):
    """A DPOTrainer over a tiny exported model (the stand-ins replace its models' outputs): float32, on the CPU."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    from zer02llm.hf import export_hf
    from zer02llm.tokenizer import load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tok = load_tokenizer()
    seed_everything(0)
    model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32))
    user, reply = ({"role": role, "content": text} for role, text in (("user", "Hi?"), ("assistant", "Hello.")))
    train = datasets.Dataset.from_list([{"prompt": [user], "chosen": [reply],
                                         "rejected": [{"role": "assistant", "content": "No."}]}])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(model, f"{tmp}/model", tokenizer=tok)
        args = DPOConfig(output_dir=f"{tmp}/out", beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                         bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, seed=0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/model")
        trainer = DPOTrainer(model=hf, ref_model=transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/model"),
                             args=args, train_dataset=train,
                             processing_class=transformers.AutoTokenizer.from_pretrained(f"{tmp}/model"))
    trainer.model.train()
    return trainer


def _trl(logps: tuple[torch.Tensor, ...], beta: float, loss_type: str, label_smoothing: float):
    """TRL's mean loss over the pairs, its gradient with respect to the policy's (chosen, rejected) log-probabilities,
    and the metrics it logged."""
    trainer = _trl_trainer(loss_type, float(beta), float(label_smoothing))
    pc, pr, rc, rr = logps
    policy = torch.cat([pc, pr])[:, None].clone().requires_grad_()
    ones = torch.ones(len(policy), 2, dtype=torch.long)
    trainer.ref_model = _FixedLogprobs(torch.cat([rc, rr])[:, None])
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": ones}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 on TRL's gradient-checkpointing calls
        loss = trainer._compute_loss(_FixedLogprobs(policy), inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad[:, 0].chunk(2), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _against_trl(got, leaves, logps, beta: float, loss_type: str, label_smoothing: float, what: str) -> None:
    __tracebackhide__ = True
    losses = got[0] if isinstance(got, tuple) else got
    theirs, their_grads, metrics = _trl(logps, beta, loss_type, label_smoothing)
    trl = f"TRL's DPOTrainer (loss_type={loss_type!r}" + (f", label_smoothing={label_smoothing})" if label_smoothing
                                                          else ")")
    assert_close(losses.mean(), theirs, f"{what}: mean over the pairs vs {trl}", atol=1e-6)
    mine = torch.autograd.grad(losses.mean(), leaves[:2])
    for name, m, t in zip(("policy_chosen", "policy_rejected"), mine, their_grads):
        assert_close(m, t, f"{what}: gradient of the mean with respect to {name} vs {trl}", atol=1e-7)
    if isinstance(got, tuple):
        for i, key in ((1, "rewards/chosen"), (2, "rewards/rejected")):
            assert_close(got[i].mean(), torch.tensor(metrics[key]), f"{what}: mean {key} vs {trl}'s logged {key}",
                         atol=1e-5)
        margins = (got[1] - got[2]).mean()
        assert_close(margins, torch.tensor(metrics["rewards/margins"]), f"{what}: mean reward margin vs {trl}",
                     atol=1e-5)


# ---- B1: robust DPO ---------------------------------------------------------------------------------------------
ROBUST_CASES = ((8, 4, 4.0, 0.1, 0.1), (8, 5, 2.0, 0.5, 0.3), (6, 6, 150.0, 1.0, 0.2))  # (..., beta, eps)


def _robust_slips(logps: tuple[torch.Tensor, ...], beta: float, eps: float) -> Mistakes:
    pc, pr, rc, rr = logps
    clean, flipped = dpo_loss(*logps, beta)[0], dpo_loss(pr, pc, rr, rc, beta)[0]
    return [
        ("that is conservative DPO (label smoothing): (1 - eps) * loss + eps * loss of the swapped pair averages "
         "the loss over which order is true, a smoothed objective whose expectation under the noise is not the "
         "clean loss; the robust loss is the one whose expectation is - solve the two equations for it",
         lambda: (1 - eps) * clean + eps * flipped),
        ("the 1 / (1 - 2 eps) is missing: without it the expectation under the noise is (1 - 2 eps) times the clean "
         "loss, not the clean loss", lambda: (1 - eps) * clean - eps * flipped),
        ("eps and 1 - eps are exchanged: the observed label is right with probability 1 - eps, so its own loss gets "
         "the weight 1 - eps", lambda: (eps * clean - (1 - eps) * flipped) / (1 - 2 * eps)),
        ("that is the plain DPO loss: it ignores eps", lambda: clean),
    ]


def check_robust_dpo_loss(run: NotebookRun):
    for B, seed, spread, beta, eps in ROBUST_CASES:
        logps = _logps(B, seed, spread)
        what = f"robust_dpo_loss on {B} pairs, beta={beta}, eps={eps}"
        got, leaves = _call_dpo(run, "robust_dpo_loss", logps, beta, eps, what=what)
        _per_pair(got, B, what)
        pc, pr, rc, rr = logps
        clean, flipped = dpo_loss(*logps, beta)[0], dpo_loss(pr, pc, rr, rc, beta)[0]
        want = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
        _finite(got, beta * ((pc - rc) - (pr - rr)), what)
        name_the_mistake(what, got, want, _robust_slips(logps, beta, eps))
        assert_close(got, want, f"{what} vs the unbiased estimator written out", atol=1e-5)
        _gradients(got, leaves, what)
        swapped = call(run, "robust_dpo_loss", pr, pc, rr, rc, beta, eps)
        expected = (1 - eps) * got.detach() + eps * swapped.detach()
        assert_close(expected, clean, f"{what}: its expectation when each label is flipped with probability eps vs "
                                      "the clean DPO loss (zer02llm.dpo.dpo_loss)", atol=1e-4)
        _against_trl(got, leaves, logps, beta, "robust", eps, what)
    zero = call(run, "robust_dpo_loss", *_logps(4, 7, 4.0), 0.1, 0.0)
    assert_close(zero, dpo_loss(*_logps(4, 7, 4.0), 0.1)[0], "robust_dpo_loss with eps=0 vs the DPO loss")
