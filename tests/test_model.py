"""LLM: structure, initialisation, forward against a naive reference, loss, KV cache, masks (generation:
tests/test_generate.py; checkpoint files: tests/test_checkpoint.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from zer02llm.attention import KVCache
from zer02llm.config import LLMconfig
from zer02llm.model import LLM, Block, LLMOutput, lm_loss

from tiny_models import ids, tiny

ATOL = 1e-5  # float32


# ---------------------------------------------------------------- naive reference (independent of the package)
def _rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x (T, d); the half-split layout
    d = x.shape[-1]
    inv = torch.tensor([1.0 / theta ** (2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _swiglu(x, ffn):
    return ffn.down_proj.weight @ (F.silu(ffn.gate_proj.weight @ x) * (ffn.up_proj.weight @ x))


def naive_logits(model: LLM, seq: torch.Tensor) -> torch.Tensor:
    """One sequence (T,), loops over heads, tokens and experts; returns (T, V)."""
    c = model.config
    T, hd = seq.shape[0], c.head_dim
    x = model.embed_tokens.weight[seq]
    pos = torch.arange(T)
    for layer in model.layers:
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, c.norm_eps)
        q = (h @ a.q_proj.weight.T).view(T, c.n_heads, hd)
        k = (h @ a.k_proj.weight.T).view(T, c.n_kv_heads, hd)
        v = (h @ a.v_proj.weight.T).view(T, c.n_kv_heads, hd)
        heads = []
        for i in range(c.n_heads):
            j = i // (c.n_heads // c.n_kv_heads)
            qi, kj = _rope(q[:, i], pos, c.rope_theta), _rope(k[:, j], pos, c.rope_theta)
            s = qi @ kj.T / math.sqrt(hd) + torch.triu(torch.full((T, T), float("-inf")), 1)
            heads.append(torch.softmax(s, -1) @ v[:, j])
        x = x + torch.cat(heads, -1) @ a.o_proj.weight.T
        h = _rms(x, layer.post_attention_layernorm.weight, c.norm_eps)
        if not c.use_moe:
            x = x + torch.stack([_swiglu(t, layer.mlp) for t in h])
            continue
        rows = []
        for t in h:
            p = torch.softmax(layer.mlp.gate.weight @ t, -1)
            w, e = torch.topk(p, c.num_experts_per_tok)
            if c.norm_topk_prob:
                w = w / w.sum()
            y = sum(wi * _swiglu(t, layer.mlp.experts[int(ei)]) for wi, ei in zip(w, e))
            y = y + sum((_swiglu(t, s) for s in layer.mlp.shared_experts), torch.zeros_like(t))
            rows.append(y)
        x = x + torch.stack(rows)
    return _rms(x, model.norm.weight, c.norm_eps) @ model.lm_head.weight.T


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(n_kv_heads=None, tie_word_embeddings=False, rope_theta=1e4),
        dict(dim=60, n_heads=5, n_kv_heads=1, hidden_dim=100),
        dict(use_moe=True, n_shared_experts=1),
        dict(use_moe=True, n_shared_experts=0, norm_topk_prob=False, n_routed_experts=3, num_experts_per_tok=1),
    ],
)
def test_forward_matches_naive_reference(kw):
    model = tiny(**kw)
    x = ids(2, 11)
    with torch.no_grad():
        logits = model(x).logits
        for b in range(2):
            torch.testing.assert_close(logits[b], naive_logits(model, x[b]), atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------- structure and initialisation
def test_output_type_and_block():
    model = tiny()
    out = model(ids(1, 5))
    assert isinstance(out, LLMOutput) and out.logits.shape == (1, 5, 97) and out.loss is None
    assert out.aux_loss.item() == 0 and out.kv_caches is None
    assert all(isinstance(b, Block) for b in model.layers) and len(model.layers) == 2


def test_tied_and_untied_parameter_counts():
    tied, untied = tiny(), tiny(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 64
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))


def test_default_model_is_about_26m():
    torch.manual_seed(0)
    n = LLM(LLMconfig()).num_parameters()
    assert 25e6 < n < 27e6


def test_moe_active_parameters():
    m = tiny(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    per_expert = sum(p.numel() for p in m.layers[0].mlp.experts[0].parameters())
    assert m.num_parameters() - m.num_parameters(active_only=True) == 2 * 2 * per_expert
    dense = tiny()
    assert dense.num_parameters(active_only=True) == dense.num_parameters()


def test_rope_tables_are_non_persistent_buffers():
    m = tiny()
    assert m.rope_cos.shape == (64, 16) and "rope_cos" not in m.state_dict()
    assert "rope_cos" in dict(m.named_buffers())


def test_initialisation_statistics():
    torch.manual_seed(0)
    m = LLM(LLMconfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=2000, use_moe=True))
    assert abs(m.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert abs(m.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 1e-3
    scaled = 0.02 / math.sqrt(16)
    assert abs(m.layers[3].self_attn.o_proj.weight.std().item() - scaled) < 3e-4
    assert abs(m.layers[3].mlp.experts[1].down_proj.weight.std().item() - scaled) < 3e-4
    assert abs(m.layers[3].mlp.shared_experts[0].down_proj.weight.std().item() - scaled) < 3e-4
    assert abs(m.layers[0].mlp.gate.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(m.norm.weight, torch.ones(256))


def test_loss_at_init_is_about_ln_vocab():
    torch.manual_seed(0)
    m = LLM(LLMconfig(vocab_size=2000, dim=128, n_layers=2, n_heads=4))
    x = ids(4, 64, vocab=2000)
    with torch.no_grad():
        loss = m(x, labels=x).loss.item()
    assert abs(loss - math.log(2000)) < 0.3


def test_bad_config_type():
    with pytest.raises(TypeError, match="LLMconfig"):
        LLM({"dim": 64})


# ---------------------------------------------------------------- loss
def test_loss_shift_and_ignore_index():
    m = tiny()
    x = ids(3, 12)
    labels = x.clone()
    labels[0, :5] = -100
    labels[2, 7] = -100
    with torch.no_grad():
        out = m(x, labels=labels)
        logits = out.logits
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(3) for t in range(11) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=ATOL, rtol=ATOL)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), ref, atol=ATOL, rtol=ATOL)


def test_all_ignored_labels_give_zero_not_nan():
    m = tiny()
    x = ids(1, 6)
    assert m(x, labels=torch.full_like(x, -100)).loss.item() == 0.0


def test_moe_aux_loss_is_added_and_exposed():
    m = tiny(use_moe=True).train()
    x = ids(2, 16)
    out = m(x, labels=x)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, lm_loss(out.logits, x) + out.aux_loss)
    out.loss.backward()
    assert m.layers[0].mlp.gate.weight.grad is not None and m.embed_tokens.weight.grad.abs().sum() > 0


def test_forward_errors():
    m = tiny()
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        m(ids(1, 65))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        m(ids(1, 5)[0])
    with pytest.raises(ValueError, match="pass the kv_caches"):
        m(ids(1, 5), start_pos=3)
    with pytest.raises(ValueError, match="one KVCache per layer"):
        m(ids(1, 5), kv_caches=[KVCache(1, 2, 64, 16)])
    with pytest.raises(ValueError, match="labels must have the shape"):
        m(ids(1, 5), labels=ids(1, 4))
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(ids(1, 5), attention_mask=torch.ones(1, 4))


# ---------------------------------------------------------------- cache, logits_to_keep, masks
def test_logits_to_keep():
    m = tiny()
    x = ids(2, 9)
    with torch.no_grad():
        full = m(x).logits
        torch.testing.assert_close(m(x, logits_to_keep=1).logits, full[:, -1:], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(m(x, logits_to_keep=3).logits, full[:, -3:], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kw", [{}, dict(use_moe=True)])
def test_kv_cache_continuation_equals_full_forward(kw):
    m = tiny(**kw)
    x = ids(2, 20)
    caches = [KVCache(2, 2, 64, 16) for _ in m.layers]
    with torch.no_grad():
        full = m(x).logits
        parts = [m(x[:, :8], kv_caches=caches).logits, m(x[:, 8:13], kv_caches=caches, start_pos=8).logits]
        parts += [m(x[:, t:t + 1], kv_caches=caches, start_pos=t).logits for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=ATOL)


def test_left_padding_mask_gives_each_sequence_its_own_logits():
    m = tiny()
    a, b = ids(1, 6, seed=2)[0], ids(1, 10, seed=3)[0]
    batch = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), a]), b])
    mask = torch.tensor([[0] * 4 + [1] * 6, [1] * 10])
    with torch.no_grad():
        out = m(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0, 4:], m(a[None]).logits[0], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(out[1], m(b[None]).logits[0], atol=ATOL, rtol=ATOL)
        assert torch.isfinite(out).all()


def test_lm_loss_and_num_items_in_batch():
    torch.manual_seed(0)
    model = LLM(LLMconfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :9] = -100
    out = model(ids, labels=labels)
    n = int((labels[:, 1:] != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=1).lm_loss
    torch.testing.assert_close(summed / n, out.lm_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=4 * n).lm_loss, out.lm_loss / 4)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert model(ids).lm_loss is None and model(ids).loss is None


def test_moe_aux_loss_skips_padding_in_the_forward_pass():
    """Defect: the aux loss counted padding positions. Padding (attention_mask 0, or label -100 without a mask) must
    not change it: a right-padded batch equals the unpadded sequence."""
    torch.manual_seed(0)
    model = LLM(LLMconfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=32, use_moe=True)).train()
    real = torch.randint(0, 64, (1, 10))
    padded = torch.cat([real, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    labels = padded.clone()
    labels[:, 10:] = -100
    alone = model(real, labels=real)
    with_mask = model(padded, labels=labels, attention_mask=mask)
    by_labels = model(padded, labels=labels)
    unmasked = model(padded)
    torch.testing.assert_close(with_mask.aux_loss, alone.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_labels.aux_loss, alone.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_mask.lm_loss, alone.lm_loss, atol=1e-5, rtol=0)
    assert (unmasked.aux_loss - alone.aux_loss).abs() > 1e-4, "without any mask every position counts"
