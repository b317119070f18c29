"""Grader for solutions|exercises/03_attention_exercises.ipynb (sliding window, ALiBi, attention sinks)."""
import math

import torch

from grading import NotebookRun, assert_close, call

NOTEBOOK = "03_attention_exercises.ipynb"


def _reference_window_mask(q_len: int, kv_len: int, window: int) -> torch.Tensor:
    want = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = kv_len - q_len + i
        for j in range(max(0, p - window + 1), p + 1):
            want[i, j] = True
    return want


def check_sliding_window_mask(run: NotebookRun):
    for q_len, kv_len, window in ((6, 6, 3), (1, 10, 4), (3, 9, 2), (5, 5, 1), (4, 7, 100)):
        got = call(run, "sliding_window_mask", q_len, kv_len, window)
        want = _reference_window_mask(q_len, kv_len, window)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != torch.bool:
            raise AssertionError(f"sliding_window_mask({q_len}, {kv_len}, {window}) should be a bool tensor of shape {tuple(want.shape)}, "
                                 f"got {type(got).__name__} {getattr(got, 'dtype', '')} {tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, want):
            i, j = (int(t) for t in torch.nonzero(got != want)[0])
            raise AssertionError(f"sliding_window_mask({q_len}, {kv_len}, {window})[{i}, {j}] is {bool(got[i, j])}: query {i} sits at "
                                 f"position {kv_len - q_len + i} and should {'' if want[i, j] else 'not '}see key {j}")


def check_kv_cache_bytes(run: NotebookRun):
    cases = [
        (dict(n_layers=32, n_kv_heads=8, head_dim=128, seq_len=32768), 32 * 8 * 128 * 32768 * 2 * 2),
        (dict(n_layers=32, n_kv_heads=8, head_dim=128, seq_len=32768, window=4096), 32 * 8 * 128 * 4096 * 2 * 2),
        (dict(n_layers=8, n_kv_heads=2, head_dim=64, seq_len=100, window=4096, batch_size=3, bytes_per_value=4), 8 * 2 * 64 * 100 * 2 * 3 * 4),
    ]
    for kwargs, want in cases:
        got = call(run, "kv_cache_bytes", **kwargs)
        if got != want or not isinstance(got, int):
            raise AssertionError(f"kv_cache_bytes({kwargs}) = {got!r}, expected {want} (an int): keys and values, every layer, "
                                 "min(seq_len, window) positions")


def check_alibi_slopes(run: NotebookRun):
    """Compared with Hugging Face BLOOM's ALiBi, which carries the paper's rule for any head count."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 4, 8, 6, 12, 16, 20):
        want = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope * position 1
        assert_close(call(run, "alibi_slopes", n), want, f"alibi_slopes({n})", atol=1e-7, rtol=1e-6)


def _reference_alibi(q, k, v, slopes):
    """Query by query in float64: scores over keys 0..p, minus slope * distance."""
    B, H, T, d = q.shape
    S = k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            p = S - T + i
            distance = torch.arange(p, -1, -1, dtype=torch.float64)  # p - j for j = 0..p
            scores = torch.einsum("bd,bjd->bj", q[:, h, i], k[:, h, : p + 1]) / math.sqrt(d) - float(slopes[h]) * distance
            out[:, h, i] = torch.einsum("bj,bjd->bd", scores.softmax(-1), v[:, h, : p + 1])
    return out.float()


def check_alibi_attention(run: NotebookRun):
    g = torch.Generator().manual_seed(0)
    for B, H, T, S, d in ((2, 4, 6, 6, 8), (1, 6, 3, 9, 16), (1, 2, 1, 5, 4)):
        q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (T, S, S))
        slopes = torch.rand(H, generator=g)
        got = call(run, "alibi_attention", q, k, v, slopes)
        assert_close(got, _reference_alibi(q, k, v, slopes), f"alibi_attention (B={B}, H={H}, T={T}, S={S}, d={d})")


def check_sink_cache(run: NotebookRun):
    for n_sink, window, chunks in ((2, 4, (3, 1, 2, 1, 1, 2, 2, 5, 1)), (1, 3, (1,) * 9), (4, 2, (7, 1, 3))):
        cache = call(run, "SinkKVCache", n_sink, window)
        seen_k = seen_v = None
        g = torch.Generator().manual_seed(n_sink)
        for n in chunks:
            k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
            seen_k = k if seen_k is None else torch.cat([seen_k, k], 2)
            seen_v = v if seen_v is None else torch.cat([seen_v, v], 2)
            N = seen_k.shape[2]
            keep = list(range(N)) if N <= n_sink + window else list(range(n_sink)) + list(range(N - window, N))
            result = _update(cache, k, v)
            what = f"SinkKVCache({n_sink}, {window}) after {N} tokens (expected positions {keep})"
            assert_close(result[0], seen_k[:, :, keep], f"{what}: keys")
            assert_close(result[1], seen_v[:, :, keep], f"{what}: values")


def _update(cache, k, v):
    try:
        result = cache.update(k, v)
    except NotImplementedError:
        raise AssertionError("`SinkKVCache.update` is not implemented yet: replace `raise NotImplementedError()` in its cell") from None
    except Exception as e:
        raise AssertionError(f"`SinkKVCache.update` raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("SinkKVCache.update should return a tuple (keys, values)")
    return result
