"""Grader for exercises/05_moe_exercises.ipynb: the router built from scratch - routing, the load-balancing loss, the
gate module (Part A); router z-loss, capacity with token dropping, expert-choice routing (Part B).

Where a learner's output is wrong, the grader recomputes the usual wrong implementations on the same input and,
when one of them reproduces the learner's numbers, names that mistake and says why it matters."""
import math

import torch
import torch.nn.functional as F

from grading import NotebookRun, assert_close, call, expect, same

NOTEBOOK = "05_moe_exercises.ipynb"


# --- Part A1: route -------------------------------------------------------------------------------------------------


def _route_reference(logits: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loop over tokens in float64: softmax by hand, experts sorted by probability, weights (renormalised)."""
    idx, weight, scores = [], [], []
    for z in logits.double().tolist():
        top = max(z)
        e = [math.exp(v - top) for v in z]
        s = [v / sum(e) for v in e]
        chosen = sorted(range(len(s)), key=lambda i: -s[i])[:k]
        total = sum(s[i] for i in chosen) if norm else 1.0
        idx.append(chosen)
        weight.append([s[i] / total for i in chosen])
        scores.append(s)
    return torch.tensor(idx), torch.tensor(weight).to(logits.dtype), torch.tensor(scores, dtype=torch.float32)


def _route(run: NotebookRun, logits: torch.Tensor, k: int, norm: bool):
    result = call(run, "route", logits, k, norm)
    if not (isinstance(result, tuple) and len(result) == 3):
        raise AssertionError(f"route should return (topk_idx, topk_weight, scores), got {type(result).__name__}")
    return result


def check_route(run: NotebookRun) -> None:
    """Against a loop over tokens and against zer02llm.moe.MoEgate (whose weight is the identity, so its logits are
    the test's), with and without renormalisation, for k = 1, 2, 3."""
    from zer02llm.moe import MoEgate

    g = torch.Generator().manual_seed(50)
    logits = torch.randn(12, 6, generator=g) * 2
    for k in (1, 2, 3):
        for norm in (True, False):
            topk_idx, topk_weight, scores = _route(run, logits, k, norm)
            want_idx, want_w, want_s = _route_reference(logits, k, norm)
            gate = MoEgate(6, 6, k, norm_topk_prob=norm).eval()
            with torch.no_grad():
                gate.weight.copy_(torch.eye(6))
                pkg_idx, pkg_w, _ = gate(logits)
            assert torch.equal(pkg_idx, want_idx) and torch.allclose(pkg_w, want_w, atol=1e-6), "grader bug"
            what = f"route(logits (12, 6), k={k}, norm_topk_prob={norm})"
            expect(f"{what} scores", scores, want_s, {
                "softmax over the wrong dimension (dim 0, the tokens): each token's probabilities over its E experts "
                "must sum to 1, softmax(dim=-1)": logits.softmax(dim=0),
            }, atol=1e-6)
            if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32:
                raise AssertionError(f"{what}: scores should be float32 (softmax(dim=-1, dtype=torch.float32))")
            if not (isinstance(topk_idx, torch.Tensor) and topk_idx.shape == want_idx.shape):
                raise AssertionError(f"{what}: topk_idx should be a tensor of shape {tuple(want_idx.shape)}")
            if not torch.equal(topk_idx.long(), want_idx):
                same_sets = torch.equal(topk_idx.long().sort(-1).values, want_idx.sort(-1).values)
                raise AssertionError(
                    f"{what}: topk_idx = {topk_idx.tolist()}, expected {want_idx.tolist()}"
                    + (" - the right experts in the wrong order: highest probability first (torch.topk's sorted order)"
                       if same_sets else " - the k experts with the highest probability s, per token")
                )
            top_logits = logits.gather(1, want_idx)
            renormalised = want_s.gather(1, want_idx) / want_s.gather(1, want_idx).sum(-1, keepdim=True)
            mistakes = {
                "the weights are the top-k logits themselves: take them from the softmax probabilities s": top_logits,
                "the weights are the top-k of the softmax over the tokens (dim 0): softmax over the experts, dim -1":
                    logits.softmax(dim=0).topk(k, dim=-1).values,
            }
            if norm:
                mistakes["not renormalised: with norm_topk_prob=True the k weights are divided by their sum, "
                         "g_i = s_i / Σ_top-k s_j, so they add up to 1"] = want_s.gather(1, want_idx)
            else:
                mistakes["renormalised (or a softmax over the top-k logits only, which gives the same numbers): with "
                         "norm_topk_prob=False the weights are the probabilities of the full softmax over all E "
                         "experts"] = renormalised
            expect(f"{what} topk_weight", topk_weight, want_w, mistakes, atol=1e-6)


def check_route_bf16(run: NotebookRun) -> None:
    """bfloat16 logits: probabilities in float32, the same experts, the weights back in bfloat16."""
    g = torch.Generator().manual_seed(51)
    logits = (torch.randn(64, 8, generator=g) * 2).to(torch.bfloat16)
    topk_idx, topk_weight, scores = _route(run, logits, 2, True)
    want_idx, want_w, want_s = _route_reference(logits, 2, True)
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32:
        raise AssertionError(
            f"route(bfloat16 logits): scores are {getattr(scores, 'dtype', type(scores).__name__)}, expected float32: "
            "compute the softmax in float32 (softmax(dim=-1, dtype=torch.float32)) - bfloat16 keeps 8 significant "
            "bits, so two experts whose probabilities differ in the third digit would tie"
        )
    expect("route(bfloat16 logits) scores", scores, want_s, {
        "the softmax is computed in bfloat16 and only then cast to float32: compute it in float32 "
        "(softmax(dim=-1, dtype=torch.float32)); bfloat16 keeps 8 significant bits": logits.softmax(-1).float(),
    }, atol=1e-6)
    assert isinstance(topk_idx, torch.Tensor) and torch.equal(topk_idx.long(), want_idx), (
        "route(bfloat16 logits): different experts from the float32 softmax's choice"
    )
    if not isinstance(topk_weight, torch.Tensor) or topk_weight.dtype != torch.bfloat16:
        raise AssertionError(
            f"route(bfloat16 logits): topk_weight is {getattr(topk_weight, 'dtype', type(topk_weight).__name__)}, "
            "expected bfloat16: cast the weights to the logits' dtype, so the experts' outputs are weighted in the "
            "model's dtype"
        )
    # 2**-7 relative: one bfloat16 step, for where the (float32) renormalisation is rounded
    assert_close(topk_weight, want_w, "route(bfloat16 logits) topk_weight", atol=1e-6, rtol=2**-7)


# --- Part A2: balance_loss ------------------------------------------------------------------------------------------


def _loss_reference(scores, topk_idx, alpha, mask=None, seq_aux=True, scale=None, count_padding=False,
                    divide_by_all=False, mean_over_all=False) -> torch.Tensor:
    """A loop in float64. The keyword switches reproduce the usual mistakes: `scale` replaces E/k, `count_padding`
    ignores the mask, `divide_by_all` divides by all T positions, `mean_over_all` averages over every sequence."""
    b, t, e = scores.shape
    k = topk_idx.shape[-1]
    scale = e / k if scale is None else scale
    real = [[True] * t for _ in range(b)] if mask is None or count_padding else mask.tolist()
    seqs = [[(i, j) for j in range(t)] for i in range(b)] if seq_aux else [[(i, j) for i in range(b) for j in range(t)]]
    losses = []
    for seq in seqs:
        tokens = [(i, j) for i, j in seq if real[i][j]]
        n = len(seq) if divide_by_all else len(tokens)
        if not tokens:
            if mean_over_all:
                losses.append(0.0)
            continue
        counts = [sum(int(c) == x for i, j in tokens for c in topk_idx[i, j]) for x in range(e)]
        p = [sum(float(scores[i, j, x]) for i, j in tokens) / n for x in range(e)]
        losses.append(alpha * sum(scale / n * counts[x] * p[x] for x in range(e)))
    return torch.tensor(sum(losses) / max(len(losses), 1), dtype=torch.float32)


def _loss_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 8, 4, generator=g) * 2
    logits[0, :, 0] += 3  # sequence 0 leans on expert 0: the loss is visibly unbalanced
    scores = logits.softmax(-1)
    topk_idx = scores.topk(2, dim=-1).indices
    mask = torch.arange(8) < torch.tensor([[8], [5], [2], [0]])  # 8, 5, 2 and no real tokens
    return scores, topk_idx, mask


def check_balance_loss(run: NotebookRun) -> None:
    """Against MoEgate.load_balancing_loss and a loop, per sequence and over the batch, with and without padding."""
    from zer02llm.moe import MoEgate

    scores, topk_idx, mask = _loss_inputs(52)
    alpha = 0.1
    e, k = 4, 2
    for token_mask in (None, mask):
        for seq_aux in (True, False):
            got = call(run, "balance_loss", scores, topk_idx, alpha, token_mask, seq_aux)
            want = _loss_reference(scores, topk_idx, alpha, token_mask, seq_aux)
            gate = MoEgate(1, e, k, aux_loss_alpha=alpha, seq_aux=seq_aux)
            pkg = gate.load_balancing_loss(scores, topk_idx.reshape(4, -1), token_mask)
            assert abs(pkg.item() - want.item()) < 1e-6, "grader bug: the loop and the package disagree"
            what = (f"balance_loss(seq_aux={seq_aux}, token_mask="
                    f"{'None' if token_mask is None else 'sequences of 8, 5, 2 and 0 real tokens'})")
            if isinstance(got, torch.Tensor) and got.dim() != 0:
                raise AssertionError(f"{what}: returned shape {tuple(got.shape)}, expected a scalar "
                                     "(per sequence: the mean over the sequences that have a real token)")
            scaling = "; f_i = E/(n·k)·count_i is scaled so that a perfectly balanced routing gives exactly alpha"

            def ref(**mistake) -> torch.Tensor:
                return _loss_reference(scores, topk_idx, alpha, token_mask, seq_aux, **mistake)

            expect(what, got, pkg.detach(), {
                "counts the padding tokens: with a token_mask, f and P are computed over the real tokens only "
                "(padding positions all route alike, and how many there are depends on batching, not on the data)":
                    ref(count_padding=True),
                "divides by all T positions instead of the n real tokens: f_i = E/(n·k)·count_i and P_i = (1/n)·Σ "
                "over the real tokens": ref(divide_by_all=True),
                "averages over every sequence, including those with no real token: average over the sequences that "
                "have one (a row of padding says nothing about balance)": ref(mean_over_all=True),
                "is missing the E/k scaling of f (f_i = count_i / n)" + scaling: ref(scale=1.0),
                "is missing the 1/k in the scaling of f (f_i = E·count_i / n)" + scaling: ref(scale=float(e)),
                "is missing the factor E in the scaling of f (f_i = count_i / (n·k))" + scaling: ref(scale=1 / k),
                ("computes the loss over the whole batch, but seq_aux=True asks for one loss per sequence, averaged"
                 if seq_aux else "computes one loss per sequence, but seq_aux=False treats the whole batch as one "
                 "sequence"): _loss_reference(scores, topk_idx, alpha, token_mask, not seq_aux),
                "is not multiplied by alpha": _loss_reference(scores, topk_idx, 1.0, token_mask, seq_aux),
            }, atol=1e-6)
            if got.dtype != torch.float32:
                raise AssertionError(f"{what}: dtype {got.dtype}, expected float32")


def check_balance_loss_edges(run: NotebookRun) -> None:
    """Balanced routing gives alpha; no real token gives 0, not NaN; the gradient flows through P only."""
    pairs = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]).repeat(2, 1).view(1, 8, 2)
    scores = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(53)).softmax(-1)
    got = call(run, "balance_loss", scores, pairs, 0.01, None, False)
    assert isinstance(got, torch.Tensor) and abs(got.item() - 0.01) < 1e-6, (
        f"balance_loss of a perfectly balanced routing = {got!r}, expected alpha = 0.01 whatever the probabilities: "
        "every f_i is then 1 and Σ_i P_i = 1"
    )
    scores, topk_idx, mask = _loss_inputs(54)
    for seq_aux in (True, False):
        got = call(run, "balance_loss", scores, topk_idx, 0.1, torch.zeros_like(mask), seq_aux)
        assert isinstance(got, torch.Tensor) and got.item() == 0, (
            f"balance_loss(seq_aux={seq_aux}) of a batch with no real token = {got!r}, expected 0 (clamp the token "
            "count: 0 / max(n, 1), not 0 / 0)"
        )
    s = scores.clone().requires_grad_(True)
    got = call(run, "balance_loss", s, topk_idx, 0.1, mask, True)
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise AssertionError("balance_loss has no gradient: P_i = mean of the probabilities must stay in the graph")
    (grad,) = torch.autograd.grad(got, s)
    s_ref = scores.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(_loss_torch(s_ref, topk_idx, 0.1, mask), s_ref)
    assert_close(grad, grad_ref, "gradient of balance_loss with respect to the scores (f_i is a count, with no "
                 "gradient: only P_i carries one)", atol=1e-7)


def _loss_torch(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float, mask: torch.Tensor) -> torch.Tensor:
    """The package's loss (per sequence, with a mask), differentiable, for the gradient check."""
    from zer02llm.moe import MoEgate

    gate = MoEgate(1, scores.shape[-1], topk_idx.shape[-1], aux_loss_alpha=alpha, seq_aux=True)
    return gate.load_balancing_loss(scores, topk_idx.reshape(scores.shape[0], -1), mask)


# --- Part A3: MyMoEGate ---------------------------------------------------------------------------------------------


def _gates(run: NotebookRun, seed: int, **kwargs):
    """The learner's gate and MoEgate with the same (seeded) weight."""
    from zer02llm.moe import MoEgate

    mine = call(run, "MyMoEGate", 16, 4, 2, **kwargs)
    if not isinstance(mine, torch.nn.Module):
        raise AssertionError(f"MyMoEGate(...) should be an nn.Module, got {type(mine).__name__}")
    w = getattr(mine, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or tuple(w.shape) != (4, 16):
        raise AssertionError("MyMoEGate(16, 4, 2) needs an nn.Parameter `weight` of shape (4, 16) = (n_routed_experts, "
                             f"dim), the router W_r; got {None if w is None else tuple(w.shape)}")
    ref = MoEgate(16, 4, 2, **kwargs)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)))
        mine.weight.copy_(ref.weight)
    return mine, ref


def _gate_forward(mine: torch.nn.Module, *args):
    try:
        out = mine(*args)
    except NotImplementedError:
        raise AssertionError("MyMoEGate.forward is not implemented yet: replace `raise NotImplementedError()`") \
            from None
    except Exception as e:
        raise AssertionError(f"MyMoEGate.forward raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, tuple) and len(out) == 3):
        raise AssertionError(f"MyMoEGate.forward should return (topk_idx, topk_weight, aux_loss), got "
                             f"{type(out).__name__}")
    return out


def check_my_moe_gate(run: NotebookRun) -> None:
    """Against MoEgate with the same weight: training mode with padding, per sequence and over the batch, with and
    without renormalisation; the loss's gradient reaches the router."""
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(55))
    mask = torch.arange(6) < torch.tensor([[6], [4], [1]])
    for seq_aux, norm in ((True, True), (False, True), (True, False)):
        mine, ref = _gates(run, 56, norm_topk_prob=norm, aux_loss_alpha=0.1, seq_aux=seq_aux)
        mine.train()
        ref.train()
        idx, w, aux = _gate_forward(mine, x, mask)
        ref_idx, ref_w, ref_aux = ref(x, mask)
        what = f"MyMoEGate(norm_topk_prob={norm}, seq_aux={seq_aux}) vs MoEgate"
        assert isinstance(idx, torch.Tensor) and idx.shape == ref_idx.shape and torch.equal(idx.long(), ref_idx), (
            f"{what}: different experts; topk_idx should be (B·T, k) = {tuple(ref_idx.shape)}, as MoEgate's"
        )
        assert_close(w, ref_w.detach(), f"{what}: topk_weight", atol=1e-6)
        unmasked = ref(x)[2].detach()
        expect(f"{what}: aux_loss (training mode, sequences of 6, 4 and 1 real tokens)", aux, ref_aux.detach(), {
            "the token_mask does not reach the loss: pass it to balance_loss (padding must not count)": unmasked,
            "is not multiplied by aux_loss_alpha": ref_aux.detach() / 0.1,
        }, atol=1e-6)
        (g,) = torch.autograd.grad(aux, mine.weight)
        (g_ref,) = torch.autograd.grad(ref_aux, ref.weight)
        assert_close(g, g_ref, f"{what}: gradient of aux_loss with respect to the router weight", atol=1e-7)


def check_my_moe_gate_modes(run: NotebookRun) -> None:
    """The loss is zero (float32, no graph) in evaluation mode and when alpha is 0; bfloat16 in, bfloat16 weights."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(57))
    mine, ref = _gates(run, 58, aux_loss_alpha=0.1)
    idx, w, aux = _gate_forward(mine.eval(), x)
    ref_idx, ref_w, _ = ref.eval()(x)
    if not isinstance(aux, torch.Tensor) or aux.item() != 0 or aux.requires_grad:
        raise AssertionError(f"MyMoEGate in evaluation mode returns aux_loss = {aux!r}: the balancing loss is a "
                             "training loss - when not self.training, return a float32 zero that builds no graph")
    assert torch.equal(idx.long(), ref_idx), "MyMoEGate in evaluation mode routes differently from MoEgate"
    mine, ref = _gates(run, 58, aux_loss_alpha=0.0)
    aux = _gate_forward(mine.train(), x)[2]
    if not isinstance(aux, torch.Tensor) or aux.item() != 0 or aux.requires_grad:
        raise AssertionError(f"MyMoEGate(aux_loss_alpha=0.0) in training mode returns aux_loss = {aux!r}: alpha = 0 "
                             "switches the balancing loss off - return a float32 zero that builds no graph")
    if aux.dtype != torch.float32:
        raise AssertionError(f"MyMoEGate's zero aux_loss is {aux.dtype}, expected float32 (the loss's dtype)")
    mine, ref = _gates(run, 59, aux_loss_alpha=0.1)
    mine, ref = mine.to(torch.bfloat16).train(), ref.to(torch.bfloat16).train()
    xb = x.to(torch.bfloat16)
    idx, w, aux = _gate_forward(mine, xb)
    ref_idx, ref_w, ref_aux = ref(xb)
    assert torch.equal(idx.long(), ref_idx), "MyMoEGate on bfloat16 input routes differently from MoEgate"
    if w.dtype != torch.bfloat16 or aux.dtype != torch.float32:
        raise AssertionError(f"MyMoEGate on bfloat16 input returns topk_weight {w.dtype} and aux_loss {aux.dtype}; "
                             "expected bfloat16 weights (the activations' dtype) and a float32 loss")
    assert_close(w, ref_w, "MyMoEGate on bfloat16 input: topk_weight", atol=1e-6, rtol=2**-7)
    assert_close(aux.detach(), ref_aux.detach(), "MyMoEGate on bfloat16 input: aux_loss", atol=1e-6)


# --- Part B ---------------------------------------------------------------------------------------------------------


def _z_reference(logits: torch.Tensor) -> torch.Tensor:
    """(log Σ exp z)^2 averaged over tokens, in float64 with the max subtracted by hand."""
    z = logits.double().reshape(-1, logits.shape[-1])
    m = z.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(dim=-1))
    return (lse**2).mean().float()


def check_z_loss_values(run: NotebookRun) -> None:
    torch.manual_seed(0)
    for shape in ((6, 4), (2, 5, 8), (3, 2, 2, 16)):
        logits = torch.randn(shape) * 3
        got = call(run, "router_z_loss", logits)
        assert_close(got, _z_reference(logits), f"router_z_loss for logits of shape {shape}", atol=1e-5, rtol=1e-5)


def check_z_loss_is_stable_and_float32(run: NotebookRun) -> None:
    torch.manual_seed(1)
    big = 1000 + torch.randn(5, 8)
    got = call(run, "router_z_loss", big)
    assert torch.isfinite(got).all(), (
        "router_z_loss(1000 + noise) is not finite: use torch.logsumexp instead of exp/log"
    )
    assert_close(got, _z_reference(big), "router_z_loss for logits around 1000", atol=1e-2, rtol=1e-5)
    bf16 = (torch.randn(4, 6) * 2).to(torch.bfloat16)
    got = call(run, "router_z_loss", bf16)
    assert_close(got, _z_reference(bf16.float()), "router_z_loss for bf16 logits (compute and return float32)")
    logits = torch.randn(3, 4, requires_grad=True)
    got = call(run, "router_z_loss", logits)
    assert got.requires_grad, "router_z_loss must be differentiable (it is a training loss)"
    (g,) = torch.autograd.grad(got, logits)
    want = 2 * torch.logsumexp(logits.detach(), -1, keepdim=True) * logits.detach().softmax(-1) / 3
    assert_close(g, want, "gradient of router_z_loss (2·lse·softmax/N)")


def check_expert_capacity(run: NotebookRun) -> None:
    for n, e, k, cf in ((16, 4, 2, 1.0), (16, 4, 2, 1.25), (10, 3, 1, 1.0), (7, 8, 2, 0.5), (1024, 64, 8, 1.5)):
        got = call(run, "expert_capacity", n, e, k, cf)
        want = math.ceil(cf * n * k / e)
        assert isinstance(got, int) and got == want, (
            f"expert_capacity({n}, {e}, {k}, {cf}) = {got!r}, expected {want} (an int)"
        )


def _random_topk(n: int, e: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


def _keep_reference(topk_idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Loop in GShard priority: slot 0 of all tokens, then slot 1, ...; each expert takes the first `capacity`."""
    n, k = topk_idx.shape
    used = [0] * n_experts
    keep = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        for t in range(n):
            e = int(topk_idx[t, j])
            if used[e] < capacity:
                keep[t, j], used[e] = True, used[e] + 1
    return keep


def check_capacity_keep_mask(run: NotebookRun) -> None:
    for n, e, k, cap, seed in ((12, 4, 2, 3, 0), (20, 5, 1, 2, 1), (9, 6, 3, 4, 2), (8, 4, 2, 100, 3), (8, 2, 2, 0, 4)):
        topk_idx = _random_topk(n, e, k, seed)
        got = call(run, "capacity_keep_mask", topk_idx, e, cap)
        want = _keep_reference(topk_idx, e, cap)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bool, (
            "capacity_keep_mask should return a bool tensor"
        )
        assert got.shape == want.shape, f"capacity_keep_mask shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(got, want), (
            f"capacity_keep_mask(capacity={cap}) differs for topk_idx={topk_idx.tolist()}:\n"
            f" got  {got.int().tolist()}\n want {want.int().tolist()}\n"
            "(priority: all first choices in token order, then all second choices, ...)"
        )


def _moe(seed: int, n_shared: int = 1):
    from zer02llm.moe import MoEFFN
    from zer02llm.utils import seed_everything

    seed_everything(seed)
    return MoEFFN(12, 4, 2, n_shared_experts=n_shared, hidden_dim=20).eval()


def check_capacity_moe_forward(run: NotebookRun) -> None:
    moe = _moe(10)
    torch.manual_seed(11)
    x = torch.randn(2, 8, 12)
    h = x.reshape(-1, 12)
    idx, w, _ = moe.gate(x)
    for cf in (0.5, 1.0, 100.0):
        cap = math.ceil(cf * h.shape[0] * 2 / 4)
        keep = _keep_reference(idx, 4, cap)
        with torch.no_grad():
            rows = []
            for t in range(h.shape[0]):
                y_t = sum(w[t, j] * moe.experts[int(idx[t, j])](h[t]) for j in range(2) if keep[t, j])
                rows.append(y_t + moe.shared_experts[0](h[t]))
            want = torch.stack(rows).view(x.shape)
            got = call(run, "capacity_moe_forward", moe, x, cf)
        assert_close(got, want, f"capacity_moe_forward(capacity_factor={cf})")


def _ec_reference(logits: torch.Tensor, capacity: int):
    scores = logits.double().softmax(-1)
    idx, wt = [], []
    for e in range(logits.shape[1]):
        order = sorted(range(logits.shape[0]), key=lambda t: -scores[t, e].item())[:capacity]
        idx.append(order)
        wt.append([scores[t, e].item() for t in order])
    return torch.tensor(idx), torch.tensor(wt, dtype=torch.float32)


def check_expert_choice_route(run: NotebookRun) -> None:
    torch.manual_seed(20)
    for n, e, cap in ((10, 4, 3), (16, 8, 2), (6, 3, 6)):
        logits = torch.randn(n, e) * 2
        got = call(run, "expert_choice_route", logits, cap)
        assert isinstance(got, tuple) and len(got) == 2, "expert_choice_route should return (token_idx, weight)"
        want_idx, want_w = _ec_reference(logits, cap)
        assert got[0].shape == want_idx.shape and torch.equal(got[0].long(), want_idx), (
            f"expert_choice_route token_idx: got {got[0].tolist()}, expected {want_idx.tolist()} (each row: expert "
            f"e's top {cap} tokens by softmax score, highest first)"
        )
        assert_close(got[1], want_w, "expert_choice_route weights (the softmax scores s[t, e], float32)", atol=1e-6)


def check_expert_choice_forward(run: NotebookRun) -> None:
    moe = _moe(30)
    torch.manual_seed(31)
    x = torch.randn(2, 5, 12)
    h = x.reshape(-1, 12)
    for cap in (2, 4, 10):
        idx, w = _ec_reference(h @ moe.gate.weight.detach().T, cap)
        with torch.no_grad():
            rows = []
            for t in range(h.shape[0]):
                y_t = moe.shared_experts[0](h[t])
                for e in range(4):
                    hits = (idx[e] == t).nonzero()
                    if len(hits):
                        y_t = y_t + w[e, hits[0, 0]] * moe.experts[e](h[t])
                rows.append(y_t)
            want = torch.stack(rows).view(x.shape)
            got = call(run, "expert_choice_forward", moe, x, cap)
        assert_close(got, want, f"expert_choice_forward(capacity={cap})")
