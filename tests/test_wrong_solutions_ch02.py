"""Chapter 02's Part A graders name the typical mistakes: each deliberately wrong solution below fails its check with
a message that says what is wrong, and a right solution passes.

No notebook runs: the wrong function is put into a fake `NotebookRun` namespace and the grader's check is called.
"""
from pathlib import Path

import pytest
import torch

from graders import ch02_rope
from grading import NotebookRun

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / ch02_rope.NOTEBOOK


def _run(**functions) -> NotebookRun:
    return NotebookRun(NOTEBOOK, dict(functions))


def _tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos().float(), angles.sin().float()


def _pair_angles(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """(T, d/2) angles m * theta^(-2i/d), the part most learners get right."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)


def tables_right(head_dim, max_seq_len, theta=1e6):
    angles = _pair_angles(head_dim, max_seq_len, theta)
    return _tables(torch.cat([angles, angles], dim=-1))


def tables_interleaved(head_dim, max_seq_len, theta=1e6):
    return _tables(_pair_angles(head_dim, max_seq_len, theta).repeat_interleave(2, dim=-1))


def tables_exponent_i_over_d(head_dim, max_seq_len, theta=1e6):
    inv_freq = 1.0 / theta ** (torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return _tables(torch.cat([angles, angles], dim=-1))


def tables_exponent_doubled(head_dim, max_seq_len, theta=1e6):
    inv_freq = 1.0 / theta ** (2 * torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return _tables(torch.cat([angles, angles], dim=-1))


def tables_positions_from_one(head_dim, max_seq_len, theta=1e6):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(1, max_seq_len + 1, dtype=torch.float64), inv_freq)
    return _tables(torch.cat([angles, angles], dim=-1))


def tables_sin_sign(head_dim, max_seq_len, theta=1e6):
    cos, sin = tables_right(head_dim, max_seq_len, theta)
    return cos, -sin


@pytest.mark.parametrize("wrong,named", [
    (tables_interleaved, "interleaved layout"),
    (tables_exponent_i_over_d, "wrong frequency exponent: theta^(-i/d)"),
    (tables_exponent_doubled, "wrong frequency exponent: theta^(-4i/d)"),
    (tables_positions_from_one, "positions start at 1"),
    (tables_sin_sign, "sin has the wrong sign"),
])
def test_wrong_tables_are_named(wrong, named):
    with pytest.raises(AssertionError) as e:
        ch02_rope.check_rope_tables(_run(rope_tables=wrong))
    assert named in str(e.value) and "max |yours - correct| = " in str(e.value), e.value


def test_tables_with_one_angle_per_pair_get_a_shape_hint():
    def one_angle_per_pair(head_dim, max_seq_len, theta=1e6):
        return _tables(_pair_angles(head_dim, max_seq_len, theta))

    with pytest.raises(AssertionError, match="one angle per pair"):
        ch02_rope.check_rope_tables(_run(rope_tables=one_angle_per_pair))


def rotate_right(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def rotate_neighbours(x, cos, sin):
    """GPT-J style: pairs (x0, x1), (x2, x3), ... with the half-split tables' first half of angles."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


def rotate_wrong_way(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([b, -a], dim=-1) * sin.to(x.dtype)


def rotate_without_minus(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([b, a], dim=-1) * sin.to(x.dtype)


def rotate_without_cast(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


@pytest.mark.parametrize("wrong,named", [
    (rotate_neighbours, "interleaved pairs"),
    (rotate_wrong_way, "rotation the wrong way"),
    (rotate_without_minus, "reflection, not a rotation"),
    (rotate_without_cast, "cast cos and sin to x.dtype"),
])
def test_wrong_rotations_are_named(wrong, named):
    with pytest.raises(AssertionError, match="rope_rotate") as e:
        ch02_rope.check_rope_rotate(_run(rope_rotate=wrong))
    assert named in str(e.value)


def test_right_solutions_pass():
    run = _run(rope_tables=tables_right, rope_rotate=rotate_right)
    ch02_rope.check_rope_tables(run)
    ch02_rope.check_rope_rotate(run)
