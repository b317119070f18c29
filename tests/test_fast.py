"""Every fast path equals the readable one: chapter 11's lean decoding step against the cached forward pass,
`zer02llm.fast.generate` against `zer02llm.generate.generate`, the weights it uses (always the current ones, no
copy kept), its fallbacks, and the optional compiled path.

Tolerances: float32 logits within 1e-5 (different but equivalent summation orders); tokens identical."""
import copy
import gc
import shutil
import warnings
import weakref

import pytest
import torch

from zer02llm import fast
from zer02llm.attention import KVCache
from zer02llm.config import LLMconfig
from zer02llm.fast import CompiledOrEager, DecodeWeights, compile_model, decode_step, lean_step
from zer02llm.generate import forward_step
from zer02llm.lora import LoRALinear
from zer02llm.model import LLM

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96)
CONFIGS = {
    "gqa": SMALL,
    "mha": dict(SMALL, n_kv_heads=4),
    "mqa": dict(SMALL, n_kv_heads=1),
    "untied": dict(SMALL, tie_word_embeddings=False),
    "moe": dict(SMALL, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0),
    "moe-shared-unnormalised": dict(SMALL, use_moe=True, n_routed_experts=3, num_experts_per_tok=2, n_shared_experts=2,
                                    norm_topk_prob=False),
}


def make(name: str = "gqa", seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    model = LLM(LLMconfig(**{**CONFIGS[name], **overrides})).eval()
    with torch.no_grad():  # non-trivial norm gains, so that a misplaced gain would show
        for module in model.modules():
            if type(module).__name__ == "RMSnorm":
                module.weight.uniform_(0.5, 1.5)
    return model


def naive_greedy(model: LLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the forward pass for every new token."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_step_equals_cached_forward(name):
    model = make(name)
    c = model.config
    B, T, steps = 3, 7, 8
    prompt = torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    caches = [[KVCache(B, c.n_kv_heads, T + steps, c.head_dim) for _ in model.layers] for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompt, kv_caches=cache)
        weights, token = DecodeWeights(model), prompt[:, -1]
        for pos in range(T, T + steps):
            ref = model(token[:, None], kv_caches=caches[0], start_pos=pos).logits[:, -1]
            lean = decode_step(weights, token, pos, caches[1])
            torch.testing.assert_close(lean, ref, atol=1e-5, rtol=0)
            token = ref.argmax(-1)
        for a, b in zip(*caches):  # the lean step wrote the same keys (after RoPE) and values
            torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=0)


def test_lean_step_with_left_padding_equals_forward_step():
    model = make("gqa")
    c = model.config
    B, T, steps = 2, 6, 5
    prompt = torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    full_mask = torch.ones(B, T + steps, dtype=torch.long)
    full_mask[0, :3] = 0  # 3 pads on the left of sequence 0
    caches = [[KVCache(B, c.n_kv_heads, T + steps, c.head_dim) for _ in model.layers] for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompt, attention_mask=full_mask[:, :T], kv_caches=cache)
        ref_step, lean = forward_step(model), lean_step(model)
        token = prompt[:, -1]
        for pos in range(T, T + steps):
            ref = ref_step(token, pos, caches[0], full_mask[:, :pos + 1])
            torch.testing.assert_close(lean(token, pos, caches[1], full_mask[:, :pos + 1]), ref, atol=1e-5, rtol=0)
            token = ref.argmax(-1)


GENERATE_CASES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3),
    "eos": dict(temperature=0, eos_token_id=[5, 7, 11]),
}


@pytest.mark.parametrize("name", ["gqa", "moe-shared-unnormalised"])
@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_fast_generate_equals_generate(name, case, monkeypatch):
    model = make(name)
    prompt = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(GENERATE_CASES[case], max_new_tokens=20, attention_mask=mask)
    calls = []
    monkeypatch.setattr(fast, "decode_step", lambda *a, **k: calls.append(1) or decode_step(*a, **k))
    lean = fast.generate(model, prompt, generator=torch.Generator().manual_seed(4), **kw)
    assert calls, "fast.generate did not use the lean step"
    calls.clear()
    readable = model.generate(prompt, generator=torch.Generator().manual_seed(4), **kw)
    assert not calls, "the default generate must use the forward pass"
    assert torch.equal(lean, readable)
    streamed = torch.stack(list(fast.stream_generate(model, prompt, generator=torch.Generator().manual_seed(4), **kw)), 1)
    assert torch.equal(streamed, lean[:, 9:])


@pytest.mark.parametrize("gen", [lambda m, *a, **k: m.generate(*a, **k), fast.generate], ids=["generate", "fast"])
def test_generate_greedy_equals_naive_loop(gen):
    model = make("moe")
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(gen(model, ids, max_new_tokens=15, temperature=0), naive_greedy(model, ids, 15))


@pytest.mark.parametrize("gen", [lambda m, *a, **k: m.generate(*a, **k), fast.generate], ids=["generate", "fast"])
def test_generation_uses_the_current_weights_in_any_autograd_mode(gen):
    """Defect: a version-counter cache of the fused weights went stale after `p.data.copy_` and crashed for a model
    built under inference_mode. Every call must compute with the weights as they are at the call."""
    model = make("untied")  # (an untrained tied model mostly repeats its last token, whatever the weights)
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(6))
    first = gen(model, prompt, max_new_tokens=12, temperature=0)
    other = make("untied", seed=9)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)  # invisible to version counters
    after = gen(model, prompt, max_new_tokens=12, temperature=0)
    assert not torch.equal(first, after)
    assert torch.equal(after, naive_greedy(other, prompt, 12))
    with torch.inference_mode():
        frozen = make("untied", seed=9)  # its parameters are inference tensors
        assert torch.equal(gen(frozen, prompt, max_new_tokens=12, temperature=0), after)
    with torch.no_grad():
        assert torch.equal(gen(other, prompt, max_new_tokens=12, temperature=0), after)


def test_fast_generate_keeps_no_copy_of_the_weights(monkeypatch):
    model = make("gqa")
    built = []
    real_init = DecodeWeights.__init__

    def spy(self, m):
        real_init(self, m)
        built.append(weakref.ref(self))

    monkeypatch.setattr(DecodeWeights, "__init__", spy)
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    fast.generate(model, prompt, max_new_tokens=5, temperature=0)
    fast.generate(model, prompt, max_new_tokens=5, temperature=0)
    gc.collect()
    assert len(built) == 2, "the lean weights are laid out once per call"
    assert all(ref() is None for ref in built), "no copy of the weights may outlive the call"
    assert set(model.state_dict()) == set(make("gqa").state_dict())
    assert not any(isinstance(v, DecodeWeights) for v in vars(model).values())


def test_lora_dropout_and_gpu_weights_fall_back_to_the_forward_step():
    model = make("gqa")
    assert DecodeWeights.supports(model)
    attn = model.layers[0].self_attn
    attn.q_proj = LoRALinear(attn.q_proj, rank=2)
    with torch.no_grad():
        attn.q_proj.lora_B.normal_()  # the adapter changes the function
    assert not DecodeWeights.supports(model)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(fast.generate(model, ids, max_new_tokens=10, temperature=0), naive_greedy(model, ids, 10))
    assert not DecodeWeights.supports(make("gqa").to("meta")), "off the CPU the copy would cost memory for nothing"
    dropout_model = make("gqa", dropout=0.1)
    assert DecodeWeights.supports(dropout_model)  # eval mode: dropout is off
    assert not DecodeWeights.supports(dropout_model.train())


def test_bfloat16_lean_step_close_to_forward():
    model = make("gqa").to(torch.bfloat16)
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    caches = [[KVCache(2, c.n_kv_heads, 12, c.head_dim, torch.bfloat16) for _ in model.layers] for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompt, kv_caches=cache)
        ref = model(prompt[:, -1:], kv_caches=caches[0], start_pos=6).logits[:, -1].float()
        lean = decode_step(DecodeWeights(model), prompt[:, -1], 6, caches[1]).float()
    assert lean.dtype == ref.dtype and (lean - ref).abs().max() < 0.05 * ref.abs().max()


# --- the optional compiled path (zer02llm.fast) -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "moe-shared-unnormalised"])
def test_compiled_blocks_train_like_eager(name):
    """backend="aot_eager" traces what Inductor would compile (graphs, autograd) without generating code: seconds.
    MoE blocks are compiled around the dispatch (norms, attention, each expert)."""
    torch._dynamo.reset()
    eager = make(name).train()
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager", decode=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(9))
    losses = []
    for m in (eager, compiled):
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=0, msg=n)


def test_compiled_decode_step_generates_like_eager():
    """MoE: the dispatch's host sync breaks the graph; the positions become dynamic after the first recompile."""
    torch._dynamo.reset()
    eager = make("moe")
    compiled = compile_model(copy.deepcopy(eager), backend="eager", blocks=False)
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(10))
    assert isinstance(compiled.decode_step, CompiledOrEager) and "decode_step" not in vars(eager)
    assert torch.equal(fast.generate(compiled, prompt, max_new_tokens=8, temperature=0),
                       eager.generate(prompt, max_new_tokens=8, temperature=0))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor needs a C++ compiler on CPU")
def test_inductor_compiled_model_generates_and_trains_like_eager():
    """The real backend, as `python -m bench` and learners use it (a tiny model: seconds to compile)."""
    torch._dynamo.reset()
    eager = make("gqa")
    compiled = compile_model(copy.deepcopy(eager))
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(11))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn: it must not happen here
        out = fast.generate(compiled, prompt, max_new_tokens=8, temperature=0)
        loss = compiled.train()(ids, labels=ids).loss
    assert torch.equal(out, eager.generate(prompt, max_new_tokens=8, temperature=0))
    torch.testing.assert_close(loss, eager.train()(ids, labels=ids).loss, atol=1e-5, rtol=0)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = make("gqa")
    reference = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0)
    compile_model(model)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        out = fast.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0)
    assert torch.equal(out, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per function, then plain eager
        fast.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0)


def test_compile_unavailable_and_errors_pass_through(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("unsupported Python")))
    with pytest.warns(RuntimeWarning, match="unsupported Python"):
        wrapped = CompiledOrEager(lambda x: x + 1)
    assert wrapped(1) == 2

    def checks(x):
        raise ValueError("bad input")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # "compiled" = the function itself
    with pytest.raises(ValueError, match="bad input"):
        CompiledOrEager(checks)(0)
    with pytest.raises(TypeError, match="LLM"):
        compile_model(torch.nn.Linear(2, 2))
