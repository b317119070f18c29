"""Grader for solutions|exercises/02_rope_exercises.ipynb."""
import math

import torch

from grading import NotebookRun, assert_close, call

NOTEBOOK = "02_rope_exercises.ipynb"


def _reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Pair-by-pair 2x2 rotation in float64: an independent formulation."""
    T, d = x.shape[-2:]
    out = x.double().clone()
    for i in range(d // 2):
        ang = torch.arange(T, dtype=torch.float64) * theta ** (-2 * i / d)
        a, b = x[..., i].double(), x[..., i + d // 2].double()
        out[..., i] = a * ang.cos() - b * ang.sin()
        out[..., i + d // 2] = a * ang.sin() + b * ang.cos()
    return out.to(x.dtype)


def check_rope_complex(run: NotebookRun):
    g = torch.Generator().manual_seed(3)
    for shape, theta in (((2, 4, 12, 16), 1e4), ((1, 2, 40, 64), 1e6)):
        x = torch.randn(*shape, generator=g)
        assert_close(call(run, "rope_complex", x, theta), _reference_rope(x, theta), f"rope_complex{shape}, theta={theta:g}")


def check_ntk_inv_freq(run: NotebookRun):
    for d, theta, s in ((64, 1e4, 4.0), (128, 5e5, 8.0)):
        base = theta * s ** (d / (d - 2))
        want = (1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
        assert_close(call(run, "ntk_inv_freq", d, theta, s), want, f"ntk_inv_freq({d}, {theta:g}, {s})", rtol=1e-5, atol=0)


def check_yarn_inv_freq(run: NotebookRun):
    """Compared with Hugging Face transformers' own YaRN implementation."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for d, theta, factor, L in ((64, 1e4, 4.0, 2048), (128, 1e6, 8.0, 4096), (32, 5e5, 2.0, 512)):
        cfg = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, max_position_embeddings=int(L * factor),
                          rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                                           "original_max_position_embeddings": L})
        want_freq, want_att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        result = call(run, "yarn_inv_freq", d, theta, factor, L)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError("yarn_inv_freq should return (inv_freq, attention_factor)")
        assert_close(result[0], want_freq.float(), f"yarn inv_freq (d={d}, theta={theta:g}, factor={factor})", rtol=1e-5, atol=1e-9)
        if not math.isclose(float(result[1]), want_att, rel_tol=1e-6):
            raise AssertionError(f"attention_factor for factor={factor}: got {result[1]}, expected {want_att:.6f} (0.1·ln s + 1)")
