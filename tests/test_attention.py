"""zer02llm.attention against independent references: a naive per-head loop, MHA with repeated heads, Hugging Face
LlamaAttention (weights copied), and a full forward pass for every way of feeding a sequence through the KV cache.
Tolerance: float32, 1e-5 absolute.
"""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from zer02llm.attention import Attention, KVCache, causal_mask
from zer02llm.rope import apply_rope, precompute_rope

ATOL = 1e-5
COS, SIN = precompute_rope(16, 64)  # head_dim 16 for every layer below


def make(n_heads=4, n_kv_heads=2, dim=64, seed=0, **kw) -> Attention:
    torch.manual_seed(seed)
    return Attention(dim, n_heads, n_kv_heads, **kw).eval()


def naive(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per batch element and query head; mask (B, T, S) bool. Keys/values at the same positions as the queries."""
    B, T, _ = x.shape
    d, G = attn.head_dim, attn.n_heads // attn.n_kv_heads
    out = torch.zeros(B, T, attn.n_heads * d, dtype=torch.float64)
    for b in range(B):
        cb, sb = (cos[b], sin[b]) if cos.dim() == 3 else (cos, sin)
        for h in range(attn.n_heads):
            g = h // G
            qh = apply_rope(x[b] @ attn.q_proj.weight[h * d:(h + 1) * d].T, cb, sb).double()
            kh = apply_rope(x[b] @ attn.k_proj.weight[g * d:(g + 1) * d].T, cb, sb).double()
            vh = (x[b] @ attn.v_proj.weight[g * d:(g + 1) * d].T).double()
            scores = (qh @ kh.T / math.sqrt(d)).masked_fill(~mask[b], float("-inf"))
            out[b, :, h * d:(h + 1) * d] = scores.softmax(-1) @ vh
    return (out @ attn.o_proj.weight.double().T).float()


# ---------------------------------------------------------------------------------------------------- causal_mask
def test_causal_mask_definition():
    for q_len, kv_len in ((5, 5), (3, 8), (1, 6)):
        m = causal_mask(q_len, kv_len)
        assert m.shape == (1, 1, q_len, kv_len) and m.dtype == torch.bool
        want = torch.tensor([[j <= kv_len - q_len + i for j in range(kv_len)] for i in range(q_len)])
        assert torch.equal(m[0, 0], want)
    assert torch.equal(causal_mask(2, 6, start_pos=1)[0, 0], torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool))


def test_causal_mask_padding():
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    m = causal_mask(5, 5, padding_mask=pad)
    assert m.shape == (2, 1, 5, 5)
    assert torch.equal(m[0, 0], causal_mask(5, 5)[0, 0])
    for i in range(5):
        for j in range(5):
            want = j <= i and (bool(pad[1, j]) or i == j)  # padding keys hidden; every token sees itself
            assert m[1, 0, i, j].item() == want
    assert m.any(-1).all(), "every query row must allow at least one key"
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        causal_mask(5, 5, padding_mask=torch.ones(2, 4))


# --------------------------------------------------------------------------------------------- full forward pass
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_matches_naive_loop(n_heads, n_kv_heads, flash):
    attn = make(n_heads, n_kv_heads, flash_attn=flash)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        y = attn(x, COS[:7], SIN[:7])
        ref = naive(attn, x, COS[:7], SIN[:7], torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7))
    assert y.shape == (2, 7, 64)
    assert torch.allclose(y, ref, atol=ATOL), (y - ref).abs().max()


def test_sdpa_and_manual_paths_agree_forward_and_backward():
    a, b = make(8, 2, dim=128), make(8, 2, dim=128, flash_attn=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 9, 128)
    ya, yb = a(x, COS[:9], SIN[:9]), b(x, COS[:9], SIN[:9])
    assert torch.allclose(ya, yb, atol=ATOL)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-4, rtol=1e-4), name


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(8, 2, dim=128)
    mha = make(8, 8, dim=128)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, 16, 128).repeat_interleave(4, dim=0).reshape(-1, 128)
            getattr(mha, name).weight.copy_(w)
        x = torch.randn(2, 6, 128)
        for flash in (True, False):
            gqa.flash_attn = mha.flash_attn = flash
            assert torch.allclose(gqa(x, COS[:6], SIN[:6]), mha(x, COS[:6], SIN[:6]), atol=ATOL)


# --------------------------------------------------------------------------------------------- Hugging Face Llama
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_matches_hf_llama_attention(n_heads, n_kv_heads, impl):
    ours = make(n_heads, n_kv_heads)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, attention_bias=False)
    cfg._attn_implementation = impl
    hf = LlamaAttention(cfg, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict())  # same names and shapes
    x = torch.randn(2, 10, 64)
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~causal_mask(10, 10), torch.finfo(torch.float32).min) if impl == "eager" else None
    with torch.no_grad():
        want, _ = hf(x, position_embeddings=(COS[:10][None], SIN[:10][None]), attention_mask=mask)
        for flash in (True, False):
            ours.flash_attn = flash
            got = ours(x, COS[:10], SIN[:10])
            assert torch.allclose(got, want, atol=ATOL), (flash, (got - want).abs().max())


def test_matches_hf_with_left_padding_and_per_sequence_positions():
    ours = make(4, 2)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=False)
    cfg._attn_implementation = "eager"
    hf = LlamaAttention(cfg, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict())
    pad = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    pos = (pad.cumsum(-1) - 1).clamp_min(0)
    mask = causal_mask(8, 8, padding_mask=pad)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        want, _ = hf(x, position_embeddings=(COS[pos], SIN[pos]), attention_mask=torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min))
        for flash in (True, False):
            ours.flash_attn = flash
            assert torch.allclose(ours(x, COS[pos], SIN[pos], attn_mask=mask), want, atol=ATOL)


# ---------------------------------------------------------------------------------------------------- KV cache
def feed(attn: Attention, x: torch.Tensor, splits: list[int], flash_per_piece=None) -> torch.Tensor:
    B, T, _ = x.shape
    cache = KVCache(B, attn.n_kv_heads, T + 3, attn.head_dim)  # longer than needed: views must stop at start_pos+T
    outs, pos = [], 0
    for i, n in enumerate(splits):
        if flash_per_piece is not None:
            attn.flash_attn = flash_per_piece[i % len(flash_per_piece)]
        outs.append(attn(x[:, pos:pos + n], COS[pos:pos + n], SIN[pos:pos + n], kv_cache=cache, start_pos=pos))
        pos += n
    return torch.cat(outs, dim=1)


SPLITS = {
    "prompt+tokens": [6] + [1] * 6,
    "token-by-token": [1] * 12,
    "chunked-prefill": [4, 5, 1, 2],
    "one-pass": [12],
}


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "manual"])
def test_incremental_decode_equals_full_pass(splits, flash):
    attn = make(8, 2, dim=128, flash_attn=flash)
    x = torch.randn(2, 12, 128)
    with torch.no_grad():
        full = attn(x, COS[:12], SIN[:12])
        assert (feed(attn, x, splits) - full).abs().max().item() <= ATOL


def test_incremental_decode_mixing_paths():
    """Prefill on one path, decode on the other: both read and write the same cache layout."""
    attn = make(4, 1)
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        full = attn(x, COS[:10], SIN[:10])
        for pattern in ([True, False], [False, True]):
            assert (feed(attn, x, [3, 1, 2, 1, 1, 2], pattern) - full).abs().max().item() <= ATOL


def test_prompt_of_one_token():
    attn = make(4, 2)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        cache = KVCache(1, 2, 4, 16)
        y = attn(x, COS[:1], SIN[:1], kv_cache=cache, start_pos=0)
        ref = naive(attn, x, COS[:1], SIN[:1], torch.ones(1, 1, 1, dtype=torch.bool))
    assert torch.allclose(y, ref, atol=ATOL)


def test_explicit_causal_mask_equals_default():
    attn = make(4, 2)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        for flash in (True, False):
            attn.flash_attn = flash
            assert torch.allclose(attn(x, COS[:9], SIN[:9], attn_mask=causal_mask(9, 9)), attn(x, COS[:9], SIN[:9]), atol=ATOL)
            c1, c2 = KVCache(2, 2, 9, 16), KVCache(2, 2, 9, 16)
            attn(x[:, :5], COS[:5], SIN[:5], kv_cache=c1)
            attn(x[:, :5], COS[:5], SIN[:5], kv_cache=c2)
            default = attn(x[:, 5:], COS[5:9], SIN[5:9], kv_cache=c1, start_pos=5)
            explicit = attn(x[:, 5:], COS[5:9], SIN[5:9], kv_cache=c2, start_pos=5, attn_mask=causal_mask(4, 9))
            assert torch.allclose(default, explicit, atol=ATOL)


def test_cache_update_writes_in_place_and_returns_views():
    cache = KVCache(2, 2, 10, 4)
    k_buf, v_buf = cache.k.data_ptr(), cache.v.data_ptr()
    k1, v1 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k, v = cache.update(0, k1, v1)
    assert k.shape == (2, 2, 3, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    k, v = cache.update(3, k2, v2)
    assert k.shape == (2, 2, 4, 4) and torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    assert k.data_ptr() == k_buf == cache.k.data_ptr() and v.data_ptr() == v_buf == cache.v.data_ptr()


def test_cache_errors():
    cache = KVCache(1, 2, 8, 4)
    with pytest.raises(ValueError, match="overflow.*max_seq_len=8"):
        cache.update(6, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(-1, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        cache.update(0, torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4))
    with pytest.raises(ValueError, match="must be positive"):
        KVCache(1, 2, 0, 4)
    attn = make(4, 2)
    with pytest.raises(ValueError, match="overflow"), torch.no_grad():
        attn(torch.randn(1, 3, 64), COS[:3], SIN[:3], kv_cache=KVCache(1, 2, 4, 16), start_pos=2)


def test_decode_step_does_not_repeat_the_cache():
    """GQA through SDPA with enable_gqa: no repeat/repeat_interleave copy of the cached K/V in a decode step."""
    from torch.profiler import profile

    attn = make(8, 2, dim=128)
    cache = KVCache(1, 2, 40, 16)
    with torch.no_grad():
        attn(torch.randn(1, 30, 128), COS[:30], SIN[:30], kv_cache=cache)
        with profile() as prof:
            attn(torch.randn(1, 1, 128), COS[30:31], SIN[30:31], kv_cache=cache, start_pos=30)
    ops = {e.key for e in prof.key_averages()}
    assert not any("repeat" in op for op in ops), ops


# ---------------------------------------------------------------------------------------------- padding, dropout
def test_left_padding_does_not_leak():
    attn = make(4, 2)
    short = torch.randn(1, 4, 64)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    pos = (pad.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = attn(short, COS[:4], SIN[:4])
        for flash in (True, False):
            attn.flash_attn = flash
            for junk in (torch.zeros(1, 3, 64), torch.randn(1, 3, 64) * 1e3):
                y = attn(torch.cat([junk, short], 1), COS[pos], SIN[pos], attn_mask=causal_mask(7, 7, padding_mask=pad))
                assert torch.isfinite(y).all()
                assert torch.allclose(y[0, 3:], alone[0], atol=ATOL)


def test_dropout_only_in_training():
    x = torch.randn(2, 6, 64)
    for flash in (True, False):
        attn = make(4, 2, dropout=0.5, flash_attn=flash)
        with torch.no_grad():
            assert torch.equal(attn(x, COS[:6], SIN[:6]), attn(x, COS[:6], SIN[:6]))
            attn.train()
            assert not torch.equal(attn(x, COS[:6], SIN[:6]), attn(x, COS[:6], SIN[:6]))


def test_bfloat16_runs_close_to_float32():
    attn = make(4, 2)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref = attn(x, COS[:8], SIN[:8])
        attn = attn.to(torch.bfloat16)
        for flash in (True, False):
            attn.flash_attn = flash
            y = attn(x.bfloat16(), COS[:8], SIN[:8])
            assert y.dtype == torch.bfloat16
            assert (y.float() - ref).abs().max().item() < 0.05


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dim=100, n_heads=8), "divisible by n_heads"),
        (dict(dim=64, n_heads=8, n_kv_heads=3), r"divisible by n_kv_heads.*\[1, 2, 4, 8\]"),
        (dict(dim=24, n_heads=8), "must be even"),
        (dict(dim=64, n_heads=0), "positive"),
        (dict(dim=64, n_heads=4, dropout=1.0), "dropout"),
    ],
)
def test_invalid_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)


def test_invalid_mask():
    attn = make(4, 2)
    x = torch.randn(1, 5, 64)
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        attn(x, COS[:5], SIN[:5], attn_mask=torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, 1, 5, 5\)"):
        attn(x, COS[:5], SIN[:5], attn_mask=causal_mask(5, 6))
