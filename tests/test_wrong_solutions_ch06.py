"""Chapter 06's build-it checks name the usual mistakes: each wrong solution below fails with a message that says
what is wrong, and a correct one passes. No notebook runs: the learner's namespace is faked (fast)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graders import ch06_model as grader
from grading import NotebookRun
from zer02llm.attention import Attention, KVCache
from zer02llm.config import LLMconfig
from zer02llm.ffn import FFN
from zer02llm.norm import RMSnorm


def run_with(**ns) -> NotebookRun:
    return NotebookRun(Path(grader.NOTEBOOK), ns)


def fails(check, words: tuple[str, ...], **ns) -> None:
    """`check` must fail on `ns`, with every one of `words` in its message."""
    with pytest.raises(AssertionError) as info:
        check(run_with(**ns))
    message = str(info.value)
    assert all(w in message for w in words), message


# ---------------------------------------------------------------------------------------------- A1: the block
class GoodBlock(torch.nn.Module):
    def __init__(self, config: LLMconfig):
        super().__init__()
        self.input_layernorm = RMSnorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config.dim, config.n_heads, config.n_kv_heads)
        self.post_attention_layernorm = RMSnorm(config.dim, config.norm_eps)
        self.mlp = FFN(config.dim, config.hidden_dim, config.multiple_of)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class PostNorm(GoodBlock):
    def forward(self, x, cos, sin):
        h = self.input_layernorm(x + self.self_attn(x, cos, sin))
        return self.post_attention_layernorm(h + self.mlp(h))


class NoAttentionResidual(GoodBlock):
    def forward(self, x, cos, sin):
        h = self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class NoFFNResidual(GoodBlock):
    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return self.mlp(self.post_attention_layernorm(h))


class SameNormTwice(GoodBlock):
    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.input_layernorm(h))


class Parallel(GoodBlock):
    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(x))


class OtherNames(GoodBlock):
    def __init__(self, config: LLMconfig):
        super().__init__(config)
        self.ffn = self.mlp
        del self.mlp


@pytest.mark.parametrize("wrong, words", [
    (PostNorm, ("post-norm",)),
    (NoAttentionResidual, ("attention's residual is missing",)),
    (NoFFNResidual, ("feed-forward's residual is missing",)),
    (SameNormTwice, ("same norm is used twice", "input_layernorm")),
    (Parallel, ("parallel",)),
    (OtherNames, ("Llama's names", "mlp")),
])
def test_decoder_block_mistakes_are_named(wrong, words):
    fails(grader.check_decoder_block, words, DecoderBlock=wrong)


def test_a_correct_decoder_block_passes():
    grader.check_decoder_block(run_with(DecoderBlock=GoodBlock))


# ---------------------------------------------------------------------------------------------- A2: the loss
def good_loss(logits, labels, ignore_index=-100):
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                            reduction="sum")
    return total / (targets != ignore_index).sum().clamp_min(1)


def no_shift(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)


def shift_wrong_way(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits[:, 1:].flatten(0, 1).float(), labels[:, :-1].flatten(), ignore_index=ignore_index)


def minus_100_counted(logits, labels, ignore_index=-100):
    targets = labels[:, 1:].clamp_min(0)  # -100 turned into token 0 and scored
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())


def minus_100_crashes(logits, labels, ignore_index=-100):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, labels[:, 1:, None]).mean()


def mean_over_all(logits, labels, ignore_index=-100):
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                             reduction="none")
    return losses.mean()  # the ignored positions are 0 here, but still counted


def per_sequence_mean(logits, labels, ignore_index=-100):
    return torch.stack([good_loss(logits[b:b + 1], labels[b:b + 1]) for b in range(len(logits))]).mean()


def nan_without_labels(logits, labels, ignore_index=-100):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index)


def in_bfloat16(logits, labels, ignore_index=-100):
    return good_loss(logits, labels, ignore_index).to(logits.dtype)


@pytest.mark.parametrize("wrong, words", [
    (no_shift, ("no shift", "logits[:, :-1] predict labels[:, 1:]")),
    (shift_wrong_way, ("shift goes the wrong way",)),
    (minus_100_counted, ("-100 is not ignored",)),
    (minus_100_crashes, ("raised", "-100 is not a token id")),
    (mean_over_all, ("mean is taken over all positions instead of the labelled ones",)),
    (per_sequence_mean, ("averaged per sequence",)),
    (nan_without_labels, ("must give 0, not NaN",)),
    (in_bfloat16, ("bfloat16", "float32")),
])
def test_loss_mistakes_are_named(wrong, words):
    fails(grader.check_causal_lm_loss, words, causal_lm_loss=wrong)


def test_a_correct_loss_passes():
    grader.check_causal_lm_loss(run_with(causal_lm_loss=good_loss))


# ---------------------------------------------------------------------------------------------- A3: greedy
def greedy(model, input_ids, max_new_tokens, shift=0, advance=True, use_cache=True, first=-1, size_extra=0):
    """The cached greedy loop; the keywords reproduce one mistake each."""
    B, T = input_ids.shape
    c = model.config
    caches = [KVCache(B, c.n_kv_heads, T + max_new_tokens + size_extra, c.head_dim) for _ in model.layers]
    out = [input_ids]
    with torch.no_grad():
        logits = model(input_ids, kv_caches=caches).logits[:, first]
        for i in range(max_new_tokens):
            out.append(logits.argmax(-1, keepdim=True))
            if i + 1 < max_new_tokens:
                pos = (T + i if advance else T) + shift
                step = model(out[-1], kv_caches=caches if use_cache else None, start_pos=pos if use_cache else 0)
                logits = step.logits[:, -1]
    return torch.cat(out, dim=1)


def rerun_everything(model, input_ids, max_new_tokens):
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("knobs, words", [
    (dict(shift=1), ("one position too far",)),
    (dict(shift=-1), ("one position too early",)),
    (dict(advance=False), ("start_pos is not advanced",)),
    (dict(use_cache=False), ("do not use the cache",)),
    (dict(first=0), ("FIRST position",)),
])
def test_greedy_mistakes_are_named(knobs, words):
    fails(grader.check_greedy_generate, words, greedy_generate=lambda m, ids, n: greedy(m, ids, n, **knobs))


def test_greedy_cache_overflow_gets_a_hint():
    def overflow(model, input_ids, max_new_tokens):  # every token one position too far, the cache one too short
        return greedy(model, input_ids, max_new_tokens, shift=1, size_extra=-1)

    fails(grader.check_greedy_generate, ("KV cache overflow", "sits at position T + i"), greedy_generate=overflow)


def test_greedy_without_the_cache_is_named():
    fails(grader.check_greedy_generate, ("use the KV cache",), greedy_generate=rerun_everything)


def test_a_correct_greedy_loop_passes():
    grader.check_greedy_generate(run_with(greedy_generate=greedy))


# ---------------------------------------------------------------------------------------------- A4: top-p
def nucleus(logits, p, descending=True, rule="before"):
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=descending)
    total = sorted_probs.cumsum(-1)
    keep_sorted = (total - sorted_probs < p) if rule == "before" else (total < p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def probs_of(filter_fn):
    return lambda logits, p: torch.softmax(filter_fn(logits, p), dim=-1)


@pytest.mark.parametrize("wrong, words", [
    (lambda z, p: nucleus(z, p, rule="strictly below p"), ("cross p is dropped", "REACHES p")),
    (lambda z, p: nucleus(z, p, descending=False), ("ascending", "LEAST likely")),
    (lambda z, p: nucleus(z, p).clamp_min(-1e9), ("must be -inf",)),  # removed tokens left finite
])
def test_top_p_filter_mistakes_are_named(wrong, words):
    fails(grader.check_top_p_filter, words, top_p_filter=wrong)


def test_top_p_probs_without_renormalising_is_named():
    def unnormalised(logits, p):
        return torch.softmax(logits.float(), -1) * ~torch.isinf(nucleus(logits, p))

    fails(grader.check_top_p_probs, ("not renormalised",), top_p_probs=unnormalised)


def test_correct_top_p_passes():
    grader.check_top_p_filter(run_with(top_p_filter=nucleus))
    grader.check_top_p_probs(run_with(top_p_probs=probs_of(nucleus)))
