"""Grader for solutions|exercises/08_pretrain_exercises.ipynb.

Part A (build it): AdamW against torch.optim.AdamW, the warmup + cosine schedule against get_lr and torch's
schedulers, one accumulated training step against the big batch's gradient and Trainer.train_step. Part B: exact
accumulation from mean losses, the LR range test, WSD. For the usual mistakes the message names the mistake: the
grader recomputes the wrong variant and says which one the learner's numbers match.
"""
import copy
import math
from typing import Callable

import torch

from grading import NotebookRun, assert_close, call
from zer02llm.config import LLMconfig
from zer02llm.model import LLM
from zer02llm.trainer import TrainConfig, Trainer, configure_optimizer, get_lr
from zer02llm.utils import seed_everything

NOTEBOOK = "08_pretrain_exercises.ipynb"


def _model(seed=0):
    seed_everything(seed)
    return LLM(LLMconfig(vocab_size=30, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=12))


def _micro_batches():
    """Fine-tuning-like micro-batches: different numbers of rows and of labelled tokens (33, 3, 12, 0)."""
    g = torch.Generator().manual_seed(5)
    batches = []
    for rows, real in ((3, 12), (1, 4), (2, 7), (2, 1)):  # the last one counts no token at all
        x = torch.randint(1, 30, (rows, 12), generator=g)
        y = x.clone()
        y[:, real:] = -100
        batches.append((x, y))
    return batches


# ---- A1: AdamW ---------------------------------------------------------------------------------------------------
# (lr per step, betas, eps, weight decay, gradient scale per tensor): the second case makes eps matter (gradients of
# 1e-3 .. 1e-2 against eps = 1e-2), the first is the chapter's setting.
_ADAMW_CASES = (
    ([1e-2, 3e-2, 2e-2, 5e-3, 1e-2, 4e-2], (0.9, 0.95), 1e-8, 0.1, (1.0, 0.1, 3.0)),
    ([5e-2, 1e-2, 2e-2, 3e-2], (0.8, 0.99), 1e-2, 0.5, (1e-2, 1e-3, 3e-3)),
)

_ADAMW_MISTAKES = {
    "no_bias_correction": "it skips the bias correction. m and v start at 0, so after t steps they hold only "
                          "1 - beta^t of the gradient's scale: divide m by 1 - beta1^t and v by 1 - beta2^t "
                          "(t = 1 at the first step), or the first steps are off by (1 - beta1^t) / sqrt(1 - beta2^t)",
    "l2_decay": "it adds weight_decay * param to the gradient (L2 regularisation: that is Adam, not AdamW). The "
                "decay then goes through m and v and is divided by sqrt(v_hat), so weights with large gradients are "
                "hardly decayed at all. AdamW decays decoupled from the gradient: param -= lr * weight_decay * param",
    "eps_inside": "it puts eps inside the square root, sqrt(v_hat + eps): that floors the denominator at sqrt(eps), "
                  "far above eps (1e-4 for eps = 1e-8), and shrinks the steps of parameters with small gradients. "
                  "AdamW (the paper and torch) adds it outside: sqrt(v_hat) + eps",
    "no_decay": "the weights are not decayed: apply param -= lr * weight_decay * param at every step",
    "decay_after": "it decays the weights after the Adam step; AdamW decays the weights as they were before the step "
                   "(torch: param *= 1 - lr * weight_decay first, then the Adam update)",
    "decay_without_lr": "the decay is not scaled by the learning rate: param -= lr * weight_decay * param (the "
                        "schedule lowers the decay together with the step size)",
}


def _adamw_reference(params, grads_per_step, lrs, betas, eps, wd, mistake=None):
    """The AdamW trajectory in float64, exact or with one named mistake; a list (per step) of lists of tensors."""
    b1, b2 = betas
    ps = [p.double().clone() for p in params]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    out = []
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), 1):
        for p, g, m, v in zip(ps, grads, ms, vs):
            g = g.double()
            if mistake == "l2_decay":
                g = g + wd * p
            elif mistake == "decay_without_lr":
                p -= wd * p
            elif mistake not in ("no_decay", "decay_after"):
                p -= lr * wd * p
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat, v_hat = (m, v) if mistake == "no_bias_correction" else (m / (1 - b1 ** t), v / (1 - b2 ** t))
            denom = (v_hat + eps).sqrt() if mistake == "eps_inside" else v_hat.sqrt() + eps
            p -= lr * m_hat / denom
            if mistake == "decay_after":
                p -= lr * wd * p
        out.append([p.clone() for p in ps])
    return out


def _adamw_case(lrs, scales, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ((4, 3), (5,), (2, 2, 3))
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * c for s, c in zip(shapes, scales)] for _ in lrs]
    return params, grads


def check_adamw_step(run: NotebookRun):
    for case, (lrs, betas, eps, wd, scales) in enumerate(_ADAMW_CASES):
        params, grads = _adamw_case(lrs, scales, seed=case)
        # torch's own AdamW, step by step, on copies of the same weights and gradients
        ref = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(ref, lr=lrs[0], betas=betas, eps=eps, weight_decay=wd)
        want = []
        for step_grads, lr in zip(grads, lrs):
            for p, g in zip(ref, step_grads):
                p.grad = g.clone()
            opt.param_groups[0]["lr"] = lr
            opt.step()
            want.append([p.detach().clone() for p in ref])
        # the learner's, one tensor at a time
        mine, states = [p.clone() for p in params], [{} for _ in params]
        got = []
        for step_grads, lr in zip(grads, lrs):
            for p, g, state in zip(mine, step_grads, states):
                call(run, "adamw_step", p, g.clone(), state, lr, betas=betas, eps=eps, weight_decay=wd)
            got.append([p.clone() for p in mine])
        if all(torch.equal(a, b) for a, b in zip(got[0], params)):
            raise AssertionError("adamw_step did not change `param`: update it in place (param.sub_(...), "
                                 "param.mul_(...)), it returns nothing")
        setting = f"lr {lrs}, betas {betas}, eps {eps}, weight_decay {wd}"
        for t, (got_t, want_t) in enumerate(zip(got, want), 1):
            worst = max((a - b).abs().max().item() for a, b in zip(got_t, want_t))
            if not all(torch.allclose(a, b, atol=1e-6, rtol=1e-6) for a, b in zip(got_t, want_t)):  # also NaN
                for name, why in _ADAMW_MISTAKES.items():
                    wrong = _adamw_reference(params, grads, lrs, betas, eps, wd, mistake=name)
                    if all(torch.allclose(a.double(), b, atol=1e-6, rtol=1e-5) for step_a, step_b in zip(got, wrong)
                           for a, b in zip(step_a, step_b)):
                        raise AssertionError(f"adamw_step ({setting}): after step {t}, max |ours - torch.optim.AdamW| "
                                             f"= {worst:.3g}: {why}")
                for i, (a, b) in enumerate(zip(got_t, want_t)):
                    assert_close(a, b, f"adamw_step ({setting}): tensor {i} of shape {tuple(b.shape)} after step {t} "
                                       "(compared with torch.optim.AdamW)", atol=1e-6, rtol=1e-6)


# ---- A2: warmup + cosine ----------------------------------------------------------------------------------------
def _torch_schedule(total, max_lr, warmup, ratio):
    """The same schedule from torch's schedulers: LinearLR over the warmup, CosineAnnealingLR after it."""
    rates = []
    phases = []
    if warmup:
        phases.append((warmup, lambda o: torch.optim.lr_scheduler.LinearLR(
            o, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))))
    phases.append((total - warmup, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=total - warmup, eta_min=max_lr * ratio)))
    for steps, make in phases:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
        sched = make(opt)
        for _ in range(steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return rates + [max_lr * ratio] * 3  # flat after the last step


def _schedule_mistakes(total, max_lr, warmup, ratio) -> dict[str, Callable[[int], float]]:
    lo = max_lr * ratio

    def cosine(step, start, length, floor):
        return floor + 0.5 * (max_lr - floor) * (1 + math.cos(math.pi * (step - start) / max(1, length)))

    def make(warm, start, length, floor, flat=True):
        return lambda s: warm(s) if s < warmup else (floor if flat and s >= total else cosine(s, start, length, floor))

    right = lambda s: max_lr * (s + 1) / warmup  # noqa: E731
    return {
        "warmup off by one: max_lr * step / warmup_iters gives step 0 a rate of 0 (a wasted step) and reaches "
        "max_lr only after the warmup. Step s of the warmup needs (s + 1) / warmup_iters of max_lr":
            make(lambda s: max_lr * s / warmup, warmup, total - warmup, lo),
        "warmup off by one: (s + 1) / (warmup_iters + 1) never reaches max_lr during the warmup; step "
        "warmup_iters - 1 must be at max_lr":
            make(lambda s: max_lr * (s + 1) / (warmup + 1), warmup, total - warmup, lo),
        "the cosine is measured from step 0 over total_steps, so after the warmup it starts below max_lr; it "
        "must start at step warmup_iters, at max_lr, and last the total_steps - warmup_iters steps after it":
            make(right, 0, total, lo),
        "the cosine goes down to 0 instead of to the floor min_lr_ratio * max_lr":
            make(right, warmup, total - warmup, 0.0),
        "the rate does not stay at the floor from total_steps on (a cosine past its end rises again)":
            make(right, warmup, total - warmup, lo, flat=False),
    }


def check_warmup_cosine_lr(run: NotebookRun):
    for total, warmup, max_lr, ratio in ((1000, 100, 5e-4, 0.1), (97, 0, 3e-3, 0.0), (10, 3, 1.0, 0.5),
                                         (50, 1, 2e-3, 0.1)):
        steps = range(total + 3)
        got = [call(run, "warmup_cosine_lr", s, total, max_lr, warmup, ratio) for s in steps]
        package = [get_lr(s, total, max_lr, warmup, ratio) for s in steps]
        torch_rates = _torch_schedule(total, max_lr, warmup, ratio)
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(package, torch_rates))  # the references agree
        bad = [s for s in steps if not (isinstance(got[s], (int, float)) and
                                        math.isclose(got[s], package[s], rel_tol=1e-9, abs_tol=1e-15))]
        if not bad:
            continue
        s = bad[0]
        where = (f"warmup_cosine_lr(step={s}, total_steps={total}, max_lr={max_lr}, warmup_iters={warmup}, "
                 f"min_lr_ratio={ratio}) = {got[s]!r}, expected {package[s]!r} (get_lr and torch's LinearLR + "
                 f"CosineAnnealingLR)")
        for why, wrong in _schedule_mistakes(total, max_lr, warmup, ratio).items():
            try:
                if all(isinstance(got[i], (int, float)) and math.isclose(got[i], wrong(i), rel_tol=1e-9, abs_tol=1e-15)
                       for i in steps):
                    raise AssertionError(f"{where}: {why}")
            except ZeroDivisionError:  # a variant that divides by warmup_iters = 0
                continue
        raise AssertionError(where)


# ---- A3: one training step --------------------------------------------------------------------------------------
class _RecordingSGD(torch.optim.SGD):
    """SGD that remembers the gradients it was given at each step (after clipping): what the step really used."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor | None]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _big_batch_gradient(micro) -> tuple[list[torch.Tensor], float, float]:
    """The reference: the gradient of the big batch (all micro-batches concatenated), its norm and its loss."""
    model = _model()
    loss = model(torch.cat([x for x, _ in micro]), labels=torch.cat([y for _, y in micro])).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return grads, torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item(), loss.item()


def _accumulated_gradient(micro, weighting: str, clip_each: float | None = None) -> list[torch.Tensor]:
    """The gradient accumulated over the micro-batches, each weighted the right way (exact: its token-loss sum over
    the step's labelled tokens) or a wrong one (mean_of_means: its mean / k; unshifted: labels[:, 0] counted too);
    `clip_each`: clipped after every backward instead of once at the end."""
    model = _model()
    count = sum(int(((y if weighting == "unshifted" else y[:, 1:]) != -100).sum()) for _, y in micro)
    for x, y in micro:
        if weighting == "mean_of_means":
            loss = model(x, labels=y).lm_loss / len(micro)
        else:
            loss = model(x, labels=y, num_items_in_batch=count).lm_loss
        loss.backward()
        if clip_each is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_each)
    return [p.grad.clone() for p in model.parameters()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], atol=1e-6, rtol=1e-4) -> bool:
    return all(x is not None and torch.allclose(x, y, atol=atol, rtol=rtol) for x, y in zip(a, b))


def _clipped(grads, max_norm):
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads]


def _run_train_step(run, micro, max_norm):
    model = _model()
    opt = _RecordingSGD(model.parameters(), lr=1.0)
    out = call(run, "train_step", model, opt, [(x.clone(), y.clone()) for x, y in micro], max_norm)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, float) for v in out)):
        raise AssertionError(f"train_step should return (loss, grad_norm), two floats; got {out!r}")
    if len(opt.seen) != 1:
        raise AssertionError(f"train_step called optimizer.step() {len(opt.seen)} times: one optimizer step per "
                             "call, after the last micro-batch's backward")
    left = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0]
    if left:
        raise AssertionError(f"after train_step, {len(left)} parameters (e.g. {left[0]}) still hold their gradient: "
                             "call optimizer.zero_grad() after the step, or the next step's backward() adds its "
                             "gradient to this one")
    return out, opt.seen[0]


def check_train_step(run: NotebookRun):
    micro = _micro_batches()
    counts = [int((y[:, 1:] != -100).sum()) for _, y in micro]
    exact, exact_norm, big_loss = _big_batch_gradient(micro)
    names = [n for n, _ in _model().named_parameters()]

    # 1. no clipping in effect: the optimizer must receive the big batch's gradient
    (loss, norm), seen = _run_train_step(run, micro, max_norm=1e9)
    if not _close(seen, exact):
        if _close(seen, _accumulated_gradient(micro, "mean_of_means")):
            raise AssertionError(
                f"train_step averages the micro-batches' mean losses (loss / k): that gives each micro-batch the same "
                f"weight, but these hold {counts} labelled tokens, so a token's weight depends on how the batch was "
                f"split. Divide each micro-batch's sum of token losses by the step's {sum(counts)} labelled tokens "
                "(model(x, labels=y, num_items_in_batch=n))")
        if _close(seen, _accumulated_gradient(micro, "unshifted")):
            raise AssertionError(
                "train_step counts the step's labelled tokens with (labels != -100).sum(): position t predicts "
                "labels[:, t + 1], so labels[:, 0] is never predicted; count (labels[:, 1:] != -100).sum()")
        ratio = [(s.double() / e.double())[e.abs() > 1e-4] for s, e in zip(seen, exact) if s is not None]
        flat = torch.cat(ratio) if ratio else torch.zeros(0)
        if flat.numel() and torch.allclose(flat, flat.median().expand_as(flat), rtol=1e-3):
            raise AssertionError(f"train_step's gradient is {flat.median().item():.4g} x the big batch's: each "
                                 f"micro-batch's token-loss sum must be divided by the step's {sum(counts)} labelled "
                                 "tokens, once")
        for name, s, e in zip(names, seen, exact):
            if s is None:
                raise AssertionError(f"the optimizer saw no gradient for {name}: call backward() on every "
                                     "micro-batch's loss")
            assert_close(s, e, f"the gradient of {name} handed to the optimizer (vs the big batch's)", atol=1e-6,
                         rtol=1e-4)
    if abs(loss - big_loss) > 1e-5:
        raise AssertionError(f"train_step's loss {loss:.6f} should be the step's loss per labelled token, "
                             f"{big_loss:.6f} (the big batch's mean)")
    if abs(norm - exact_norm) > 1e-4 * exact_norm:
        raise AssertionError(f"train_step's grad_norm {norm:.6f} should be the norm of the step's whole gradient "
                             f"before clipping, {exact_norm:.6f}")

    # 2. clipping in effect: clip the whole step's gradient, once, after the last backward
    (loss, norm), seen = _run_train_step(run, micro, max_norm=0.05)
    if not _close(seen, _clipped(exact, 0.05)):
        if _close(seen, _accumulated_gradient(micro, "exact", clip_each=0.05)):
            raise AssertionError("train_step clips before the last micro-batch (after every backward): it then "
                                 "clips partial sums, and the later micro-batches outweigh the earlier ones. Clip "
                                 "once, after the last backward, the whole step's gradient")
        if _close(seen, exact):
            raise AssertionError(f"train_step does not clip: the step's gradient norm is {exact_norm:.4f}, above "
                                 "max_norm = 0.05; use torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)")
        for name, s, e in zip(names, seen, _clipped(exact, 0.05)):
            assert_close(s, e, f"the clipped gradient of {name} handed to the optimizer (max_norm 0.05)", atol=1e-7,
                         rtol=1e-4)
    if abs(norm - exact_norm) > 1e-4 * exact_norm:
        after = abs(norm - 0.05) < 1e-4
        hint = " (that is the norm after clipping: return the one clip_grad_norm_ returns)" if after else ""
        raise AssertionError(f"with max_norm 0.05, train_step's grad_norm is {norm:.6f}; the step's gradient norm "
                             f"before clipping is {exact_norm:.6f}{hint}")

    # 3. the package's Trainer.train_step, with AdamW, on a copy of the same model
    mine = _model()
    package = copy.deepcopy(mine)
    loss, norm = call(run, "train_step", mine, configure_optimizer(mine, lr=1e-2), micro, 1.0)
    trainer = Trainer(package, [None] * len(micro), TrainConfig(batch_size=1, accumulation_steps=len(micro),
                                                                learning_rate=1e-2, grad_clip=1.0, max_steps=1))
    result = trainer.train_step(iter(micro))
    if abs(loss - result["lm_loss"]) > 1e-5 or abs(norm - result["grad_norm"]) > 1e-4 * result["grad_norm"]:
        raise AssertionError(f"train_step returned loss {loss:.6f}, grad_norm {norm:.6f}; Trainer.train_step on the "
                             f"same step: {result['lm_loss']:.6f}, {result['grad_norm']:.6f}")
    for (name, a), b in zip(mine.named_parameters(), package.parameters()):
        assert_close(a.detach(), b.detach(), f"{name} after one AdamW step (vs Trainer.train_step)", atol=1e-6, rtol=0)


# ---- Part B ------------------------------------------------------------------------------------------------------
def check_accumulate_exact(run: NotebookRun):
    micro = _micro_batches()
    model = _model()
    loss = call(run, "accumulate_exact", model, micro)
    grads = [p.grad for p in model.parameters()]
    if any(g is None for g in grads):
        raise AssertionError("accumulate_exact left some .grad empty: call backward() on every micro-batch's loss")
    ref = _model()
    big_x = torch.cat([x for x, _ in micro])
    big_y = torch.cat([y for _, y in micro])
    big = ref(big_x, labels=big_y).loss
    big.backward()
    if not isinstance(loss, float) or abs(loss - big.item()) > 1e-5:
        raise AssertionError(f"accumulate_exact should return the big batch's loss {big.item():.6f} as a float, "
                             f"got {loss!r}")
    for (name, p), g in zip(ref.named_parameters(), grads):
        assert_close(g, p.grad, f"gradient of {name}", atol=1e-6, rtol=1e-4)


def _reference_range_test(model, batches, min_lr, max_lr, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=min_lr, betas=(0.9, 0.95), weight_decay=0.0)
    lrs, losses = [], []
    for i in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches[i % len(batches)]
        loss = model(x, labels=x).loss
        lrs.append(lr)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > 4 * min(losses):
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    return lrs, losses


def check_lr_range_test(run: NotebookRun):
    g = torch.Generator().manual_seed(3)
    batches = list(torch.randint(0, 30, (5, 3, 6), generator=g).repeat_interleave(2, dim=-1))
    for steps, max_lr in ((12, 1e-2), (40, 30.0)):  # one that never diverges, one that does
        got = call(run, "lr_range_test", _model(), batches, 1e-4, max_lr, steps)
        want = _reference_range_test(_model(), batches, 1e-4, max_lr, steps)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"lr_range_test should return (lrs, losses), got {type(got).__name__}")
        lrs, losses = got
        if len(lrs) != len(want[0]) or len(losses) != len(want[1]):
            raise AssertionError(f"lr_range_test(steps={steps}, max_lr={max_lr}) ran {len(lrs)} steps, expected "
                                 f"{len(want[0])} (stop right after recording the first loss > 4 x the best so far)")
        assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(want[0], dtype=torch.float64),
                     "the learning rates", rtol=1e-9)
        assert_close(torch.tensor(losses), torch.tensor(want[1]), "the losses", atol=1e-4, rtol=1e-4)


def check_suggest_lr(run: NotebookRun):
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    for losses, want in (([5.0, 4.0, 2.0, 3.0, 9.0], 1e-3), ([5.0, 1.0, 2.0, 3.0, 9.0], 1e-4), ([5, 4, 3, 2, 1], 0.1)):
        got = call(run, "suggest_lr", lrs, losses)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"suggest_lr(lrs={lrs}, losses={losses}) should be {want} (the lr of the lowest "
                                 f"loss / 10), got {got!r}")


def _wsd(step, total, max_lr, warmup, decay_frac=0.2, min_lr_ratio=0.0):
    lo = max_lr * min_lr_ratio
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return lo
    start = total - int(decay_frac * total)
    return max_lr if step < start else max_lr - (max_lr - lo) * (step - start) / (total - start)


def check_wsd_lr(run: NotebookRun):
    for total, warmup, frac, ratio in ((1000, 50, 0.2, 0.0), (97, 0, 0.3, 0.1), (10, 3, 0.5, 0.5)):
        got = [call(run, "wsd_lr", s, total, 3e-4, warmup, frac, ratio) for s in range(total + 3)]
        want = [_wsd(s, total, 3e-4, warmup, frac, ratio) for s in range(total + 3)]
        bad = [s for s, (a, b) in enumerate(zip(got, want)) if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)]
        if bad:
            s = bad[0]
            raise AssertionError(f"wsd_lr(step={s}, total_steps={total}, max_lr=3e-4, warmup_iters={warmup}, "
                                 f"decay_frac={frac}, "
                                 f"min_lr_ratio={ratio}) = {got[s]!r}, expected {want[s]!r}")
