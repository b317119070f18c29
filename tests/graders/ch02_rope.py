"""Grader for solutions|exercises/02_rope_exercises.ipynb.

Part A (the tables and the rotation) is compared with `zer02llm.rope` and with Hugging Face's Llama rotary code; when
a wrong answer equals what a typical slip produces (interleaved pairs, a wrong exponent, positions from 1, a rotation
the wrong way), the message names the slip.
"""
import math

import torch

from grading import Mistakes, NotebookRun, assert_close, call, name_the_mistake
from zer02llm.rope import apply_rope, precompute_rope, rotate_half

NOTEBOOK = "02_rope_exercises.ipynb"


def _tables(d: int, T: int, theta: float, exponent: float = 2.0, first_position: int = 0, interleaved: bool = False,
            sin_sign: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 tables with one knob per typical slip; the defaults are right: angle m * theta^(-2i/d), half-split."""
    inv_freq = theta ** (-exponent * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(first_position, first_position + T, dtype=torch.float64), inv_freq)
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), (sin_sign * angles.sin()).float()


TABLE_SLIPS = {
    "interleaved layout: the angles are repeated neighbour by neighbour [a0, a0, a1, a1, ...], which pairs (x0, x1), "
    "(x2, x3), ...; the half-split layout pairs x_i with x_{i+d/2}, so a row is [a0 .. a_{d/2-1}, a0 .. a_{d/2-1}] "
    "(concatenate the angles with themselves) - what Hugging Face Llama checkpoints expect": dict(interleaved=True),
    "wrong frequency exponent: theta^(-i/d); pair i turns by theta^(-2i/d) radians per token (i = 0 .. d/2-1), so the "
    "exponent goes 0, 2/d, 4/d, ... and the slowest pair turns about 1/theta per token": dict(exponent=1.0),
    "wrong frequency exponent: theta^(-4i/d); torch.arange(0, d, 2) already counts 0, 2, 4, ... - divide it by d, do "
    "not double it again": dict(exponent=4.0),
    "positions start at 1: the first token is at position 0, so row 0 must be the identity (cos = 1, sin = 0)":
        dict(first_position=1),
    "sin has the wrong sign: these tables turn every pair by minus its angle, the wrong way round (the sine of a "
    "small positive angle is positive)": dict(sin_sign=-1.0),
}


def _hf_tables(d: int, T: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Llama's cos/sin for positions 0..T-1 (computed in float32 there: compare within 1e-5, T <= 64)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, rope_theta=theta, max_position_embeddings=T)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(T)[None])
    return cos[0], sin[0]


def check_rope_tables(run: NotebookRun):
    for d, T, theta in ((16, 12, 1e4), (64, 64, 1e6), (8, 7, 10.0), (32, 50, 5e5)):
        what = f"rope_tables({d}, {T}, theta={theta:g})"
        got = call(run, "rope_tables", d, T, theta)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"{what} should return a tuple (cos, sin), got {type(got).__name__}")
        if isinstance(got[0], torch.Tensor) and got[0].shape == (T, d // 2):
            raise AssertionError(f"{what}: shape {tuple(got[0].shape)} holds one angle per pair; the tables are "
                                 f"({T}, {d}): every angle appears twice, for x_i and x_(i+d/2)")
        slips = [(slip, lambda knobs=knobs: _tables(d, T, theta, **knobs)) for slip, knobs in TABLE_SLIPS.items()]
        name_the_mistake(what, got, precompute_rope(d, T, theta), slips, atol=1e-5)
        for name, mine, pkg, hf in zip(("cos", "sin"), got, precompute_rope(d, T, theta), _hf_tables(d, T, theta)):
            assert_close(mine, pkg, f"{what}: {name} vs zer02llm.rope.precompute_rope", atol=1e-5, rtol=0)
            assert_close(mine, hf, f"{what}: {name} vs transformers' LlamaRotaryEmbedding", atol=1e-5, rtol=0)


def _rotate_neighbours(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]: the quarter turn of interleaved pairs (GPT-J style)."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def _interleaved_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (x0, x1), (x2, x3), ... turned by the half-split tables' angles a_0 .. a_{d/2-1}."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)
    return x * c + _rotate_neighbours(x) * s


def _rotation_slips(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Mistakes:
    interleaved = ("interleaved pairs: you rotate neighbours (x0, x1), (x2, x3), ...; the half-split layout rotates "
                   "x_i with x_{i+d/2} (the two halves of the last dimension), as Hugging Face Llama does")
    return [
        (interleaved, lambda: x * cos + _rotate_neighbours(x) * sin),
        (interleaved, lambda: _interleaved_rotation(x, cos, sin)),
        ("rotation the wrong way (a sign error on sin): each pair (a, b) must become (a cos - b sin, a sin + b cos), "
         "i.e. x * cos + [-x_b, x_a] * sin; yours turns by -angle", lambda: x * cos - rotate_half(x) * sin),
        ("the quarter turn lacks its minus sign: [x_b, x_a] is a reflection, not a rotation (lengths change); it must "
         "be [-x_b, x_a]", lambda: x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin),
        ("cos and sin are swapped: it must be x * cos + [-x_b, x_a] * sin", lambda: x * sin + rotate_half(x) * cos),
    ]


def _rotate(run: NotebookRun, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, what: str) -> torch.Tensor:
    __tracebackhide__ = True
    got = call(run, "rope_rotate", x, cos, sin)
    name_the_mistake(what, got, apply_rope(x, cos, sin), _rotation_slips(x, cos, sin), atol=1e-5)
    return got


def check_rope_rotate(run: NotebookRun):
    """Queries and keys of a GQA layer, against zer02llm.rope.apply_rope and transformers' apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(5)
    for d, T, theta in ((16, 24, 1e4), (64, 40, 1e6)):
        cos, sin = precompute_rope(d, T, theta)
        q, k = torch.randn(2, 4, T, d, generator=g), torch.randn(2, 2, T, d, generator=g)
        for name, x in (("queries", q), ("keys", k)):
            what = f"rope_rotate on {name} {tuple(x.shape)}, theta={theta:g}"
            want = apply_rope(x, cos, sin)
            assert_close(_rotate(run, x, cos, sin, what), want, f"{what} vs zer02llm.rope.apply_rope")
        hf_cos, hf_sin = _hf_tables(d, T, theta)
        hq, hk = apply_rotary_pos_emb(q, k, hf_cos[None], hf_sin[None])
        what = f"rope_rotate with transformers' tables (head_dim {d})"
        assert_close(_rotate(run, q, hf_cos, hf_sin, what), hq, f"{what}: queries vs apply_rotary_pos_emb", atol=1e-6)
        assert_close(_rotate(run, k, hf_cos, hf_sin, what), hk, f"{what}: keys vs apply_rotary_pos_emb", atol=1e-6)
    cos, sin = precompute_rope(16, 12, 1e4)
    pos = torch.tensor([[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]])  # two sequences starting at different positions
    x = torch.randn(2, 3, 5, 16, generator=g)
    what = "rope_rotate with per-sequence tables cos[pos][:, None] of shape (2, 1, 5, 16)"
    cos_b, sin_b = cos[pos][:, None], sin[pos][:, None]
    assert_close(_rotate(run, x, cos_b, sin_b, what), apply_rope(x, cos_b, sin_b), what)
    got = call(run, "rope_rotate", x.to(torch.bfloat16), cos[:5], sin[:5])
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bfloat16:
        raise AssertionError(f"rope_rotate of a bfloat16 x returned {getattr(got, 'dtype', type(got).__name__)}: cast "
                             "cos and sin to x.dtype, so a bfloat16 model stays in bfloat16")
    assert_close(got.float(), apply_rope(x, cos[:5], sin[:5]), "rope_rotate in bfloat16", atol=5e-2, rtol=2e-2)


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
        what = f"rope_complex{shape}, theta={theta:g}"
        assert_close(call(run, "rope_complex", x, theta), _reference_rope(x, theta), what)


def check_ntk_inv_freq(run: NotebookRun):
    for d, theta, s in ((64, 1e4, 4.0), (128, 5e5, 8.0)):
        base = theta * s ** (d / (d - 2))
        want = (1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
        what = f"ntk_inv_freq({d}, {theta:g}, {s})"
        assert_close(call(run, "ntk_inv_freq", d, theta, s), want, what, rtol=1e-5, atol=0)


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
        what = f"yarn inv_freq (d={d}, theta={theta:g}, factor={factor})"
        assert_close(result[0], want_freq.float(), what, rtol=1e-5, atol=1e-9)
        if not math.isclose(float(result[1]), want_att, rel_tol=1e-6):
            raise AssertionError(f"attention_factor for factor={factor}: got {result[1]}, expected {want_att:.6f} "
                                 "(0.1·ln s + 1)")
