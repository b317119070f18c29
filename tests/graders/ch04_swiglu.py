"""Grader for exercises/04_swiglu_exercises.ipynb: matched hidden sizes, the GLU family, the fused gate_up layout."""
import torch
import torch.nn.functional as F

from grading import NotebookRun, assert_close, call, get

NOTEBOOK = "04_swiglu_exercises.ipynb"

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / 2**0.5)),
    "gelu_tanh": lambda a: 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a**3))),
    "silu": lambda a: a / (1 + torch.exp(-a)),
}


def _matched_reference(mlp_hidden: int, multiple_of: int) -> int:
    """Brute force: the positive multiple h minimising |3h - 2·mlp_hidden| (first found = smaller on ties)."""
    candidates = [multiple_of * j for j in range(1, mlp_hidden // multiple_of + 3)]
    return min(candidates, key=lambda h: abs(3 * h - 2 * mlp_hidden))


def check_matched_hidden_dim(run: NotebookRun) -> None:
    cases = [(2048, 8), (3072, 64), (18, 8), (1, 8), (4 * 896, 64), (4 * 100, 16), (1000, 7), (24, 8), (30, 4), (4097, 32)]
    for mlp_hidden, multiple_of in cases:
        got = call(run, "glu_matched_hidden_dim", mlp_hidden, multiple_of)
        want = _matched_reference(mlp_hidden, multiple_of)
        assert got == want, (
            f"glu_matched_hidden_dim({mlp_hidden}, multiple_of={multiple_of}) = {got}, expected {want} "
            f"(ideal 2/3·{mlp_hidden} = {2 * mlp_hidden / 3:.2f}; ties go to the smaller multiple, never below multiple_of)"
        )


def _glu(run: NotebookRun, dim: int, hidden: int, activation: str):
    module = call(run, "GLUFFN", dim, hidden, activation)
    for name, shape in (("gate_proj", (hidden, dim)), ("up_proj", (hidden, dim)), ("down_proj", (dim, hidden))):
        layer = getattr(module, name, None)
        assert isinstance(layer, torch.nn.Linear), f"GLUFFN needs an nn.Linear named `{name}`"
        assert tuple(layer.weight.shape) == shape, f"GLUFFN.{name}.weight has shape {tuple(layer.weight.shape)}, expected {shape}"
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
            want = F.linear(act(F.linear(x, module.gate_proj.weight)) * F.linear(x, module.up_proj.weight), module.down_proj.weight)
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
    assert_close(w.detach(), want, "fuse_gate_up(ffn): expected cat([gate_proj.weight, up_proj.weight]), gate rows first", atol=0, rtol=0)


def check_fused_swiglu(run: NotebookRun) -> None:
    torch.manual_seed(7)
    gate_up, down = torch.randn(2 * 24, 16) * 0.3, torch.randn(16, 24) * 0.3
    x = torch.randn(3, 5, 16)
    gate, up = gate_up[:24], gate_up[24:]
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert_close(call(run, "fused_swiglu", x, gate_up, down), want, "fused_swiglu(x, gate_up, down)", atol=1e-5, rtol=1e-4)
