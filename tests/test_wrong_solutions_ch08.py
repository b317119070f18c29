"""Chapter 08's build-it graders name the usual mistakes: each deliberately wrong solution fails with a message that
says what is wrong, and a correct one passes. No notebook runs: the functions go straight into a fake NotebookRun."""
import math
from pathlib import Path

import pytest
import torch

from graders import ch08_pretrain as grader
from grading import NotebookRun


def _run(**functions) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), dict(functions))


# ---- A1: AdamW ---------------------------------------------------------------------------------------------------
def _adamw(bias_correction=True, decay="decoupled", eps_inside=False):
    """An AdamW step for one tensor, right by default, with one mistake when asked."""

    @torch.no_grad()
    def adamw_step(param, grad, state, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        b1, b2 = betas
        if not state:
            state.update(step=0, m=torch.zeros_like(param), v=torch.zeros_like(param))
        state["step"] += 1
        t = state["step"]
        if decay == "decoupled":
            param -= lr * weight_decay * param
        elif decay == "l2":
            grad = grad + weight_decay * param
        state["m"].mul_(b1).add_(grad, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat, v_hat = state["m"], state["v"]
        if bias_correction:
            m_hat, v_hat = m_hat / (1 - b1 ** t), v_hat / (1 - b2 ** t)
        denom = (v_hat + eps).sqrt() if eps_inside else v_hat.sqrt() + eps
        param -= lr * m_hat / denom

    return adamw_step


def test_adamw_correct_passes():
    grader.check_adamw_step(_run(adamw_step=_adamw()))


@pytest.mark.parametrize("mistake,message", [
    (dict(bias_correction=False), "skips the bias correction"),
    (dict(decay="l2"), r"adds weight_decay \* param to the gradient \(L2"),
    (dict(eps_inside=True), "puts eps inside the square root"),
    (dict(decay="none"), "weights are not decayed"),
])
def test_adamw_mistakes_are_named(mistake, message):
    with pytest.raises(AssertionError, match=message):
        grader.check_adamw_step(_run(adamw_step=_adamw(**mistake)))


# ---- A2: warmup + cosine -----------------------------------------------------------------------------------------
def _schedule(warmup_start=1, cosine_over_total=False, floor=True):
    def warmup_cosine_lr(step, total_steps, max_lr, warmup_iters=0, min_lr_ratio=0.1):
        min_lr = max_lr * min_lr_ratio if floor else 0.0
        if step < warmup_iters:
            return max_lr * (step + warmup_start) / warmup_iters
        if step >= total_steps:
            return min_lr
        start, length = (0, total_steps) if cosine_over_total else (warmup_iters, total_steps - warmup_iters)
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * (step - start) / max(1, length)))

    return warmup_cosine_lr


def test_schedule_correct_passes():
    grader.check_warmup_cosine_lr(_run(warmup_cosine_lr=_schedule()))


@pytest.mark.parametrize("mistake,message", [
    (dict(warmup_start=0), "warmup off by one: max_lr \\* step / warmup_iters gives step 0 a rate of 0"),
    (dict(cosine_over_total=True), "the cosine is measured from step 0 over total_steps"),
    (dict(floor=False), "goes down to 0 instead of to the floor"),
])
def test_schedule_mistakes_are_named(mistake, message):
    with pytest.raises(AssertionError, match=message):
        grader.check_warmup_cosine_lr(_run(warmup_cosine_lr=_schedule(**mistake)))


# ---- A3: one training step ---------------------------------------------------------------------------------------
def _train_step(weighting="tokens", zero_grad=True, clip_each=False):
    """One accumulated step: right by default (token sums over the step's labelled-token count), or one mistake."""

    def train_step(model, optimizer, micro_batches, max_norm):
        n = sum(int(((y if weighting == "unshifted" else y[:, 1:]) != -100).sum()) for _, y in micro_batches)
        total, norm = 0.0, None
        for x, y in micro_batches:
            if weighting == "mean_of_means":
                loss = model(x, labels=y).loss / len(micro_batches)
            else:
                loss = model(x, labels=y, num_items_in_batch=max(n, 1)).lm_loss
            loss.backward()
            total += loss.item()
            if clip_each:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if not clip_each:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        if zero_grad:
            optimizer.zero_grad()
        return total, norm.item()

    return train_step


def test_train_step_correct_passes():
    grader.check_train_step(_run(train_step=_train_step()))


@pytest.mark.parametrize("mistake,message", [
    (dict(weighting="mean_of_means"), "averages the micro-batches' mean losses"),
    (dict(weighting="unshifted"), r"counts the step's labelled tokens with \(labels != -100\)"),
    (dict(zero_grad=False), "still hold their gradient: call optimizer.zero_grad"),
    (dict(clip_each=True), "clips before the last micro-batch"),
])
def test_train_step_mistakes_are_named(mistake, message):
    with pytest.raises(AssertionError, match=message):
        grader.check_train_step(_run(train_step=_train_step(**mistake)))
