"""Chapter 10's build-it grader names the usual mistakes of data parallelism by hand: each deliberately wrong
solution, run in two real gloo processes, fails with a message that says what is wrong; a correct one passes. No
notebook runs: the function goes straight into a fake NotebookRun (the grader forks, so it needs no import name)."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from graders import ch10_ddp as grader
from grading import NotebookRun


def _data_parallel_backward(divide=True, reduce="grad", shard="strided"):
    """Data-parallel gradients by hand: right by default, with one mistake when asked."""

    def data_parallel_backward(model, inputs, targets):
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = slice(0, None, world) if shard == "same" else slice(rank, None, world)
        F.mse_loss(model(inputs[rows]), targets[rows]).backward()
        for p in model.parameters():
            tensor = p.grad if reduce == "grad" else p.data
            dist.all_reduce(tensor)
            if divide:
                tensor /= world

    return data_parallel_backward


def _check(fn) -> None:
    grader.check_data_parallel_backward(NotebookRun(Path(grader.NOTEBOOK), {"data_parallel_backward": fn}))


def test_data_parallel_backward_correct_passes():
    _check(_data_parallel_backward())


@pytest.mark.parametrize("mistake,message", [
    (dict(divide=False), "2 x DDP's: dist.all_reduce sums over the ranks; divide by dist.get_world_size"),
    (dict(reduce="param"), "still its own shard's: nothing was all-reduced into p.grad"),
    (dict(reduce="param", divide=False), "all-reduced the parameters instead of their gradients"),
    (dict(shard="same"), "each rank used the same data shard"),
])
def test_data_parallel_backward_mistakes_are_named(mistake, message):
    with pytest.raises(AssertionError, match=message):
        _check(_data_parallel_backward(**mistake))


def test_an_unfinished_exercise_says_so():
    def data_parallel_backward(model, inputs, targets):
        raise NotImplementedError()

    with pytest.raises(AssertionError, match="is not implemented yet"):
        _check(data_parallel_backward)


def test_the_grader_compares_with_ddp_in_two_processes():
    """The reference itself: DDP's gradient on rank r's shard is the whole batch's gradient (equal shards)."""
    inputs, targets = grader._global_batch()
    whole = grader._shard_gradient(grader._model(), inputs, targets)
    halves = [grader._shard_gradient(grader._model(), inputs[r::2], targets[r::2]) for r in range(2)]
    for w, a, b in zip(whole, *halves):
        torch.testing.assert_close((a + b) / 2, w, atol=1e-6, rtol=0)
