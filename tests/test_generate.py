"""Sampling helpers against naive references and Hugging Face's logits processors; the generation loop."""
import math

import pytest
import torch

from zer02llm.generate import (
    apply_repetition_penalty,
    check_sampling_args,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)


def _naive_top_p_keep(row: list[float], p: float) -> set[int]:
    """Smallest set of most likely tokens whose probability reaches p (loop over the sorted distribution)."""
    z = max(row)
    e = [math.exp(v - z) for v in row]
    s = sum(e)
    probs = [v / s for v in e]
    order = sorted(range(len(row)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return keep


def test_top_p_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    for p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(logits, p)
        for row, orow in zip(logits, out):
            kept = {i for i, v in enumerate(orow.tolist()) if v != float("-inf")}
            assert kept == _naive_top_p_keep(row.tolist(), p), p
            assert torch.equal(orow[list(kept)], row[list(kept)])


def test_top_p_keeps_at_least_one_and_one_keeps_all():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    assert (top_p_filter(logits, 1e-9) > float("-inf")).sum() == 1
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_k_keeps_k_largest_and_clamps():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(torch.isinf(out), torch.tensor([[True, False, True, True, False]]))
    assert torch.equal(top_k_filter(logits, 99), logits)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 3.0, -1.0]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_pipeline_matches_hf_logits_processors():
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 64, generator=g) * 3
    history = torch.randint(0, 64, (5, 9), generator=g)
    seen = torch.zeros(5, 64, dtype=torch.bool).scatter_(1, history, True)
    ours = top_p_filter(top_k_filter(apply_repetition_penalty(logits, seen, 1.5) / 0.8, 17), 0.85)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    for proc in (lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(17), lp.TopPLogitsWarper(0.85)):
        ref = proc(history, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    a = sample_next_token(logits, 0.9, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, 0.9, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3,) and a.dtype == torch.long


def test_sampling_never_picks_a_filtered_token_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_next_token(logits, 1.0, top_k=2, generator=g) for _ in range(4000)])
    counts = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.625) < 0.03  # 0.5 / (0.5 + 0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be a positive int"),
        (dict(top_k=2.5), "top_k must be a positive int"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_sampling_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_args(**kwargs)
