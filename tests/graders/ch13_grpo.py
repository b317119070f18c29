"""Grader for solutions|exercises/13_grpo_exercises.ipynb.

Part A (build it): group-relative advantages, compared with `zer02llm.grpo.group_advantages` and a naive loop; the
clipped surrogate objective, compared with `zer02llm.grpo.grpo_token_loss` (kl_beta=0) and a naive loop, its gradient
with respect to the log-probabilities included.
Part B (beyond the chapter): the k3 KL estimator (against the package's KL term and a loop, gradient included), the
exact KL over a vocabulary (against `torch.distributions` and `F.kl_div`), and the Monte Carlo mean of k3, which must
land within 5 standard errors of the exact KL (fixed seeds).
When an answer is wrong and equals what a usual slip gives (biased std, max for min, the ratio upside down, the KL the
wrong way round...), the message names the slip.
"""
import math

import torch
import torch.nn.functional as F

from grading import Mistakes, NotebookRun, assert_close, call, name_the_mistake
from zer02llm.grpo import group_advantages, grpo_token_loss

NOTEBOOK = "13_grpo_exercises.ipynb"
EPS = 1e-4


# ---- A1: group advantages ---------------------------------------------------------------------------------------
def _rewards(B: int, G: int, seed: int, binary: bool) -> torch.Tensor:
    """(B, G) float32 rewards: 0/1 verdicts (row 0 all equal: a group without signal) or continuous scores."""
    g = torch.Generator().manual_seed(seed)
    if binary:
        r = (torch.rand(B, G, generator=g) < 0.4).float()
        r[0] = 1.0 if seed % 2 else 0.0
        if B > 1 and G > 1:
            r[1] = 0.0
            r[1, 0] = 1.0  # a lone right answer
        return r
    return torch.randn(B, G, generator=g) * 2 + 1


ADV_CASES = ((5, 8, 0, True), (4, 6, 1, True), (3, 5, 2, False), (1, 7, 3, False), (6, 1, 4, True),
             (3, 1, 5, False))


def _naive_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """float64, row by row, the formula written out."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for b, row in enumerate(rewards.tolist()):
        G = len(row)
        if G == 1:
            out[b, 0] = row[0]
            continue
        mean = sum(row) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (G - 1))
        for i, r in enumerate(row):
            out[b, i] = (r - mean) / (std + EPS) if scale else r - mean
    return out


def _advantage_slips(rewards: torch.Tensor, scale: bool) -> Mistakes:
    r = rewards.double()
    centred = r - r.mean(-1, keepdim=True)
    wrong_axis = ("statistics over the wrong axis: each row is one question's group, so the mean (and std) is taken "
                  "along the row (dim=-1, keepdim=True) - a baseline from other questions is not what this reply's "
                  "siblings got")
    of_one = ("a group of one has no siblings to compare with (its mean is itself, its unbiased std 0 / 0 = nan): "
              "return the rewards themselves (REINFORCE)")
    slips = [
        (wrong_axis, lambda: (r - r.mean(0, keepdim=True)) / (r.std(0, keepdim=True) + EPS) if scale
         else r - r.mean(0, keepdim=True)),
        (wrong_axis, lambda: (r - r.mean()) / (r.std() + EPS) if scale else r - r.mean()),
        (wrong_axis, lambda: centred / (r.std() + EPS)),
        (wrong_axis, lambda: centred / (r.std(0, keepdim=True) + EPS)),
    ]
    if r.shape[-1] == 1:
        return [(of_one, lambda: torch.zeros_like(r)), (of_one, lambda: torch.full_like(r, float("nan"))), *slips]
    if not scale:
        return [*slips, ("scale=False means no division by the std (Dr. GRPO): return the centred rewards "
                         "r - mean", lambda: centred / (r.std(-1, keepdim=True) + EPS)),
                ("the rewards are not centred: the advantage is the reward minus the group's mean (the baseline)",
                 lambda: r)]
    return [
        *slips,
        ("the biased std (dividing by G): GRPO uses the unbiased one, dividing by G - 1 (torch.std's default, as "
         "TRL)", lambda: centred / (r.std(-1, unbiased=False, keepdim=True) + EPS)),
        ("no eps in the denominator: a group whose rewards are all equal has std 0, and 0 / 0 = nan - add 1e-4 to "
         "the std", lambda: centred / r.std(-1, keepdim=True)),
        ("eps added to the variance, not to the std: divide by std + 1e-4",
         lambda: centred / (r.var(-1, keepdim=True) + EPS).sqrt()),
        ("the rewards are not centred: the advantage is the reward minus the group's mean (the baseline), then "
         "divided by the std", lambda: r / (r.std(-1, keepdim=True) + EPS)),
        ("not divided by the std: with scale=True the centred rewards are divided by the group's std + 1e-4",
         lambda: centred),
    ]


def check_group_advantages(run: NotebookRun):
    for B, G, seed, binary in ADV_CASES:
        rewards = _rewards(B, G, seed, binary)
        for scale in (True, False):
            what = f"group_advantages(rewards {B}x{G}, scale={scale})" + (" (groups of one)" if G == 1 else "")
            got = call(run, "group_advantages", rewards.clone(), scale=scale)
            want = group_advantages(rewards, scale)
            if isinstance(got, torch.Tensor) and got.shape != rewards.shape:
                raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(rewards.shape)} - one "
                                     "advantage per sample, in the rewards' layout (keepdim=True keeps the group "
                                     "axis for the broadcast)")
            name_the_mistake(what, got, want, _advantage_slips(rewards, scale))
            assert_close(got, want, f"{what} vs zer02llm.grpo.group_advantages", atol=1e-5)
            assert_close(got, _naive_advantages(rewards, scale).float(), f"{what} vs a loop over each group",
                         atol=1e-5)


# ---- A2: the clipped objective ----------------------------------------------------------------------------------
def _logps(N: int, T: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, old_logps, advantages): old log-probabilities in [-6, -0.01], the policy `spread` nats around them
    (ratios well inside and outside the clip range), advantages of both signs and one zero."""
    g = torch.Generator().manual_seed(seed)
    old = -0.01 - 6 * torch.rand(N, T, generator=g)
    new = (old + spread * torch.randn(N, T, generator=g)).clamp(max=0.0)
    advantages = torch.randn(N, generator=g) * 1.5
    advantages[-1] = 0.0
    return new, old, advantages


# (N, T, seed, spread, eps); the square case first: there advantages (1, N) broadcast silently, and are named
CLIP_CASES = ((5, 5, 1, 0.3, 0.1), (6, 10, 0, 0.4, 0.2), (4, 7, 2, 0.05, 0.2))


def _clip_slips(logps, old, advantages, eps) -> Mistakes:
    new, old = logps.detach().double(), old.double()
    a = advantages.double().unsqueeze(-1)
    ratio = torch.exp(new - old)

    def surrogate(rho, adv=a):
        return -torch.min(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)

    clip_a = ("clipped the advantage (or the product ratio * A) instead of the ratio: the clip bounds how far the "
              "policy's probability moved, clip(ratio, 1 - eps, 1 + eps) * A")
    return [
        ("max instead of min: PPO takes the smaller (pessimistic) of the two terms, so a step gains nothing from "
         "moving a probability beyond the clip range; the max rewards exactly that",
         lambda: -torch.max(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)),
        (clip_a, lambda: -torch.min(ratio * a, ratio * a.clamp(1 - eps, 1 + eps))),
        (clip_a, lambda: -torch.min(ratio * a, a.clamp(1 - eps, 1 + eps))),
        (clip_a, lambda: -torch.min(ratio * a, (ratio * a).clamp(1 - eps, 1 + eps))),
        ("the ratio is upside down (old / new): rho = pi_theta / pi_old = exp(logps - old_logps)",
         lambda: surrogate(torch.exp(old - new))),
        ("the minus sign is missing: the objective is maximised, so the loss to minimise is its negative",
         lambda: -surrogate(ratio)),
        ("clipped without the min: -clip(ratio) * A alone drops PPO's pessimism - where the policy moved the wrong "
         "way (A > 0 and the ratio below 1 - eps, or A < 0 and above 1 + eps) the unclipped term is the smaller one, "
         "and its full gradient must pull the policy back", lambda: -ratio.clamp(1 - eps, 1 + eps) * a),
        ("the log-ratio, not the ratio: rho = exp(logps - old_logps)", lambda: surrogate(new - old)),
        ("a ratio of log-probabilities: the ratio of probabilities is exp(logps - old_logps), not logps / old_logps",
         lambda: surrogate(new / old)),
    ] + ([("the advantages broadcast over the wrong axis: advantages[i] belongs to every token of reply i, "
           "advantages.unsqueeze(-1) (N, 1), not advantages (1, N)", lambda: surrogate(ratio, a.T))]
         if new.shape[0] == new.shape[1] else [])


def _naive_clip(logps, old, advantages, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loop: the loss and its derivative by hand (-A * ratio where the unclipped term is the minimum, else
    0)."""
    loss, grad = (torch.zeros(logps.shape, dtype=torch.float64) for _ in range(2))
    for i in range(logps.shape[0]):
        a = float(advantages[i])
        for t in range(logps.shape[1]):
            rho = math.exp(float(logps[i, t]) - float(old[i, t]))
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            loss[i, t] = -min(unclipped, clipped)
            grad[i, t] = -a * rho if unclipped <= clipped else 0.0
    return loss, grad


def check_clipped_objective(run: NotebookRun):
    for N, T, seed, spread, eps in CLIP_CASES:
        logps, old, advantages = _logps(N, T, seed, spread)
        what = f"clipped_objective(logps {N}x{T}, old_logps, advantages ({N},), clip_eps={eps})"
        leaf = logps.clone().requires_grad_()
        got = call(run, "clipped_objective", leaf, old.clone(), advantages.clone(), eps)
        if isinstance(got, torch.Tensor) and got.shape != logps.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(logps.shape)} - one loss per "
                                 "token (the reduction over a reply's tokens comes later), the advantage of reply i "
                                 "shared by its tokens: advantages.unsqueeze(-1)")
        want = grpo_token_loss(logps, old, None, advantages, clip_eps=eps, kl_beta=0.0)
        name_the_mistake(what, got, want, _clip_slips(logps, old, advantages, eps))
        assert_close(got, want, f"{what} vs zer02llm.grpo.grpo_token_loss(kl_beta=0)", atol=1e-5)
        naive_loss, naive_grad = _naive_clip(logps, old, advantages, eps)
        assert_close(got, naive_loss.float(), f"{what} vs a token-by-token loop", atol=1e-5)
        if not got.requires_grad:
            raise AssertionError(f"{what}: no gradient reaches logps - the policy learns through the ratio (no "
                                 "torch.no_grad(), .detach() or .item() on it)")
        (mine,) = torch.autograd.grad(got.sum(), leaf)
        reference = logps.clone().requires_grad_()
        (theirs,) = torch.autograd.grad(grpo_token_loss(reference, old, None, advantages, eps).sum(), reference)
        assert_close(mine, theirs, f"{what}: gradient with respect to logps vs zer02llm.grpo.grpo_token_loss",
                     atol=1e-5)
        assert_close(mine, naive_grad.float(), f"{what}: gradient with respect to logps vs the derivative by hand "
                                               "(-A * ratio where the unclipped term is the minimum, else 0)",
                     atol=1e-5)


# ---- B1: the k3 estimator, the exact KL, and the Monte Carlo mean -----------------------------------------------
def _k3_slips(logps: torch.Tensor, ref: torch.Tensor) -> Mistakes:
    d = (ref - logps.detach()).double()
    return [
        ("that is k1 = log pi - log pi_ref: unbiased, but negative for many samples and noisy; k3 adds "
         "e^delta - 1, whose expectation is 0, with delta = ref_logps - logps", lambda: -d),
        ("that is -k1 = log pi_ref - log pi (and the sign too): k3 = e^delta - delta - 1", lambda: d),
        ("that is k2 = delta^2 / 2, which is biased: k3 = e^delta - delta - 1", lambda: d**2 / 2),
        ("delta the wrong way round: delta = ref_logps - logps = log(pi_ref / pi); built on log(pi / pi_ref) the "
         "estimate's expectation under samples from pi is not KL(pi || pi_ref)", lambda: torch.exp(-d) + d - 1),
        ("the - 1 is missing: E[e^delta] = 1 under samples from pi, so without it the estimate is off by one",
         lambda: torch.exp(d) - d),
        ("the - delta term is missing: e^delta - 1 has expectation 0; k3 = e^delta - delta - 1",
         lambda: torch.exp(d) - 1),
        ("the sign of the delta term: k3 = e^delta - delta - 1", lambda: torch.exp(d) + d - 1),
    ]


def _naive_k3(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(logps.numel(), dtype=torch.float64)
    for i, (lp, lr) in enumerate(zip(logps.flatten().tolist(), ref.flatten().tolist())):
        out[i] = math.exp(lr - lp) - (lr - lp) - 1
    return out.view(logps.shape)


def _k3_inputs(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -0.01 - 5 * torch.rand(shape, generator=g)
    return logps, (logps + 0.8 * torch.randn(shape, generator=g)).clamp(max=0.0)


def check_k3_kl(run: NotebookRun):
    for shape, seed in (((6, 9), 0), ((40,), 1), ((2, 3, 5), 2)):
        logps, ref = _k3_inputs(shape, seed)
        what = f"k3_kl(logps {tuple(shape)}, ref_logps)"
        leaf = logps.clone().requires_grad_()
        got = call(run, "k3_kl", leaf, ref.clone())
        if isinstance(got, torch.Tensor) and got.shape != logps.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(logps.shape)} - one estimate per "
                                 "sampled token, elementwise (the mean comes later)")
        # with zero advantages the loss is its KL term alone: beta * k3
        want = grpo_token_loss(logps, logps, ref, torch.zeros(shape[:-1]), kl_beta=1.0)
        name_the_mistake(what, got, want, _k3_slips(logps, ref))
        assert_close(got, want, f"{what} vs the KL term of zer02llm.grpo.grpo_token_loss", atol=1e-5)
        assert_close(got, _naive_k3(logps, ref).float(), f"{what} vs an element-by-element loop", atol=1e-5)
        if not got.requires_grad:
            raise AssertionError(f"{what}: no gradient reaches logps - the KL penalty pulls the policy back towards "
                                 "the reference through it")
        (mine,) = torch.autograd.grad(got.sum(), leaf)
        assert_close(mine, 1 - torch.exp(ref - logps), f"{what}: gradient with respect to logps vs "
                                                        "d k3 / d logps = 1 - e^delta", atol=1e-5)


def _kl_slips(logits: torch.Tensor, ref_logits: torch.Tensor) -> Mistakes:
    lp, lq = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    return [
        ("the KL the wrong way round: that is KL(pi_ref || pi); GRPO penalises KL(pi || pi_ref), the expectation "
         "under the policy's own samples, sum over v of pi(v) log(pi(v) / pi_ref(v))", lambda: (q * (lq - lp)).sum(-1)),
        ("the raw logits, not log-probabilities: normalise each with log_softmax over the vocabulary first",
         lambda: (p * (logits.double() - ref_logits.double())).sum(-1)),
        ("softmax over the wrong dimension: each distribution is over the vocabulary, the last dimension (dim=-1)",
         lambda: (logits.double().softmax(0) * (logits.double().log_softmax(0) - ref_logits.double().log_softmax(0)))
         .sum(-1)),
        ("a mean over the vocabulary, not a sum: KL = sum over v of pi(v) log(pi(v) / pi_ref(v))",
         lambda: (p * (lp - lq)).mean(-1)),
        ("the log-ratios are not weighted by pi: KL is their expectation under pi, sum over v of pi(v) * log-ratio",
         lambda: (lp - lq).sum(-1)),
    ]


def check_exact_kl(run: NotebookRun):
    for shape, seed, scale in (((4, 11), 0, 1.0), ((3, 2, 7), 1, 2.0), ((16,), 2, 0.5)):
        g = torch.Generator().manual_seed(seed)
        logits, ref_logits = (torch.randn(shape, generator=g) * scale + 3 * i for i in range(2))  # shifted logits
        what = f"exact_kl(logits {tuple(shape)}, ref_logits)"
        got = call(run, "exact_kl", logits.clone(), ref_logits.clone())
        if isinstance(got, torch.Tensor) and got.shape != shape[:-1]:
            raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(shape[:-1])} - one KL per "
                                 "distribution: sum over the vocabulary, the last dimension")
        want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                                 torch.distributions.Categorical(logits=ref_logits))
        name_the_mistake(what, got, want, _kl_slips(logits, ref_logits))
        assert_close(got, want, f"{what} vs torch.distributions.kl_divergence of two Categoricals", atol=1e-5)
        theirs = F.kl_div(ref_logits.log_softmax(-1), logits.log_softmax(-1), reduction="none", log_target=True)
        assert_close(got, theirs.sum(-1), f"{what} vs F.kl_div(ref log-probs, log-probs, log_target=True).sum(-1)",
                     atol=1e-5)


N_SAMPLES = 200_000
MC_CASES = ((0, 1.0), (1, 0.5))  # (seed of the distributions, logit scale): KL about 0.82 and 0.11 over 8 tokens


def _mean_and_width(weights: torch.Tensor, k: torch.Tensor, n: int) -> tuple[float, float]:
    """E[k] under `weights`, and 5 standard errors of the mean of n samples of k."""
    mean = float((weights * k).sum())
    return mean, 5 * math.sqrt(max(float((weights * k**2).sum()) - mean**2, 0.0) / n)


def _mc(run: NotebookRun, logits: torch.Tensor, ref_logits: torch.Tensor, seed: int, what: str) -> float:
    __tracebackhide__ = True
    got = call(run, "k3_monte_carlo", logits.clone(), ref_logits.clone(), N_SAMPLES,
               torch.Generator().manual_seed(seed))
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise AssertionError(f"{what}: expected a 0-dimensional tensor (the mean over the samples), got "
                             f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    return float(got)


def check_k3_monte_carlo(run: NotebookRun):
    for seed, scale in MC_CASES:
        g = torch.Generator().manual_seed(seed)
        logits, ref_logits = torch.randn(8, generator=g) * scale, torch.randn(8, generator=g) * scale
        lp, lq = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
        delta = lq - lp
        k3 = torch.exp(delta) - delta - 1
        kl, tol = _mean_and_width(lp.exp(), k3, N_SAMPLES)
        what = f"k3_monte_carlo(logits (8,), ref_logits, n_samples={N_SAMPLES:,}, generator seeded 0)"
        est = _mc(run, logits, ref_logits, 0, what)
        if est != _mc(run, logits, ref_logits, 0, what):
            raise AssertionError(f"{what}: two calls with generators of the same seed gave different results - draw "
                                 "the samples with the generator passed in (torch.multinomial(..., generator=...))")
        where = (f"{what} = {est:.4f}, the exact KL is {kl:.4f} (allowed: within 5 standard errors of the mean, "
                 f"{tol:.4f})")
        if abs(est - kl) <= tol:
            continue
        uniform = torch.full_like(k3, 1 / len(k3))
        slips = (("the tokens are drawn from the reference: k3 is unbiased for KL(pi || pi_ref) under samples from "
                  "pi = softmax(logits)", *_mean_and_width(lq.exp(), k3, N_SAMPLES)),
                 ("the tokens are drawn uniformly over the vocabulary: k3 is unbiased under samples from "
                  "pi = softmax(logits) (torch.multinomial(probs, n, replacement=True, generator=generator))",
                  *_mean_and_width(uniform, k3, N_SAMPLES)),
                 ("that is the sum over the samples, not their mean", kl * N_SAMPLES, tol * N_SAMPLES))
        for slip, value, width in slips:
            if abs(est - value) <= width:
                raise AssertionError(f"{where}: {slip}")
        raise AssertionError(f"{where} - draw n_samples tokens from softmax(logits) with the given generator and "
                             "average k3_kl at them")
