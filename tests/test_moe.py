"""zer02llm.moe: router and MoE layer against a per-token loop, hand-computed losses and HF's Qwen3-MoE (float32, 1e-5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from zer02llm.ffn import FFN
from zer02llm.moe import MoEFFN, MoEgate

ATOL = 1e-5  # float32


def naive_moe(moe, x):
    """Reference: for every token, its k experts one at a time (weights from the gate), plus the shared experts."""
    h = x.reshape(-1, x.shape[-1])
    idx, w, _ = moe.gate(x)
    rows = []
    for t in range(h.shape[0]):
        y = sum(w[t, j] * moe.experts[int(idx[t, j])](h[t]) for j in range(idx.shape[1]))
        rows.append(y + sum(s(h[t]) for s in moe.shared_experts))
    return torch.stack(rows).view(x.shape)


def reference_gate(x, weight, k, norm):
    """Softmax over all experts in float64, top-k, optional renormalisation."""
    probs = F.linear(x.reshape(-1, x.shape[-1]).double(), weight.double()).softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True) if norm else w), probs


def identity_gate(n_experts, k, alpha, seq_aux):
    gate = MoEgate(n_experts, n_experts, k, aux_loss_alpha=alpha, seq_aux=seq_aux)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(n_experts))  # logits = input
    return gate


def hf_block(moe, implementation):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(
        hidden_size=moe.gate.weight.shape[1],
        moe_intermediate_size=moe.experts[0].gate_proj.out_features,
        num_experts=len(moe.experts),
        num_experts_per_tok=moe.gate.top_k,
        norm_topk_prob=moe.gate.norm_topk_prob,
    )
    cfg._experts_implementation = implementation
    block = Qwen3MoeSparseMoeBlock(cfg).to(moe.gate.weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.gate.weight)
        for e, ex in enumerate(moe.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            block.experts.down_proj[e].copy_(ex.down_proj.weight)
    return block


# ---------------------------------------------------------------- gate


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_matches_reference(norm, k):
    torch.manual_seed(0)
    gate = MoEgate(24, 6, k, norm_topk_prob=norm).eval()
    x = torch.randn(3, 10, 24)
    idx, w, aux = gate(x)
    ref_idx, ref_w, _ = reference_gate(x, gate.weight, k, norm)
    assert idx.shape == w.shape == (30, k) and idx.dtype == torch.long and w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w.float(), atol=1e-6, rtol=1e-6)
    assert aux.item() == 0.0 and not aux.requires_grad


@pytest.mark.parametrize("norm", [True, False])
def test_gate_matches_hf_qwen3_moe_router(norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    gate = MoEgate(32, 8, 2, norm_topk_prob=norm).eval()
    hf = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm))
    hf.load_state_dict(gate.state_dict())
    x = torch.randn(2, 9, 32)
    idx, w, _ = gate(x)
    _, hf_w, hf_idx = hf(x)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, atol=0, rtol=0)


def test_aux_loss_by_hand():
    # Two sequences, E=2, top-1, logits (ln3, 0) -> probs (0.75, 0.25). Worked out in notebooks/05_moe.ipynb:
    # per sequence: (1.5 + 1.0)/2 * 0.1 = 0.125; over the batch: f=(1.5, 0.5), P=(0.625, 0.375) -> 1.125 * 0.1.
    l3 = math.log(3.0)
    x = torch.tensor([[[l3, 0.0], [l3, 0.0]], [[l3, 0.0], [0.0, l3]]])
    for seq_aux, expected in ((True, 0.125), (False, 0.1125)):
        idx, w, aux = identity_gate(2, 1, 0.1, seq_aux)(x)
        assert idx.flatten().tolist() == [0, 0, 0, 1] and torch.all(w == 1)
        assert aux.dtype == torch.float32 and abs(aux.item() - expected) < 1e-6


def explicit_aux(probs, idx, n_experts, k, alpha, batch):
    """Switch loss with explicit loops: per sequence b, f_i = E/(T k) * count_i, P_i = mean prob; averaged over b."""
    probs, idx = probs.view(batch, -1, n_experts), idx.view(batch, -1, k)
    total = 0.0
    for b in range(batch):
        T = probs.shape[1]
        f = [n_experts / (T * k) * int((idx[b] == i).sum()) for i in range(n_experts)]
        P = [float(probs[b, :, i].mean()) for i in range(n_experts)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    return alpha * total / batch


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_matches_explicit_loops(seq_aux):
    torch.manual_seed(0)
    gate = MoEgate(12, 5, 2, aux_loss_alpha=0.03, seq_aux=seq_aux)
    x = torch.randn(3, 7, 12)
    idx, _, aux = gate(x)
    _, _, probs = reference_gate(x, gate.weight.detach(), 2, True)
    batch = 3 if seq_aux else 1
    assert abs(aux.item() - explicit_aux(probs, idx, 5, 2, 0.03, batch)) < 1e-6
    assert aux.requires_grad
    (g,) = torch.autograd.grad(aux, gate.weight)
    assert g.abs().sum() > 0  # the balancing loss trains the router


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balanced_routing_gives_alpha(seq_aux):
    # every expert gets the same number of assignments in every sequence -> f_i = 1 -> loss = alpha * sum P = alpha
    torch.manual_seed(0)
    pairs = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]).repeat(2, 1, 1)  # (B=2, T=4, k=2)
    logits = torch.rand(2, 4, 4).scatter(2, pairs, 2 + torch.rand(2, 4, 2))
    _, _, aux = identity_gate(4, 2, 0.01, seq_aux)(logits)
    assert abs(aux.item() - 0.01) < 1e-7
    # a collapsed, confident router pays E/used times more (top-1 of 4 experts, everything on expert 0)
    _, _, aux = identity_gate(4, 1, 0.01, seq_aux)(torch.tensor([[[50.0, 0, 0, 0]] * 4] * 2))
    assert abs(aux.item() - 0.04) < 1e-6


def test_aux_loss_off_in_eval_and_when_alpha_is_zero():
    x = torch.randn(2, 5, 8)
    for gate in (MoEgate(8, 4, 2).eval(), MoEgate(8, 4, 2, aux_loss_alpha=0.0).train()):
        aux = gate(x)[2]
        assert aux.item() == 0.0 and aux.shape == () and not aux.requires_grad


def test_gate_accepts_flat_tokens_as_one_sequence():
    torch.manual_seed(0)
    gate = MoEgate(8, 4, 2, seq_aux=True)
    x = torch.randn(10, 8)
    idx, w, aux = gate(x)
    idx3, w3, aux3 = gate(x.unsqueeze(0))
    assert torch.equal(idx, idx3) and torch.equal(w, w3) and torch.allclose(aux, aux3)


# ---------------------------------------------------------------- padding: the token mask


def padded_batch(lengths, dim, seed=0):
    """Sequences of the given lengths, padded to the longest with garbage (large random vectors), and their mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    seqs = [torch.randn(n, dim, generator=g) for n in lengths]
    x = 10 * torch.randn(len(lengths), T, dim, generator=g) + 3  # garbage everywhere...
    for b, s in enumerate(seqs):
        x[b, : len(s)] = s  # ...then the real tokens at the front
    mask = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)
    return seqs, x, mask


def unmasked_switch_loss(gate, scores, topk_idx):
    """The loss before the token mask existed (every position counted): the None path must give these numbers."""
    if not gate.seq_aux:
        scores, topk_idx = scores.reshape(1, -1, scores.shape[-1]), topk_idx.reshape(1, -1)
    ones = torch.ones_like(topk_idx, dtype=scores.dtype)
    counts = torch.zeros_like(scores[:, 0]).scatter_add_(1, topk_idx, ones)
    f = counts * (gate.n_routed_experts / topk_idx.shape[1])
    return gate.alpha * (f * scores.mean(dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("seq_aux", [True, False])
def test_padding_does_not_change_the_aux_loss(seq_aux):
    torch.manual_seed(0)
    gate = MoEgate(12, 5, 2, aux_loss_alpha=0.1, seq_aux=seq_aux)
    seqs, x, mask = padded_batch([7, 4, 1, 6], 12)
    if seq_aux:  # each sequence alone, unpadded, then the mean over sequences
        want = torch.stack([gate(s.unsqueeze(0))[2] for s in seqs]).mean()
    else:  # the real tokens of the whole batch as one sequence
        want = gate(torch.cat(seqs))[2]
    got = gate(x, token_mask=mask)[2]
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    assert abs(gate(x)[2].item() - want.item()) > 1e-3  # without the mask the padding does change it
    for m in (mask.long(), mask.float()):  # 0/1 masks work like bool ones
        assert torch.equal(gate(x, token_mask=m)[2], got)
    # the same through MoEFFN, whose output the mask does not change
    moe = MoEFFN(12, 5, 2, hidden_dim=16, aux_loss_alpha=0.1, seq_aux=seq_aux)
    moe.gate.load_state_dict(gate.state_dict())
    y, aux = moe(x, token_mask=mask)
    assert torch.equal(aux, got) and torch.equal(y, moe(x)[0])


@pytest.mark.parametrize("seq_aux", [True, False])
def test_mask_changes_only_the_loss(seq_aux):
    torch.manual_seed(1)
    gate = MoEgate(12, 6, 3, seq_aux=seq_aux)
    _, x, mask = padded_batch([5, 2, 8], 12, seed=1)
    for mode in ("train", "eval"):
        getattr(gate, mode)()
        idx, w, _ = gate(x)
        idx_m, w_m, _ = gate(x, token_mask=mask)
        assert torch.equal(idx, idx_m) and torch.equal(w, w_m)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_all_ones_mask_equals_no_mask(seq_aux):
    torch.manual_seed(2)
    gate = MoEgate(16, 8, 2, aux_loss_alpha=0.01, seq_aux=seq_aux)
    for x in (torch.randn(3, 11, 16), torch.randn(13, 16)):  # (B, T, dim) and flat tokens
        aux = gate(x)[2]
        for ones in (torch.ones(x.shape[:-1], dtype=torch.bool), torch.ones(x.shape[:-1]), torch.tensor(True)):
            assert torch.equal(gate(x, token_mask=ones)[2], aux)  # a mask of ones (or one broadcast True)
        # and no mask gives the unmasked formula's value (bit for bit on the CPU today; 1e-7 stated)
        scores = F.linear(x.reshape(-1, 16), gate.weight).softmax(-1, dtype=torch.float32)
        idx = scores.topk(2, dim=-1).indices
        batch = x.shape[0] if x.dim() == 3 else 1
        old = unmasked_switch_loss(gate, scores.view(batch, -1, 8), idx.view(batch, -1))
        torch.testing.assert_close(aux, old, atol=1e-7, rtol=0)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_all_padding_rows_are_ignored_without_nan(seq_aux):
    torch.manual_seed(3)
    gate = MoEgate(12, 4, 2, aux_loss_alpha=0.1, seq_aux=seq_aux)
    seqs, x, mask = padded_batch([6, 0, 3, 0], 12, seed=3)
    got = gate(x, token_mask=mask)[2]
    real = [s for s in seqs if len(s)]
    if seq_aux:  # the mean over the two sequences that have tokens, not over four
        want = torch.stack([gate(s)[2] for s in real]).mean()
    else:
        want = gate(torch.cat(real))[2]
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    # no real token at all: 0, finite, with finite (zero) gradients
    x = x.requires_grad_()
    aux = gate(x, token_mask=torch.zeros(4, 6, dtype=torch.bool))[2]
    assert aux.item() == 0.0
    g_x, g_w = torch.autograd.grad(aux, [x, gate.weight])
    assert torch.count_nonzero(g_x) == 0 and torch.count_nonzero(g_w) == 0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_padded_inputs_do_not_reach_the_aux_loss(seq_aux):
    torch.manual_seed(4)
    gate = MoEgate(12, 5, 2, aux_loss_alpha=0.1, seq_aux=seq_aux)
    _, x, mask = padded_batch([7, 3, 5], 12, seed=4)
    x = x.requires_grad_()
    aux = gate(x, token_mask=mask)[2]
    g_x, g_w = torch.autograd.grad(aux, [x, gate.weight])
    assert torch.count_nonzero(g_x[~mask]) == 0 and torch.count_nonzero(g_x[mask]) > 0
    # perturbing the padding (here: any values at all) changes neither the loss nor the router's gradient
    x2 = x.detach().clone()
    x2[~mask] = 100 * torch.randn(int((~mask).sum()), 12)
    aux2 = gate(x2, token_mask=mask)[2]
    (g_w2,) = torch.autograd.grad(aux2, gate.weight)
    assert torch.equal(aux2, aux)
    torch.testing.assert_close(g_w2, g_w, atol=1e-7, rtol=1e-6)


def test_bad_token_mask_shape_raises():
    gate = MoEgate(8, 4, 2)
    match = r"token_mask of shape \(2, 4\) does not broadcast to x's leading dims \(2, 5\)"
    with pytest.raises(ValueError, match=match):
        gate(torch.randn(2, 5, 8), token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask of shape"):
        MoEFFN(8, 4, 2)(torch.randn(2, 5, 8), token_mask=torch.ones(2, 5, 1))


# ---------------------------------------------------------------- MoE layer


@pytest.mark.parametrize("n_shared,norm,k", [(0, True, 2), (2, False, 3), (1, True, 1)])
def test_dispatch_matches_naive_loop_forward_and_grads(n_shared, norm, k):
    torch.manual_seed(0)
    moe = MoEFFN(16, 5, k, n_shared_experts=n_shared, hidden_dim=24, norm_topk_prob=norm, aux_loss_alpha=0.01)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = moe(x)
    y_ref = naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    params = [x, *moe.parameters()]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_one_expert_top1_is_the_dense_ffn():
    torch.manual_seed(0)
    moe = MoEFFN(16, 1, 1, hidden_dim=24)
    dense = FFN(16, hidden_dim=24)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 4, 16)
    y, aux = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=1e-6)
    assert abs(aux.item() - 0.01) < 1e-7  # one expert is perfectly balanced


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("norm", [True, False])
def test_matches_hf_qwen3_moe_sparse_block(implementation, norm):
    torch.manual_seed(0)
    moe = MoEFFN(32, 8, 2, hidden_dim=48, norm_topk_prob=norm).eval()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(moe(x)[0], hf_block(moe, implementation)(x), atol=ATOL, rtol=1e-5)


def test_matches_hf_qwen3_moe_sparse_block_in_bf16():
    torch.manual_seed(0)
    moe = MoEFFN(32, 4, 2, hidden_dim=64).eval().to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    y = moe(x)[0]
    y_hf = hf_block(moe, "eager")(x)
    assert y.dtype == y_hf.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_hf, atol=1e-2, rtol=1e-2)  # bf16: ~3 significant digits


def test_unused_expert_gets_zero_grads_not_none():
    torch.manual_seed(0)
    moe = MoEFFN(16, 4, 2, n_shared_experts=1, hidden_dim=32)
    with torch.no_grad():
        moe.gate.weight[3] = 0.0
        moe.gate.weight[3, 0] = -10.0
    x = torch.randn(4, 8, 16)
    x[..., 0] += 5.0
    assert 3 not in moe.gate(x)[0].flatten().tolist()
    y, aux = moe(x)
    (y.square().mean() + aux).backward()
    assert [n for n, p in moe.named_parameters() if p.grad is None] == []
    assert all(torch.count_nonzero(p.grad) == 0 for p in moe.experts[3].parameters())
    assert all(torch.count_nonzero(p.grad) > 0 for p in moe.experts[0].parameters())


def test_bf16_in_bf16_out_and_aux_float32():
    moe = MoEFFN(16, 4, 2, n_shared_experts=1, hidden_dim=32).to(torch.bfloat16)
    y, aux = moe(torch.randn(2, 8, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32 and aux.item() > 0


def test_autocast_bf16_training_step():
    torch.manual_seed(0)
    moe = MoEFFN(16, 4, 2, n_shared_experts=1, hidden_dim=32)
    x = torch.randn(2, 8, 16)
    y_ref = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)  # float32 residual stream, bf16 experts: summed in float32
    assert y.dtype == torch.float32 and aux.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2)
    (y.square().mean() + aux).backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_shared_experts_are_added_and_zero_means_none():
    torch.manual_seed(0)
    moe_s = MoEFFN(16, 4, 2, n_shared_experts=2, hidden_dim=32).eval()
    moe_r = MoEFFN(16, 4, 2, n_shared_experts=0, hidden_dim=32).eval()
    assert [n for n, _ in moe_r.named_parameters() if "shared" in n] == []
    assert not any("shared" in key for key in moe_r.state_dict())
    assert len(moe_s.shared_experts) == 2 and all(isinstance(s, FFN) for s in moe_s.shared_experts)
    moe_r.load_state_dict({k: v for k, v in moe_s.state_dict().items() if not k.startswith("shared_experts.")})
    x = torch.randn(2, 8, 16)
    expected = moe_r(x)[0] + moe_s.shared_experts[0](x) + moe_s.shared_experts[1](x)
    torch.testing.assert_close(moe_s(x)[0], expected, atol=ATOL, rtol=1e-5)


def test_layout_contract():
    moe = MoEFFN(16, 6, 2, n_shared_experts=1, hidden_dim=40)
    assert moe.gate.weight.shape == (6, 16)
    assert len(moe.experts) == 6 and all(isinstance(e, FFN) for e in moe.experts)
    assert moe.experts[0].gate_proj.weight.shape == (40, 16)
    assert MoEFFN(64, 2, 1).experts[0].gate_proj.out_features == 192  # hidden_dim=None: the 8/3 rule
    assert MoEFFN(64, 2, 1, multiple_of=32).experts[0].gate_proj.out_features == 192
    y, aux = moe(torch.randn(5, 16))  # flat tokens work too
    assert y.shape == (5, 16)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    moe = MoEFFN(16, 4, 2, hidden_dim=32, dropout=0.5)
    x = torch.randn(2, 8, 16)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be between 1 and n_routed_experts=4"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0 must be between 1"),
        ({"n_routed_experts": 0, "num_experts_per_tok": 1}, "n_routed_experts must be a positive"),
        ({"n_shared_experts": -1}, "n_shared_experts must be >= 0"),
        ({"aux_loss_alpha": -0.5}, "aux_loss_alpha must be >= 0"),
        ({"dim": 0}, "dim must be a positive"),
        ({"hidden_dim": 0}, "hidden_dim must be a positive"),
        ({"dropout": 1.5}, "dropout is a probability"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MoEFFN(**args)
