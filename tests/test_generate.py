"""Sampling helpers against naive references and Hugging Face's logits processors; the generation loop."""
import math

import pytest
import torch

from zer02llm.config import LLMconfig
from zer02llm.generate import (
    apply_repetition_penalty,
    check_sampling_args,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from zer02llm.model import LLM

from tiny_models import ids, tiny


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


# ---- the generation loop (zer02llm.generate, also model.generate) ------------------------------------------------
def greedy_naive(m, x, n, penalty=1.0):
    """Full re-forward every step; the CTRL penalty computed with gather/scatter over the sequence."""
    with torch.no_grad():
        for _ in range(n):
            logits = m(x).logits[:, -1]
            if penalty != 1.0:
                s = logits.gather(1, x)
                logits = logits.scatter(1, x, torch.where(s > 0, s / penalty, s * penalty))
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("kw", [{}, dict(use_moe=True, n_shared_experts=1), dict(n_kv_heads=None, tie_word_embeddings=False)])
def test_greedy_with_cache_equals_full_reforward(kw):
    m = tiny(**kw)
    x = ids(2, 7)
    torch.testing.assert_close(m.generate(x, max_new_tokens=25, temperature=0), greedy_naive(m, x, 25), atol=0, rtol=0)


def test_repetition_penalty_in_the_loop():
    m = tiny()
    x = ids(2, 7)
    out = m.generate(x, max_new_tokens=15, temperature=0, repetition_penalty=1.8)
    assert torch.equal(out, greedy_naive(m, x, 15, penalty=1.8))


def test_left_padded_batch_equals_each_sequence_alone():
    m = tiny()
    a, b = ids(1, 5, seed=4)[0], ids(1, 9, seed=5)[0]
    batch = torch.stack([torch.cat([torch.full((4,), 7), a]), b])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    out = m.generate(batch, max_new_tokens=12, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 9:], m.generate(a, max_new_tokens=12, temperature=0)[5:])
    assert torch.equal(out[1, 9:], m.generate(b, max_new_tokens=12, temperature=0)[9:])


def test_one_dimensional_prompt_and_zero_new_tokens():
    m = tiny()
    x = ids(1, 5)[0]
    out = m.generate(x, max_new_tokens=4, temperature=0)
    assert out.shape == (9,) and torch.equal(out[:5], x)
    assert torch.equal(m.generate(x, max_new_tokens=0), x)


def test_seeded_sampling_is_reproducible():
    m = tiny()
    x = ids(3, 4)
    run = lambda seed: m.generate(x, 20, temperature=1.2, top_k=40, top_p=0.95, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_eos_stops_each_sequence_and_fills():
    m = tiny()
    x = ids(2, 6)
    free = m.generate(x, max_new_tokens=20, temperature=0)
    eos = int(free[0, 8])  # sequence 0 emits it at new-token index 2 (or earlier)
    out = m.generate(x, max_new_tokens=20, temperature=0, eos_token_id=[eos, 96])
    first = int((free[0, 6:] == eos).nonzero()[0])
    assert torch.equal(out[0, 6:6 + first + 1], free[0, 6:6 + first + 1])
    assert (out[0, 6 + first:] == eos).all()
    for row_out, row_free in zip(out, free):  # until it finishes, each sequence is unchanged
        hits = torch.isin(row_free[6:], torch.tensor([eos, 96])).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 20
        assert torch.equal(row_out[6:6 + stop], row_free[6:6 + stop])
    single = m.generate(x[:1], max_new_tokens=20, temperature=0, eos_token_id=eos)
    assert single.shape[1] == 6 + first + 1  # stops as soon as every sequence has finished


def test_eos_token_id_may_be_an_integer_tensor():
    """An id read out of a tensor (`out[0, -1]`) is a 0-d tensor: it stops generation like the int it holds, in the
    readable loop and in chapter 11's fast one (which shares its argument checks)."""
    from zer02llm import fast

    m = tiny()
    x = ids(1, 6)
    eos = m.generate(x, max_new_tokens=20, temperature=0)[0, 8]  # a 0-d tensor
    want = m.generate(x, max_new_tokens=20, temperature=0, eos_token_id=int(eos))
    for tensor_eos in (eos, eos[None], torch.tensor([int(eos), 96])):
        assert torch.equal(m.generate(x, max_new_tokens=20, temperature=0, eos_token_id=tensor_eos), want)
        streamed = list(fast.stream_generate(m, x, 20, temperature=0, eos_token_id=tensor_eos))
        assert torch.equal(torch.cat(streamed), want[0, 6:])


def test_stream_generate_yields_the_same_tokens():
    m = tiny()
    x = ids(2, 5)
    steps = list(m.stream_generate(x, max_new_tokens=10, temperature=0))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), m.generate(x, max_new_tokens=10, temperature=0)[:, 5:])
    assert torch.equal(torch.stack(list(m.generate(x, 10, temperature=0, stream=True)), 1), torch.stack(steps, 1))


def test_generate_output_is_an_ordinary_tensor():
    m = tiny()
    out = m.generate(ids(1, 4), max_new_tokens=3, temperature=0)
    assert not out.requires_grad and not out.is_inference()
    m.train()
    m(out, labels=out).loss.backward()  # usable for training afterwards


def test_generate_in_bfloat16():
    m = tiny().to(torch.bfloat16)
    out = m.generate(ids(2, 4), max_new_tokens=5, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 9)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.generate(ids(1, 60), max_new_tokens=10), ValueError, r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds max_seq_len=64"),
        (lambda m: m.generate(ids(1, 4), max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
        (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 5), ValueError, "prompt is empty"),
        (lambda m: m.generate(torch.tensor([[5, 200]]), 5), ValueError, r"token ids must be in \[0, 97\)"),
        (lambda m: m.generate(torch.rand(1, 4), 5), ValueError, "tensor of token ids"),
        (lambda m: m.generate([1, 2, 3], 5), TypeError, "torch.Tensor"),
        (lambda m: m.generate(ids(2, 4), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), max_new_tokens=5), ValueError, "LEFT padding"),
        (lambda m: m.generate(ids(2, 4), attention_mask=torch.ones(2, 3), max_new_tokens=5), ValueError, "shape of input_ids"),
        (lambda m: m.generate(ids(1, 4), 5, temperature=-1), ValueError, "temperature"),
        (lambda m: m.generate(ids(1, 4), 5, top_p=0), ValueError, "top_p"),
        (lambda m: m.generate(ids(1, 4), 5, eos_token_id=500), ValueError, "eos_token_id"),
        (lambda m: m.generate(ids(1, 4), 5, eos_token_id=2.0), ValueError, "eos_token_id must be an int"),
        (lambda m: m.generate(ids(1, 4), 5, eos_token_id=True), ValueError, "eos_token_id must be an int"),
        (lambda m: m.generate(ids(1, 4), 5, eos_token_id=torch.tensor(2.0)), ValueError, "eos_token_id must be an int"),
        (lambda m: m.generate(ids(1, 4), 5, eos_token_id=[]), ValueError, "eos_token_id must be an int"),
    ],
)
def test_generate_errors_are_raised_at_the_call(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny())


def test_quick_start_runs_as_written():
    torch.manual_seed(0)
    config = LLMconfig(vocab_size=32000, dim=512, n_layers=6, n_heads=8, max_seq_len=2048)
    model = LLM(config)
    input_ids = torch.randint(0, 32000, (1, 8))
    output = model.generate(input_ids, max_new_tokens=100, temperature=0.7, top_p=0.9)
    assert output.shape == (1, 108) and torch.equal(output[:, :8], input_ids)




def test_the_loop_uses_the_weights_as_they_are_at_each_call():
    """An in-place edit that no version counter sees (`.data.copy_`) and a model built under inference_mode: the loop
    must compute with the current weights either way (moved here from chapter 06b: an engineering check, not a
    lesson)."""
    torch.manual_seed(0)  # untied: an untrained tied model mostly repeats its last token, whatever its weights
    model = LLM(LLMconfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                          tie_word_embeddings=False)).eval()
    prompt = torch.randint(0, 512, (2, 12))
    before = model.generate(prompt, max_new_tokens=8, temperature=0)
    model.lm_head.weight.data.copy_(torch.randn_like(model.lm_head.weight))
    after = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert not torch.equal(before, after) and torch.equal(after, greedy_naive(model, prompt, 8))
    with torch.inference_mode():
        frozen = LLM(model.config)
        frozen.load_state_dict(model.state_dict())
        from_frozen = frozen.eval().generate(prompt, max_new_tokens=8, temperature=0)
    assert torch.equal(from_frozen, after)
