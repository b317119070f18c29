"""Chapter 09's build-it checks name the usual mistakes: each wrong LoRA layer below fails with a message that says
what is wrong, and a correct one passes. No notebook runs: the learner's namespace is faked (fast)."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from graders import ch09_sft_lora as grader
from grading import NotebookRun


class GoodLoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)

    def delta(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features)
        out.weight.copy_(self.base.weight + self.delta())
        out.bias.copy_(self.base.bias)
        return out


class RandomB(GoodLoRA):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__(base, rank, alpha)
        nn.init.normal_(self.lora_B)


class BothZero(GoodLoRA):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__(base, rank, alpha)
        nn.init.zeros_(self.lora_A)


class Reversed(GoodLoRA):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__(base, rank, alpha)
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)


class ScaleUpsideDown(GoodLoRA):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__(base, rank, alpha)
        self.scaling = rank / alpha


class BaseTrainable(GoodLoRA):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__(base, rank, alpha)
        base.requires_grad_(True)


class MergeAB(GoodLoRA):
    def delta(self):
        return self.scaling * self.lora_A @ self.lora_B


class MergeTransposed(GoodLoRA):
    def delta(self):
        return self.scaling * self.lora_A.T @ self.lora_B.T


class MergeInPlace(GoodLoRA):
    @torch.no_grad()
    def merged(self):
        self.base.weight += self.delta()
        return self.base


def fails(check, cls, *words: str) -> None:
    with pytest.raises(AssertionError) as info:
        check(NotebookRun(Path(grader.NOTEBOOK), {"MyLoRALinear": cls}))
    message = str(info.value)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("check, cls, words", [
    (grader.check_lora_init, RandomB, ("lora_B is not zero at initialisation",)),
    (grader.check_lora_init, BothZero, ("lora_A is zero too", "nothing ever trains")),
    (grader.check_lora_init, Reversed, ("convention for embeddings", "B at zero")),
    (grader.check_lora_init, BaseTrainable, ("base layer's weights are left trainable",)),
    (grader.check_lora_forward, ScaleUpsideDown, ("upside down, r / alpha instead of alpha / r",)),
    (grader.check_lora_merge, MergeAB, ("raised RuntimeError", "the update is B A")),
    (grader.check_lora_merge, MergeTransposed, ("the update is transposed", "B A")),
    (grader.check_lora_merge, MergeInPlace, ("in place",)),
], ids=["B-not-zero", "A-and-B-zero", "A-zero-B-random", "base-trainable", "scale-r-over-alpha", "merge-A-B",
        "merge-transposed", "merge-in-place"])
def test_lora_mistakes_are_named(check, cls, words):
    fails(check, cls, *words)


@pytest.mark.parametrize("check", [grader.check_lora_init, grader.check_lora_forward, grader.check_lora_merge])
def test_a_correct_lora_layer_passes(check):
    check(NotebookRun(Path(grader.NOTEBOOK), {"MyLoRALinear": GoodLoRA}))
