"""Chapter 03's Part A graders name the typical mistakes: the reference solution with one deliberate slip fails its
check with a message that says what is wrong, and the solution itself passes.

No notebook runs: the solution's Part A cells (definitions only) are read from the notebook file, edited the way a
learner would get them wrong, executed into a namespace and handed to the grader as a fake `NotebookRun`.
"""
from pathlib import Path

import nbformat
import pytest

from graders import ch03_attention as grader
from grading import NotebookRun

NOTEBOOK = Path(__file__).resolve().parents[1] / "solutions" / grader.NOTEBOOK
PART_A = ("imports", "a1", "a2", "a3", "a4", "a5")  # cell ids: the imports and the five exercises


def _learner(*edits: tuple[str, str]) -> NotebookRun:
    """The solution's Part A with each `old` replaced by `new` (each must occur exactly once): a learner's slip."""
    cells = {cell.id: cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells}
    source = "\n\n".join(cells[i] for i in PART_A)
    for old, new in edits:
        assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in the solution's Part A"
        source = source.replace(old, new)
    ns: dict = {}
    exec(compile(source, str(NOTEBOOK), "exec"), ns)
    return NotebookRun(NOTEBOOK, ns)


SPLIT = ".view(B, T, self.{heads}, self.head_dim).transpose(1, 2)"
SLIPS = {  # name: (the check that must catch it, the edits that make it, words the message must contain)
    "softmax over the queries": (grader.check_scaled_dot_product, [("softmax(dim=-1)", "softmax(dim=-2)")],
                                 "softmax over the wrong dimension"),
    "softmax slip seen by the layer": (grader.check_attention_layer, [("softmax(dim=-1)", "softmax(dim=-2)")],
                                       "softmax over the wrong dimension"),
    "no 1/sqrt(d)": (grader.check_scaled_dot_product, [(" / math.sqrt(q.shape[-1])", "")], "not divided by sqrt(d)"),
    "inverted mask": (grader.check_scaled_dot_product, [("masked_fill(~mask,", "masked_fill(mask,")],
                      "the mask is inverted"),
    "diagonal excluded": (grader.check_causal_padding_mask,
                          [("(k_pos <= q_pos)[None, None]", "(k_pos < q_pos)[None, None]")], "excludes the diagonal"),
    "future included": (grader.check_causal_padding_mask,
                        [("(k_pos <= q_pos)[None, None]", "(k_pos <= q_pos + 1)[None, None]")],
                        "off by one into the future"),
    "top-left triangle": (grader.check_causal_padding_mask,
                          [("torch.arange(kv_len - q_len, kv_len)[:, None]", "torch.arange(q_len)[:, None]")],
                          "aligned top-left"),
    "padded rows empty": (grader.check_causal_padding_mask,
                          [("return mask & (real_key | (k_pos == q_pos))", "return mask & real_key")],
                          "padding queries see nothing"),
    "KV heads tiled": (grader.check_repeat_kv,
                       [("x.repeat_interleave(n_rep, dim=1)", "x.repeat(1, n_rep, 1, 1)")], "wrong order"),
    "KV heads tiled in the layer": (grader.check_attention_layer,
                                    [("repeat_kv(k, n_rep), repeat_kv(v, n_rep)",
                                      "k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)")], "wrong order"),
    "cache written one too far": (grader.check_kv_cache,
                                  [("self.k[:, :, start_pos:end], self.v[:, :, start_pos:end] = k, v",
                                    "self.k[:, :, start_pos + 1:end + 1], self.v[:, :, start_pos + 1:end + 1] = k, v")],
                                  "written one position too far"),
    "cache returns the new positions only": (grader.check_kv_cache,
                                             [("return self.k[:, :, :end], self.v[:, :, :end]",
                                               "return self.k[:, :, start_pos:end], self.v[:, :, start_pos:end]")],
                                             "returned only the new position"),
    "cache returns copies": (grader.check_kv_cache,
                             [("return self.k[:, :, :end], self.v[:, :, :end]",
                               "return self.k[:, :, :end].clone(), self.v[:, :, :end].clone()")], "are a copy"),
    "cache overflow unchecked": (grader.check_kv_cache,
                                 [("if end > self.k.shape[2]:", "if False:")], "raise a ValueError"),
    "RoPE rows not offset": (grader.check_attention_decode,
                             [("rows = slice(start_pos, start_pos + T)", "rows = slice(0, T)")], "not offset"),
    "layer writes the cache one too far": (grader.check_attention_decode,
                                           [("cache.update(start_pos, k, v)", "cache.update(start_pos + 1, k, v)")],
                                           "wrong position (start_pos + 1)"),
    "layer writes the cache at 0": (grader.check_attention_decode,
                                    [("cache.update(start_pos, k, v)", "cache.update(0, k, v)")],
                                    "attends only to itself"),
    "layer ignores what the cache returns": (grader.check_attention_decode,
                                             [("k, v = cache.update(", "cache.update(")], "attends only to itself"),
    "heads split without a transpose": (grader.check_attention_layer,
                                        [(SPLIT.format(heads=h) + end, f".view(B, self.{h}, T, self.head_dim)" + end)
                                         for h, end in (("n_heads", "  # (B, H, T, d)"),
                                                        ("n_kv_heads", "  # (B, H_kv, T, d)"), ("n_kv_heads", "\n"))],
                                        "split without a transpose"),
    "heads merged without a transpose": (grader.check_attention_layer,
                                         [("y.transpose(1, 2).reshape(B, T, -1)", "y.reshape(B, T, -1)")],
                                         "merged without a transpose"),
    "padding not passed on": (grader.check_attention_padding,
                              [("causal_padding_mask(T, k.shape[2], padding_mask)",
                                "causal_padding_mask(T, k.shape[2])")], "the padding is ignored"),
}


@pytest.mark.parametrize("slip", list(SLIPS))
def test_a_slip_fails_with_a_message_that_names_it(slip):
    check, edits, named = SLIPS[slip]
    with pytest.raises(AssertionError) as e:
        check(_learner(*edits))
    assert named in str(e.value), str(e.value)


def test_the_solution_passes_every_part_a_check():
    run = _learner()
    for check in (grader.check_scaled_dot_product, grader.check_causal_padding_mask, grader.check_repeat_kv,
                  grader.check_kv_cache, grader.check_attention_layer, grader.check_attention_padding,
                  grader.check_attention_decode):
        check(run)
