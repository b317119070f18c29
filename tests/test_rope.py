"""RoPE against a complex-number formulation and Hugging Face's Llama rotary code; relative-position property."""
import math

import pytest
import torch

from zer02llm.rope import apply_rope, precompute_rope, rotate_half


def _rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    T, d = x.shape[-2:]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("head_dim,theta,T", [(64, 1e6, 128), (32, 1e4, 50), (128, 5e5, 300), (8, 10.0, 7)])
def test_matches_complex_formulation(head_dim, theta, T):
    x = torch.randn(2, 3, T, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = precompute_rope(head_dim, T, theta)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), _rope_complex(x, theta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,theta", [(64, 1e6), (32, 1e4), (128, 5e5), (16, 10000.0)])
def test_matches_hf_llama_rotary(head_dim, theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    T = 64  # HF computes angles in float32 (error grows with position); ours are float64-accurate
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta, max_position_embeddings=T)
    pos = torch.arange(T)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = precompute_rope(head_dim, T, theta)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, T, head_dim, generator=g), torch.randn(2, 2, T, head_dim, generator=g)
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    # same tables -> same rotation (the application is checked alone; the tables were compared above)
    torch.testing.assert_close(apply_rope(q, hf_cos[0], hf_sin[0]), hq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rope(k, hf_cos[0], hf_sin[0]), hk, atol=1e-6, rtol=1e-6)
    # end to end with our own (float64-accurate) tables: within 2e-5 for |x| up to ~4
    torch.testing.assert_close(apply_rope(q, cos, sin), hq, atol=2e-5, rtol=1e-5)


def test_score_depends_only_on_offset():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    cos, sin = precompute_rope(64, 200, theta=1e4)
    qr, kr = apply_rope(q.expand(200, 64), cos, sin), apply_rope(k.expand(200, 64), cos, sin)
    scores = qr @ kr.T
    for offset in (0, 1, 5, 37, 150):
        diag = torch.diagonal(scores, offset=-offset)
        ref = (q * apply_rope(k.expand(offset + 1, 64), cos[: offset + 1], -sin[: offset + 1])[offset]).sum()
        # <R_m q, R_n k> = <q, R_{n-m} k>: rotating k back by the offset gives the same score everywhere
        assert (diag - ref).abs().max() < 1e-4, offset
    assert (torch.diagonal(scores, 0)[0] - torch.diagonal(scores, -5)[0]).abs() > 1e-3  # offsets do matter


def test_rotation_preserves_norm_and_position_zero_is_identity():
    x = torch.randn(1, 2, 10, 16, generator=torch.Generator().manual_seed(3))
    cos, sin = precompute_rope(16, 10)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)


def test_per_sequence_positions_broadcast():
    """Left-padded batches give each sequence its own positions: cos[pos] of shape (B, T, D), unsqueezed for heads."""
    cos, sin = precompute_rope(16, 32)
    x = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    y = apply_rope(x, cos[pos][:, None], sin[pos][:, None])
    torch.testing.assert_close(y[1], apply_rope(x[1], cos[5:9], sin[5:9]))


def test_bf16_and_errors():
    cos, sin = precompute_rope(32, 8)
    assert cos.dtype == torch.float32 and cos.shape == (8, 32)
    assert apply_rope(torch.randn(1, 8, 32).to(torch.bfloat16), cos, sin).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even"):
        precompute_rope(7, 8)
    assert math.isclose(precompute_rope(4, 2, theta=100.0)[0][1, 1].item(), math.cos(0.1), rel_tol=1e-6)
