"""Grader for solutions|exercises/08_pretrain_exercises.ipynb: exact accumulation, the LR range test, WSD."""
import math

import torch

from grading import NotebookRun, assert_close, call
from zer02llm.config import LLMconfig
from zer02llm.model import LLM
from zer02llm.utils import seed_everything

NOTEBOOK = "08_pretrain_exercises.ipynb"


def _model(seed=0):
    seed_everything(seed)
    return LLM(LLMconfig(vocab_size=30, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=12))


def _micro_batches():
    g = torch.Generator().manual_seed(5)
    batches = []
    for rows, real in ((3, 12), (1, 4), (2, 7), (2, 1)):  # the last one counts no token at all
        x = torch.randint(1, 30, (rows, 12), generator=g)
        y = x.clone()
        y[:, real:] = -100
        batches.append((x, y))
    return batches


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
        raise AssertionError(f"accumulate_exact should return the big batch's loss {big.item():.6f} as a float, got {loss!r}")
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
        assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(want[0], dtype=torch.float64), "the learning rates", rtol=1e-9)
        assert_close(torch.tensor(losses), torch.tensor(want[1]), "the losses", atol=1e-4, rtol=1e-4)


def check_suggest_lr(run: NotebookRun):
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    for losses, want in (([5.0, 4.0, 2.0, 3.0, 9.0], 1e-3), ([5.0, 1.0, 2.0, 3.0, 9.0], 1e-4), ([5, 4, 3, 2, 1], 0.1)):
        got = call(run, "suggest_lr", lrs, losses)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"suggest_lr(lrs={lrs}, losses={losses}) should be {want} (the lr of the lowest loss / 10), got {got!r}")


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
            raise AssertionError(f"wsd_lr(step={s}, total_steps={total}, max_lr=3e-4, warmup_iters={warmup}, decay_frac={frac}, "
                                 f"min_lr_ratio={ratio}) = {got[s]!r}, expected {want[s]!r}")
