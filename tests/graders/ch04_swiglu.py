"""Grader for exercises/04_swiglu_exercises.ipynb: the hidden-size rule and the SwiGLU FFN built from scratch
(Part A); matched hidden sizes, the GLU family, the fused gate_up layout (Part B).

Where a learner's output is wrong, the grader recomputes the usual wrong implementations with the learner's own
weights and, when one of them reproduces the learner's numbers, names that mistake and says why it matters."""
import torch
import torch.nn.functional as F

from grading import NotebookRun, assert_close, call, expect, get, same

NOTEBOOK = "04_swiglu_exercises.ipynb"

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / 2**0.5)),
    "gelu_tanh": lambda a: 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a**3))),
    "silu": lambda a: a / (1 + torch.exp(-a)),
}


# --- Part A: my_swiglu_hidden_dim, MySwiGLU ------------------------------------------------------------------------


def _rule_reference(dim: int, multiple_of: int) -> int:
    """Brute force: the smallest multiple of `multiple_of` that is at least ⌊8·dim/3⌋."""
    h = multiple_of
    while h < 8 * dim // 3:
        h += multiple_of
    return h


def _rule_mistakes(dim: int, m: int) -> dict[str, int]:
    """What the usual wrong hidden-size rules give, each with the message that names it."""
    floor = 8 * dim // 3
    return {
        "rounds DOWN to a multiple of multiple_of: the rule rounds up, so the FFN never has fewer hidden units than "
        "⌊8·dim/3⌋": floor // m * m,
        "rounds to the NEAREST multiple of multiple_of: the rule always rounds up": (floor + m // 2) // m * m,
        "adds a whole multiple_of when ⌊8·dim/3⌋ already is a multiple: round up only what is not (a width that is "
        "already a multiple stays)": (floor // m + 1) * m,
        "rounds 8·dim/3 up before rounding to the multiple: the rule floors it first, ⌊8·dim/3⌋ (8 * dim // 3)":
            (-(-8 * dim // 3) + m - 1) // m * m,
        "uses 4·dim, the plain MLP's width: a gated FFN has three matrices instead of two, so 2/3 of 4·dim = 8/3·dim "
        "keeps the same parameter budget": (4 * dim + m - 1) // m * m,
        "uses 2/3·dim: the budget to match is that of a 4·dim MLP, so 2/3 of 4·dim = 8/3·dim":
            (2 * dim // 3 + m - 1) // m * m,
    }


def check_my_swiglu_hidden_dim(run: NotebookRun) -> None:
    from zer02llm.ffn import swiglu_hidden_dim

    cases = [(64, 64), (512, 64), (768, 64), (24, 64), (48, 128), (1, 64), (4096, 256), (100, 1), (101, 1), (10, 8),
             (96, 64), (200, 3)]
    got = {case: call(run, "my_swiglu_hidden_dim", *case) for case in cases}
    want = {case: _rule_reference(*case) for case in cases}
    assert all(want[case] == swiglu_hidden_dim(*case) for case in cases), "grader bug: reference and package disagree"
    wrong = [case for case in cases if not (isinstance(got[case], int) and got[case] == want[case])]
    if not wrong:
        return
    dim, multiple_of = wrong[0]
    where = f"my_swiglu_hidden_dim({dim}, multiple_of={multiple_of}) = {got[wrong[0]]!r}, expected {want[wrong[0]]}"
    if all(got[case] == want[case] for case in cases):
        raise AssertionError(f"{where}: return an int (a layer width), not a {type(got[wrong[0]]).__name__}")
    for why in _rule_mistakes(dim, multiple_of):  # the mistake that explains every case, not just this one
        if all(got[case] == _rule_mistakes(*case)[why] for case in cases):
            raise AssertionError(f"{where}: it {why}")
    raise AssertionError(f"{where} (⌊8·{dim}/3⌋ = {8 * dim // 3}, rounded up to a multiple of {multiple_of})")


def _my_swiglu(run: NotebookRun, *args, **kwargs) -> torch.nn.Module:
    module = call(run, "MySwiGLU", *args, **kwargs)
    if not isinstance(module, torch.nn.Module):
        raise AssertionError(f"MySwiGLU(...) should be an nn.Module, got {type(module).__name__}")
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(module, name, None)
        if not isinstance(layer, torch.nn.Linear):
            raise AssertionError(f"MySwiGLU needs an nn.Linear named `{name}` (the names of zer02llm.ffn.FFN and of "
                                 "Hugging Face's Llama, so weights copy across by name)")
        if layer.bias is not None:
            raise AssertionError(f"MySwiGLU.{name} should have no bias (bias=False), as in FFN and Llama")
    return module


def check_my_swiglu_shapes(run: NotebookRun) -> None:
    module = _my_swiglu(run, 24, 40)
    for name, shape in (("gate_proj", (40, 24)), ("up_proj", (40, 24)), ("down_proj", (24, 40))):
        got = tuple(getattr(module, name).weight.shape)
        assert got == shape, (f"MySwiGLU(24, 40).{name}.weight has shape {got}, expected {shape} "
                              "(out_features, in_features)")
    for dim, multiple_of in ((64, 64), (100, 1), (96, 32)):
        want = _rule_reference(dim, multiple_of)
        got = _my_swiglu(run, dim, multiple_of=multiple_of).gate_proj.out_features
        assert got == want, (
            f"MySwiGLU({dim}, multiple_of={multiple_of}) has hidden width {got}, expected {want}: with hidden_dim=None "
            f"it should use my_swiglu_hidden_dim(dim, multiple_of) (⌊8·{dim}/3⌋ = {8 * dim // 3}, rounded up)"
        )


def _ffn_mistakes(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the usual wrong SwiGLUs output with these weights, each with the message that names it."""
    gate, up = F.linear(x, wg), F.linear(x, wu)
    silu_not = "SwiGLU's gate activation is SiLU, a·σ(a) (F.silu)"
    return {
        f"uses GELU instead of SiLU: that is GEGLU; {silu_not}": F.linear(F.gelu(gate) * up, wd),
        f"uses GELU (tanh approximation) instead of SiLU; {silu_not}":
            F.linear(F.gelu(gate, approximate="tanh") * up, wd),
        f"uses ReLU instead of SiLU: that is ReGLU; {silu_not}": F.linear(F.relu(gate) * up, wd),
        f"uses a sigmoid instead of SiLU: that is the original GLU; {silu_not}": F.linear(torch.sigmoid(gate) * up, wd),
        "swaps gate and up: the activation belongs on gate_proj's output, silu(gate_proj(x)) * up_proj(x); with "
        "swapped roles FFN's (and Hugging Face's) weights do not fit": F.linear(F.silu(up) * gate, wd),
        "has no gate: down(silu(up(x))) is a plain two-matrix MLP; SwiGLU multiplies silu(gate_proj(x)) by the linear "
        "value up_proj(x)": F.linear(F.silu(up), wd),
        "has no value: down(silu(gate(x))) is a plain two-matrix MLP; SwiGLU multiplies silu(gate_proj(x)) by the "
        "linear value up_proj(x)": F.linear(F.silu(gate), wd),
        "applies no activation: gate(x) * up(x) is a bilinear layer; SwiGLU gates with silu(gate_proj(x))":
            F.linear(gate * up, wd),
        "applies SiLU to the product: the activation acts on the gate alone, silu(gate_proj(x)) * up_proj(x)":
            F.linear(F.silu(gate * up), wd),
    }


def check_my_swiglu_forward(run: NotebookRun) -> None:
    """Against zer02llm.ffn.FFN with the same weights and against the formula written with F.silu, forward and
    gradient; weights large enough that the activations differ visibly."""
    from zer02llm.ffn import FFN

    g = torch.Generator().manual_seed(40)
    ffn = FFN(20, hidden_dim=36).eval()
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    module = _my_swiglu(run, 20, 36)
    try:
        module.load_state_dict(ffn.state_dict())
    except RuntimeError as e:
        raise AssertionError(f"FFN's weights do not load into MySwiGLU(20, 36): {e}") from None
    x = torch.randn(3, 6, 20, generator=g, requires_grad=True)
    wg, wu, wd = (ffn.gate_proj.weight.detach(), ffn.up_proj.weight.detach(), ffn.down_proj.weight.detach())
    with torch.no_grad():
        want = ffn(x)
        try:
            got = module(x)
        except NotImplementedError:
            raise AssertionError("MySwiGLU.forward is not implemented yet: replace `raise NotImplementedError()`") \
                from None
        except Exception as e:
            raise AssertionError(f"MySwiGLU.forward raised {type(e).__name__}: {e}") from e
        formula = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    mistakes = {f"MySwiGLU {why}": wrong for why, wrong in _ffn_mistakes(x.detach(), wg, wu, wd).items()}
    expect("MySwiGLU vs zer02llm.ffn.FFN (same weights)", got, want, mistakes, rtol=1e-4)
    expect("MySwiGLU vs down(F.silu(gate(x)) * up(x))", got, formula, mistakes, rtol=1e-4)
    (grad,) = torch.autograd.grad(module(x).square().sum(), x)
    (grad_ref,) = torch.autograd.grad(ffn(x).square().sum(), x)
    assert_close(grad, grad_ref, "gradient of MySwiGLU with respect to its input", atol=1e-5, rtol=1e-4)


# --- Part B ---------------------------------------------------------------------------------------------------------


def _matched_reference(mlp_hidden: int, multiple_of: int) -> int:
    """Brute force: the positive multiple h minimising |3h - 2·mlp_hidden| (first found = smaller on ties)."""
    candidates = [multiple_of * j for j in range(1, mlp_hidden // multiple_of + 3)]
    return min(candidates, key=lambda h: abs(3 * h - 2 * mlp_hidden))


def check_matched_hidden_dim(run: NotebookRun) -> None:
    cases = [(2048, 8), (3072, 64), (18, 8), (1, 8), (4 * 896, 64), (4 * 100, 16), (1000, 7), (24, 8), (30, 4),
             (4097, 32)]
    for mlp_hidden, multiple_of in cases:
        got = call(run, "glu_matched_hidden_dim", mlp_hidden, multiple_of)
        want = _matched_reference(mlp_hidden, multiple_of)
        assert got == want, (
            f"glu_matched_hidden_dim({mlp_hidden}, multiple_of={multiple_of}) = {got}, expected {want} "
            f"(ideal 2/3·{mlp_hidden} = {2 * mlp_hidden / 3:.2f}; ties go to the smaller multiple, never below "
            "multiple_of)"
        )


def _glu(run: NotebookRun, dim: int, hidden: int, activation: str):
    module = call(run, "GLUFFN", dim, hidden, activation)
    for name, shape in (("gate_proj", (hidden, dim)), ("up_proj", (hidden, dim)), ("down_proj", (dim, hidden))):
        layer = getattr(module, name, None)
        assert isinstance(layer, torch.nn.Linear), f"GLUFFN needs an nn.Linear named `{name}`"
        assert tuple(layer.weight.shape) == shape, (
            f"GLUFFN.{name}.weight has shape {tuple(layer.weight.shape)}, expected {shape}"
        )
        assert layer.bias is None, f"GLUFFN.{name} should have no bias (bias=False)"
    return module


def check_glu_variants(run: NotebookRun) -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 6, 20)
    for activation, act in ACTIVATIONS.items():
        module = _glu(run, 20, 36, activation)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.4)  # large enough that the activations differ visibly
            hidden = act(F.linear(x, module.gate_proj.weight)) * F.linear(x, module.up_proj.weight)
            want = F.linear(hidden, module.down_proj.weight)
            got = module(x)
        assert_close(got, want, f"GLUFFN(activation={activation!r}) output", atol=1e-5, rtol=1e-4)


def check_swiglu_variant_is_ffn(run: NotebookRun) -> None:
    from zer02llm.ffn import FFN

    torch.manual_seed(5)
    module = _glu(run, 24, 40, "silu")
    ffn = FFN(24, hidden_dim=40)
    module.load_state_dict(ffn.state_dict(), strict=False)
    x = torch.randn(2, 7, 24, requires_grad=True)
    assert_close(module(x), ffn(x), "GLUFFN(activation='silu') vs zer02llm.ffn.FFN with the same weights")
    (g,) = torch.autograd.grad(module(x).square().sum(), x)
    (g_ref,) = torch.autograd.grad(ffn(x).square().sum(), x)
    assert_close(g, g_ref, "gradient of GLUFFN('silu') with respect to its input")


def check_unknown_activation_raises(run: NotebookRun) -> None:
    cls = get(run, "GLUFFN", "class")
    try:
        cls(8, 16, "swish-ish")
    except ValueError as e:
        assert "silu" in str(e), f"the ValueError should list the valid activations, got: {e}"
        return
    except NotImplementedError:
        raise AssertionError("GLUFFN is not implemented yet") from None
    raise AssertionError("GLUFFN(8, 16, 'swish-ish') should raise ValueError naming the valid activations")


def check_fuse_gate_up(run: NotebookRun) -> None:
    from zer02llm.ffn import FFN

    torch.manual_seed(6)
    ffn = FFN(16, hidden_dim=24)
    w = call(run, "fuse_gate_up", ffn)
    want = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]).detach()
    assert isinstance(w, torch.Tensor), f"fuse_gate_up should return a tensor, got {type(w).__name__}"
    assert_close(w.detach(), want, "fuse_gate_up(ffn): expected cat([gate_proj.weight, up_proj.weight]), gate rows "
                 "first", atol=0, rtol=0)


def check_fused_swiglu(run: NotebookRun) -> None:
    torch.manual_seed(7)
    gate_up, down = torch.randn(2 * 24, 16) * 0.3, torch.randn(16, 24) * 0.3
    x = torch.randn(3, 5, 16)
    gate, up = gate_up[:24], gate_up[24:]
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    got = call(run, "fused_swiglu", x, gate_up, down)
    assert_close(got, want, "fused_swiglu(x, gate_up, down)", atol=1e-5, rtol=1e-4)
