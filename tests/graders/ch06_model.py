"""Grader for solutions|exercises/06_model_exercises.ipynb: min-p, beam search, speculative decoding.

The references below are written independently of the solutions (log-space threshold, an explicit list-of-beams
search, plain greedy decoding by full re-forward) and run on the grader's own models.
"""
import math

import torch

from grading import NotebookRun, call
from zer02llm.config import LLMconfig
from zer02llm.model import LLM

NOTEBOOK = "06_model_exercises.ipynb"


def _model(seed: int, n_layers: int = 2, vocab: int = 40, sharpen: float = 8.0) -> LLM:
    torch.manual_seed(seed)
    m = LLM(LLMconfig(vocab_size=vocab, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=96,
                      tie_word_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


def _greedy(model: LLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _logprob(model: LLM, seq: torch.Tensor, n_prompt: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[None]).logits[0].double(), -1)
    return sum(logp[t - 1, seq[t]].item() for t in range(n_prompt, len(seq)))


def check_min_p_filter(run: NotebookRun):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.0])[:, None]
    for min_p in (0.0, 0.05, 0.1, 0.5, 1.0):
        out = call(run, "min_p_filter", logits.clone(), min_p)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            raise AssertionError(f"min_p_filter should return a tensor of shape {tuple(logits.shape)}, got {getattr(out, 'shape', type(out))}")
        # reference in log space: p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p)
        gap = logits - logits.max(-1, keepdim=True).values
        keep = gap >= (math.log(min_p) if min_p > 0 else -math.inf)
        got = ~torch.isinf(out)
        if not torch.equal(got, keep):
            row = int((got != keep).any(-1).nonzero()[0])
            raise AssertionError(f"min_p={min_p}: row {row} keeps {int(got[row].sum())} tokens, expected {int(keep[row].sum())} "
                                 "(keep p_i >= min_p * max_j p_j; removed tokens must be -inf)")
        if not torch.equal(out[keep], logits[keep]):
            raise AssertionError(f"min_p={min_p}: kept logits must be returned unchanged")


def check_beam_search(run: NotebookRun):
    model = _model(seed=5)
    prompt = torch.randint(0, 40, (5,), generator=torch.Generator().manual_seed(6))
    seq, _ = call(run, "beam_search", model, prompt, 1, 7)
    if not torch.equal(torch.as_tensor(seq), _greedy(model, prompt[None], 7)[0]):
        raise AssertionError("beam_search with num_beams=1 must return the greedy sequence (prompt included)")
    for num_beams, n in ((3, 6), (5, 8)):
        result = call(run, "beam_search", model, prompt, num_beams, n)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError("beam_search should return (sequence, score)")
        seq, score = torch.as_tensor(result[0]), float(result[1])
        if seq.dim() != 1 or len(seq) != len(prompt) + n or not torch.equal(seq[: len(prompt)], prompt):
            raise AssertionError(f"beam_search should return the 1-D prompt + {n} new tokens, got shape {tuple(seq.shape)}")
        true = _logprob(model, seq, len(prompt))
        if abs(true - score) > 1e-3:
            raise AssertionError(f"the returned score {score:.4f} is not the log-probability of the returned tokens ({true:.4f})")
        best = _reference_beam(model, prompt, num_beams, n)
        if true < best - 1e-3:
            raise AssertionError(f"num_beams={num_beams}: your best beam scores {true:.4f}, beam search finds {best:.4f}")


def _reference_beam(model: LLM, prompt: torch.Tensor, num_beams: int, n: int) -> float:
    beams = [(prompt.tolist(), 0.0)]
    for _ in range(n):
        candidates = []
        for tokens, score in beams:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)
            candidates += [(tokens + [v], score + logp[v].item()) for v in range(len(logp))]
        beams = sorted(candidates, key=lambda c: -c[1])[:num_beams]
    return beams[0][1]


def check_speculative_generate(run: NotebookRun):
    target = _model(seed=7, n_layers=3)
    prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(8))
    n, k = 20, 3
    expected = _greedy(target, prompt, n)
    for name, draft in (("an unrelated draft", _model(seed=9, n_layers=1)), ("a draft identical to the target", _model(seed=7, n_layers=3))):
        calls = []
        hook = target.register_forward_hook(lambda *_: calls.append(1))
        try:
            out = call(run, "speculative_generate", target, draft, prompt, n, k)
        finally:
            hook.remove()
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            raise AssertionError(f"speculative_generate should return shape {tuple(expected.shape)}, got {getattr(out, 'shape', type(out))}")
        if not torch.equal(out, expected):
            bad = int((out != expected).nonzero()[0, 1])
            raise AssertionError(f"with {name}, the output differs from the target's greedy decoding at position {bad}")
        limit = n + 1 if "unrelated" in name else math.ceil(n / (k + 1)) + 1
        if len(calls) > limit:
            raise AssertionError(f"with {name}, the target ran {len(calls)} times for {n} tokens (k={k}); at most {limit} needed "
                                 "(one target pass per round checks all k proposals)")
