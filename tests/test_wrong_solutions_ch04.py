"""Chapter 04's graders name the usual mistakes: each wrong implementation below fails its check with a message that
says what is wrong, and a correct implementation passes. No notebook runs: the learner's namespace is faked."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun
from graders import ch04_swiglu as grader


def _run(**ns) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), ns)


def hidden_dim(dim: int, multiple_of: int = 64) -> int:
    return (8 * dim // 3 + multiple_of - 1) // multiple_of * multiple_of


def swiglu_class(combine=lambda gate, up: F.silu(gate) * up, rule=hidden_dim, bias: bool = False):
    """A SwiGLU module whose hidden layer is `combine(gate_proj(x), up_proj(x))`; the defaults give the correct one."""

    class SwiGLU(nn.Module):
        def __init__(self, dim: int, hidden_dim: int | None = None, multiple_of: int = 64):
            super().__init__()
            hidden_dim = rule(dim, multiple_of) if hidden_dim is None else hidden_dim
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
            self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
            self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(combine(self.gate_proj(x), self.up_proj(x)))

    return SwiGLU


def test_a_correct_solution_passes_every_part_a_check():
    run = _run(my_swiglu_hidden_dim=hidden_dim, MySwiGLU=swiglu_class())
    grader.check_my_swiglu_hidden_dim(run)
    grader.check_my_swiglu_shapes(run)
    grader.check_my_swiglu_forward(run)


@pytest.mark.parametrize("rule,words", [
    (lambda dim, m=64: 8 * dim // 3 // m * m, "rounds DOWN"),
    (lambda dim, m=64: (8 * dim // 3 + m // 2) // m * m, "NEAREST multiple"),
    (lambda dim, m=64: (8 * dim // 3 // m + 1) * m, "already is a multiple"),
    (lambda dim, m=64: (-(-8 * dim // 3) + m - 1) // m * m, "floors it first"),
    (lambda dim, m=64: (4 * dim + m - 1) // m * m, "three matrices instead of two"),
    (lambda dim, m=64: float(hidden_dim(dim, m)), "return an int"),
])
def test_a_wrong_hidden_size_rule_is_named(rule, words):
    with pytest.raises(AssertionError, match=words):
        grader.check_my_swiglu_hidden_dim(_run(my_swiglu_hidden_dim=rule))


def test_a_module_that_ignores_the_rule_is_named():
    with pytest.raises(AssertionError, match="hidden width .* should use my_swiglu_hidden_dim"):
        grader.check_my_swiglu_shapes(_run(MySwiGLU=swiglu_class(rule=lambda dim, m: 4 * dim)))


def test_a_module_with_biases_is_named():
    with pytest.raises(AssertionError, match="should have no bias"):
        grader.check_my_swiglu_shapes(_run(MySwiGLU=swiglu_class(bias=True)))


@pytest.mark.parametrize("combine,words", [
    (lambda gate, up: F.gelu(gate) * up, "GELU instead of SiLU"),
    (lambda gate, up: F.relu(gate) * up, "ReLU instead of SiLU"),
    (lambda gate, up: torch.sigmoid(gate) * up, "sigmoid instead of SiLU"),
    (lambda gate, up: F.silu(up) * gate, "swaps gate and up"),
    (lambda gate, up: F.silu(up), "has no gate"),
    (lambda gate, up: F.silu(gate), "plain two-matrix MLP"),
    (lambda gate, up: gate * up, "applies no activation"),
    (lambda gate, up: F.silu(gate * up), "applies SiLU to the product"),
])
def test_a_wrong_swiglu_is_named(combine, words):
    with pytest.raises(AssertionError, match=words) as e:
        grader.check_my_swiglu_forward(_run(MySwiGLU=swiglu_class(combine)))
    assert "max |yours - correct|" in str(e.value)
