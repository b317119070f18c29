"""Grader for solutions|exercises/06_model_exercises.ipynb.

Part A (build it): the pre-norm decoder block, the language-model loss with Hugging Face-style labels, greedy
decoding with the KV cache, top-p filtering and the distribution it samples from. Each is compared with the package
(`zer02llm`) and with an independent reference (Hugging Face `transformers` on the same weights, or a loop written
differently); when an answer is wrong, the common mistakes are recomputed here and named when one of them matches.
Part B (beyond the chapter): min-p, beam search, speculative decoding. The references below are written
independently of the solutions (log-space threshold, an explicit list-of-beams search, plain greedy decoding by
full re-forward) and run on the grader's own models.
"""
import functools
import math
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grading import NotebookRun, assert_close, call, invoke, name_the_mistake, same
from zer02llm.attention import KVCache
from zer02llm.config import LLMconfig
from zer02llm.generate import generate, top_p_filter
from zer02llm.hf import export_hf
from zer02llm.model import LLM, Block, lm_loss
from zer02llm.rope import precompute_rope

NOTEBOOK = "06_model_exercises.ipynb"


def _model(seed: int, n_layers: int = 2, vocab: int = 40, sharpen: float = 8.0) -> LLM:
    torch.manual_seed(seed)
    m = LLM(LLMconfig(vocab_size=vocab, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=96,
                      tie_word_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


def _greedy(model: LLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------------- A1: the block
def _block_case(seed: int = 21, T: int = 9):
    """The package's Block with weights large enough that every sub-layer matters, and distinct norm gains."""
    config = LLMconfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    torch.manual_seed(seed)
    block = Block(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
        block.input_layernorm.weight.uniform_(0.3, 1.0)
        block.post_attention_layernorm.weight.uniform_(1.2, 2.0)
    x = torch.randn(2, T, config.dim, generator=torch.Generator().manual_seed(seed)) * 1.5
    cos, sin = precompute_rope(config.head_dim, T, config.rope_theta)
    return config, block, x, cos, sin


def _hf_decoder_layer(config: LLMconfig, block: Block) -> nn.Module:
    """transformers' own LlamaDecoderLayer holding the same weights (the sub-module names are the same)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    hf_config = transformers.LlamaConfig(hidden_size=config.dim, intermediate_size=block.mlp.gate_proj.out_features,
                                         num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                                         head_dim=config.head_dim, rms_norm_eps=config.norm_eps, hidden_act="silu",
                                         attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                                         attn_implementation="eager")  # explicit softmax + the additive mask given
    layer = LlamaDecoderLayer(hf_config, layer_idx=0).eval()
    layer.load_state_dict(block.state_dict(), strict=True)
    return layer


def _block_variants(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
    norm1, norm2, mlp = block.input_layernorm, block.post_attention_layernorm, block.mlp

    def attn(h):
        return block.self_attn(h, cos, sin)

    h = x + attn(norm1(x))
    post_h = norm1(x + attn(x))
    return {
        "post-norm: the norm is applied after the residual addition, norm(x + sublayer(x)). A pre-norm block "
        "normalises only the sub-layer's input, x + sublayer(norm(x)), so the residual stream itself is never "
        "normalised and gradients reach early layers through the additions alone (chapter 06, 'The block')":
            norm2(post_h + mlp(post_h)),
        "both residual connections are missing: each sub-layer's output must be ADDED to its input "
        "(x + attention(...), then h + feed-forward(...)); without them the block replaces the stream":
            mlp(norm2(attn(norm1(x)))),
        "the attention's residual is missing: h must be x + attention(input_layernorm(x)), not the attention "
        "output alone": attn(norm1(x)) + mlp(norm2(attn(norm1(x)))),
        "the feed-forward's residual is missing: the output must be h + mlp(post_attention_layernorm(h)), not the "
        "feed-forward output alone": mlp(norm2(h)),
        "the same norm is used twice (input_layernorm before the feed-forward too): each sub-layer has its own "
        "RMSNorm with its own trained gains; the feed-forward reads post_attention_layernorm(h)": h + mlp(norm1(h)),
        "the same norm is used twice (post_attention_layernorm before the attention too): the attention reads "
        "input_layernorm(x)": (x + attn(norm2(x))) + mlp(norm2(x + attn(norm2(x)))),
        "the feed-forward reads the block's input x instead of h = x + attention(...): that is the 'parallel' "
        "block of GPT-J and PaLM; Llama's block is sequential, the feed-forward sees the attention's result":
            h + mlp(norm2(x)),
    }


def check_decoder_block(run: NotebookRun):
    config, ref, x, cos, sin = _block_case()
    block = call(run, "DecoderBlock", config)
    if not isinstance(block, nn.Module):
        raise AssertionError(f"DecoderBlock(config) should be an nn.Module, got {type(block).__name__}")
    want, have = sorted(ref.state_dict()), sorted(block.state_dict())
    if want != have:
        raise AssertionError(f"DecoderBlock's parameters should carry Hugging Face Llama's names, so that weights load "
                             f"by name: missing {sorted(set(want) - set(have))[:4]}, unexpected "
                             f"{sorted(set(have) - set(want))[:4]}")
    try:
        block.load_state_dict(ref.state_dict())
    except RuntimeError as e:
        raise AssertionError(f"the package's Block weights do not load into DecoderBlock: {e}") from None
    block.eval()
    with torch.no_grad():
        got = invoke("DecoderBlock.forward", block, x, cos, sin)
        expected = ref(x, cos, sin)[0]
        T = x.shape[1]
        causal = torch.full((T, T), float("-inf")).triu(1).expand(x.shape[0], 1, T, T)
        hf_out = _hf_decoder_layer(config, ref)(x, attention_mask=causal, position_embeddings=(cos[None], sin[None]))
        hf_out = hf_out[0] if isinstance(hf_out, tuple) else hf_out
        name_the_mistake("DecoderBlock", got, expected, _block_variants(ref, x, cos, sin), atol=1e-4, rtol=1e-4)
    assert_close(got, expected, "DecoderBlock(x, cos, sin) vs zer02llm.model.Block (same weights)", atol=1e-5)
    assert_close(got, hf_out, "DecoderBlock(x, cos, sin) vs transformers' LlamaDecoderLayer (same weights)", atol=1e-5)


# ---------------------------------------------------------------------------------------------- A2: the loss
@functools.lru_cache(maxsize=1)
def _loss_case():
    """A model's logits, its HF twin's losses (exported by zer02llm.hf.export_hf, loaded by transformers) and the
    package's, for two label sets: plain LM labels, and SFT-style labels with prompts of different lengths masked."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = _model(seed=31)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
    ids = torch.randint(0, 40, (3, 14), generator=torch.Generator().manual_seed(32))
    sft = ids.clone()
    sft[0, :10] = -100  # prompts of different lengths: 4 labelled tokens in row 0, 12 in row 1, 8 in row 2
    sft[1, :2] = -100
    sft[2, :5] = -100
    sft[2, 9] = -100
    with torch.no_grad():
        logits = model(ids).logits
        hf = {name: hf_model(ids, labels=labels).loss for name, labels in (("lm", ids), ("sft", sft))}
        package = {"lm": model(ids, labels=ids).lm_loss, "sft": model(ids, labels=sft).lm_loss}
    return logits, ids, sft, package, hf


def _loss_variants(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    V = logits.shape[-1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = labels[:, 1:]
    counted = targets != -100
    nll = -logp[:, :-1].gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # (B, T-1), position t -> label t + 1
    kept = torch.where(counted, nll, torch.zeros_like(nll))
    return {
        "no shift: position t is scored against labels[t], the token it already sees, so the model is trained to "
        "copy its input. Labels equal input_ids and the loss shifts them: logits[:, :-1] predict labels[:, 1:]":
            F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100),
        "the shift goes the wrong way: logits[:, 1:] are scored against labels[:, :-1] (each position predicts the "
        "token BEFORE it); logits[:, :-1] predict labels[:, 1:]":
            F.cross_entropy(logits[:, 1:].double().flatten(0, 1), labels[:, :-1].flatten(), ignore_index=-100),
        "-100 is not ignored: positions labelled -100 (the prompt, in SFT) count in the loss as if they were a "
        "token; they must be left out of both the sum and the count":
            -logp[:, :-1].gather(-1, targets.clamp_min(0)[..., None]).mean(),
        "-100 is not ignored: positions labelled -100 count in the loss as if they were token V - 100 (Python's "
        "negative indexing); they must be left out of both the sum and the count":
            -logp[:, :-1].gather(-1, (targets % V)[..., None]).mean(),
        "the mean is taken over all positions instead of the labelled ones: the -100 positions add 0 to the sum "
        "but still count in the divisor, so more prompt means a smaller loss. Divide by the number of labelled "
        "tokens": kept.sum() / counted.numel(),
        "the mean is taken over all B*T positions instead of the labelled ones: divide by the number of labelled "
        "tokens": kept.sum() / labels.numel(),
        "the loss is averaged per sequence, then over the batch: a token of a short answer then weighs more than "
        "one of a long answer. Every labelled token of the batch must weigh the same (one mean over all of them)":
            (kept.sum(1) / counted.sum(1).clamp_min(1)).mean(),
    }


def check_causal_lm_loss(run: NotebookRun):
    logits, ids, sft, package, hf = _loss_case()
    for name, labels, what in (("lm", ids, "labels = input_ids"), ("sft", sft, "labels with -100 on the prompts")):
        try:
            got = call(run, "causal_lm_loss", logits.clone(), labels.clone())
        except AssertionError as e:
            if name == "sft" and "raised" in str(e):
                raise AssertionError(f"{e} -- with {what}: -100 is not a token id, it marks a position without loss; "
                                     "leave those positions out (mask them, or F.cross_entropy(..., "
                                     "ignore_index=-100))") from None
            raise
        name_the_mistake(f"causal_lm_loss with {what}", got, package[name], _loss_variants(logits, labels))
        assert_close(got, package[name], f"causal_lm_loss with {what} vs zer02llm LLM(...).lm_loss")
        assert_close(got, hf[name], f"causal_lm_loss with {what} vs transformers' LlamaForCausalLM loss (same weights)")
    none = call(run, "causal_lm_loss", logits.clone(), torch.full_like(ids, -100))
    if not isinstance(none, torch.Tensor) or none.dim() != 0:
        raise AssertionError(f"causal_lm_loss should return a 0-d tensor, got {none!r}")
    if not none.isfinite() or none.item() != 0.0:
        raise AssertionError(f"causal_lm_loss with every label -100 gave {none!r}: a batch without any labelled token "
                             "must give 0, not NaN (0 / 0) - divide by max(count, 1)")
    low = logits.to(torch.bfloat16)
    assert_close(call(run, "causal_lm_loss", low, ids), lm_loss(low, ids),
                 "causal_lm_loss on bfloat16 logits (compute in float32, as the package does)")


# ---------------------------------------------------------------------------------------------- A3: greedy
def _cached_greedy(model: LLM, prompt: torch.Tensor, n: int, shift: int = 0, advance: bool = True,
                   cache: bool = True, first: int = -1) -> torch.Tensor:
    """Greedy decoding with the KV cache, with the knobs that reproduce the usual mistakes (defaults: correct)."""
    B, T = prompt.shape
    c = model.config
    caches = [KVCache(B, c.n_kv_heads, T + n + 1, c.head_dim) for _ in model.layers]
    with torch.no_grad():
        new = [model(prompt, kv_caches=caches).logits[:, first].argmax(-1)]
        for i in range(1, n):
            pos = (T + i - 1 if advance else T) + shift
            step = model(new[-1][:, None], kv_caches=caches if cache else None, start_pos=pos if cache else 0)
            new.append(step.logits[:, -1].argmax(-1))
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


GREEDY_MISTAKES = {
    "the new token is written one position too far (start_pos = T + i + 1): the i-th new token (i = 0, 1, ...) "
    "sits at position T + i, so its keys go there and RoPE rotates it by that position": dict(shift=1),
    "the new token is written one position too early, over the last prompt token's keys and values: the i-th new "
    "token (i = 0, 1, ...) sits at position T + i": dict(shift=-1),
    "start_pos is not advanced: every new token is written at position T, over the previous one; the i-th new "
    "token sits at position T + i": dict(advance=False),
    "the decode steps do not use the cache (no kv_caches, start_pos 0): each new token is predicted from itself "
    "alone; pass the caches the prefill filled, and the token's position": dict(cache=False),
    "the first new token is taken from the prefill's FIRST position: the next token after the prompt is "
    "predicted by the last position's logits (logits[:, -1])": dict(first=0),
}


def check_greedy_generate(run: NotebookRun):
    model = _model(seed=41)
    prompt = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(42))
    for n in (1, 12):
        expected = generate(model, prompt, max_new_tokens=n, temperature=0)
        naive = _greedy(model, prompt, n)
        processed = []

        def count(module, args, kwargs):
            processed.append((args[0] if args else kwargs["input_ids"]).shape[1])

        hook = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            got = call(run, "greedy_generate", model, prompt.clone(), n)
        except AssertionError as e:
            if "KV cache overflow" in str(e):
                raise AssertionError(f"{e} -- the caches hold T + max_new_tokens positions: the i-th new token "
                                     "(i = 0, 1, ...) sits at position T + i, and the last one needs no forward pass")
            raise
        finally:
            hook.remove()
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise AssertionError(f"greedy_generate should return the prompt and {n} new tokens, shape "
                                 f"{tuple(expected.shape)}; got {getattr(got, 'shape', type(got).__name__)}")
        if not torch.equal(got[:, :7], prompt):
            raise AssertionError("greedy_generate must return the prompt unchanged, followed by the new tokens")
        if not torch.equal(got, expected):
            variants = {mistake: _cached_greedy(model, prompt, n, **knobs)
                        for mistake, knobs in GREEDY_MISTAKES.items()}
            name_the_mistake(f"greedy_generate ({n} new token{'s' * (n > 1)})", got, expected, variants, atol=0, rtol=0)
            row, col = (got != expected).nonzero()[0].tolist()
            raise AssertionError(f"greedy_generate ({n} new tokens): sequence {row} differs from zer02llm's "
                                 f"generate(temperature=0) and from re-running the whole sequence at new token "
                                 f"{col - 7}: got {got[row, col].item()}, expected {expected[row, col].item()}")
        assert torch.equal(expected, naive)  # the two references agree: the grader's own sanity check
        if sum(processed) > 7 + n:
            raise AssertionError(f"greedy_generate gives the right tokens, but the model processed {sum(processed)} "
                                 f"tokens for {n} new ones (calls of {processed[:6]}...): use the KV cache - one "
                                 f"pass over the prompt, then one token per step ({7 + n - 1} tokens in all)")


# ---------------------------------------------------------------------------------------------- A4: top-p
def _top_p_logits() -> torch.Tensor:
    scale = torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.5])[:, None]  # flat to peaked rows
    return torch.randn(6, 50, generator=torch.Generator().manual_seed(51)) * scale


TOP_P = (0.05, 0.3, 0.5, 0.8, 0.9, 0.99)  # not 1.0: whether a float32 running sum reaches 1.0 exactly is rounding


def _hf_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(p)(None, logits.clone())


def _top_p_kept_variants(logits: torch.Tensor, p: float) -> dict[str, list[torch.Tensor]]:
    probs = torch.softmax(logits.double(), dim=-1)

    def keep(order_desc: bool, rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        sorted_probs, order = probs.sort(dim=-1, descending=order_desc)
        kept_sorted = rule(sorted_probs.cumsum(-1), sorted_probs)
        return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)

    crossing = ("the token whose probability makes the running total cross p is dropped: the nucleus is the "
                "smallest set whose mass REACHES p, so that token is kept (keep token i while the mass of the "
                "tokens before it is below p; the most likely token is always kept)")
    return {
        crossing: [keep(True, lambda total, pr: total < p), keep(True, lambda total, pr: total <= p)],
        "the probabilities are sorted in ascending order, so the LEAST likely tokens are kept: sort descending "
        "(most likely first) and keep from the top": [keep(False, lambda total, pr: total - pr < p)],
    }


def check_top_p_filter(run: NotebookRun):
    logits = _top_p_logits()
    for p in TOP_P:
        got = call(run, "top_p_filter", logits.clone(), p)
        if not isinstance(got, torch.Tensor) or got.shape != logits.shape:
            raise AssertionError(f"top_p_filter should return a tensor of shape {tuple(logits.shape)}, got "
                                 f"{getattr(got, 'shape', type(got).__name__)}")
        kept = ~torch.isinf(got)
        package, hf = ~torch.isinf(top_p_filter(logits, p)), ~torch.isinf(_hf_top_p(logits, p))
        if not torch.equal(kept, package):
            for mistake, wrongs in _top_p_kept_variants(logits, p).items():
                if any(torch.equal(kept, wrong) for wrong in wrongs):
                    raise AssertionError(f"top_p_filter(p={p}): {mistake}")
            row = int((kept != package).any(-1).nonzero()[0])
            raise AssertionError(f"top_p_filter(p={p}): row {row} keeps {int(kept[row].sum())} tokens, zer02llm's "
                                 f"top_p_filter keeps {int(package[row].sum())} (removed tokens must be -inf)")
        if not torch.equal(kept, hf):
            row = int((kept != hf).any(-1).nonzero()[0])
            raise AssertionError(f"top_p_filter(p={p}): row {row} keeps {int(kept[row].sum())} tokens, transformers' "
                                 f"TopPLogitsWarper keeps {int(hf[row].sum())}")
        if not torch.equal(got[kept], logits[kept]):
            raise AssertionError(f"top_p_filter(p={p}): the kept logits must be returned unchanged "
                                 f"(max change {(got[kept] - logits[kept]).abs().max().item():.3g})")


def check_top_p_probs(run: NotebookRun):
    logits = _top_p_logits()
    for p in (0.3, 0.8, 0.95):
        got = call(run, "top_p_probs", logits.clone(), p)
        expected = torch.softmax(top_p_filter(logits, p), dim=-1)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            mass = torch.softmax(logits, dim=-1) * (expected > 0)
            if torch.allclose(got, mass, atol=1e-6):
                raise AssertionError(f"top_p_probs(p={p}): the kept probabilities are not renormalised - row sums "
                                     f"{[round(s, 3) for s in got.sum(-1).tolist()]}, not 1. Sampling draws from the "
                                     "nucleus alone, each kept token in proportion to its probability divided by the "
                                     "mass kept (softmax of the filtered logits does it)")
        assert_close(got, expected, f"top_p_probs(p={p}) vs softmax(zer02llm top_p_filter)", atol=1e-6)
        assert_close(got, torch.softmax(_hf_top_p(logits, p), dim=-1),
                     f"top_p_probs(p={p}) vs softmax(transformers' TopPLogitsWarper)", atol=1e-6)


# ---------------------------------------------------------------------------------------------- Part B
def _logprob(model: LLM, seq: torch.Tensor, n_prompt: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[None]).logits[0].double(), -1)
    return sum(logp[t - 1, seq[t]].item() for t in range(n_prompt, len(seq)))


def check_min_p_filter(run: NotebookRun):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.0])[:, None]
    for min_p in (0.0, 0.05, 0.1, 0.5, 1.0):
        out = call(run, "min_p_filter", logits.clone(), min_p)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            raise AssertionError(f"min_p_filter should return a tensor of shape {tuple(logits.shape)}, got "
                                 f"{getattr(out, 'shape', type(out))}")
        # reference in log space: p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p)
        gap = logits - logits.max(-1, keepdim=True).values
        keep = gap >= (math.log(min_p) if min_p > 0 else -math.inf)
        got = ~torch.isinf(out)
        if not torch.equal(got, keep):
            row = int((got != keep).any(-1).nonzero()[0])
            raise AssertionError(f"min_p={min_p}: row {row} keeps {int(got[row].sum())} tokens, expected "
                                 f"{int(keep[row].sum())} (keep p_i >= min_p * max_j p_j; removed tokens must be -inf)")
        if not torch.equal(out[keep], logits[keep]):
            raise AssertionError(f"min_p={min_p}: kept logits must be returned unchanged")


def check_beam_search(run: NotebookRun):
    model = _model(seed=5)
    prompt = torch.randint(0, 40, (5,), generator=torch.Generator().manual_seed(6))
    seq, _ = call(run, "beam_search", model, prompt, 1, 7)
    if not torch.equal(torch.as_tensor(seq), _greedy(model, prompt[None], 7)[0]):
        raise AssertionError("beam_search with num_beams=1 must return the greedy sequence (prompt included)")
    for num_beams, n in ((3, 6), (5, 8)):
        result = call(run, "beam_search", model, prompt, num_beams, n)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError("beam_search should return (sequence, score)")
        seq, score = torch.as_tensor(result[0]), float(result[1])
        if seq.dim() != 1 or len(seq) != len(prompt) + n or not torch.equal(seq[: len(prompt)], prompt):
            raise AssertionError(f"beam_search should return the 1-D prompt + {n} new tokens, got shape "
                                 f"{tuple(seq.shape)}")
        true = _logprob(model, seq, len(prompt))
        if abs(true - score) > 1e-3:
            raise AssertionError(f"the returned score {score:.4f} is not the log-probability of the returned tokens "
                                 f"({true:.4f})")
        best = _reference_beam(model, prompt, num_beams, n)
        if true < best - 1e-3:
            raise AssertionError(f"num_beams={num_beams}: your best beam scores {true:.4f}, beam search finds "
                                 f"{best:.4f}")


def _reference_beam(model: LLM, prompt: torch.Tensor, num_beams: int, n: int) -> float:
    beams = [(prompt.tolist(), 0.0)]
    for _ in range(n):
        candidates = []
        for tokens, score in beams:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)
            candidates += [(tokens + [v], score + logp[v].item()) for v in range(len(logp))]
        beams = sorted(candidates, key=lambda c: -c[1])[:num_beams]
    return beams[0][1]


def check_speculative_generate(run: NotebookRun):
    target = _model(seed=7, n_layers=3)
    prompt = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(8))
    n, k = 20, 3
    expected = _greedy(target, prompt, n)
    drafts = (("an unrelated draft", _model(seed=9, n_layers=1)),
              ("a draft identical to the target", _model(seed=7, n_layers=3)))
    for name, draft in drafts:
        calls = []
        hook = target.register_forward_hook(lambda *_: calls.append(1))
        try:
            out = call(run, "speculative_generate", target, draft, prompt, n, k)
        finally:
            hook.remove()
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            raise AssertionError(f"speculative_generate should return shape {tuple(expected.shape)}, got "
                                 f"{getattr(out, 'shape', type(out))}")
        if not torch.equal(out, expected):
            bad = int((out != expected).nonzero()[0, 1])
            raise AssertionError(f"with {name}, the output differs from the target's greedy decoding at position {bad}")
        limit = n + 1 if "unrelated" in name else math.ceil(n / (k + 1)) + 1
        if len(calls) > limit:
            raise AssertionError(f"with {name}, the target ran {len(calls)} times for {n} tokens (k={k}); at most "
                                 f"{limit} needed (one target pass per round checks all k proposals)")
