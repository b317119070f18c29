"""Every fast path equals the readable one: the lean decoding step (chapter 06) against the cached forward pass and
`generate` through either path, its weight cache, its fallbacks, and the optional compiled path (chapter 11).

Tolerances: float32 logits within 1e-5 (different but equivalent summation orders); tokens identical."""
import copy
import shutil
import warnings

import pytest
import torch

from zer02llm.attention import KVCache
from zer02llm.config import LLMconfig
from zer02llm.fast import CompiledOrEager, compile_model
from zer02llm.lora import LoRALinear
from zer02llm.model import LLM, DecodeWeights, decode_step

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


def forward_path(monkeypatch):
    """Make `generate` take the forward pass at every step (what it does when the lean step does not apply)."""
    monkeypatch.setattr(DecodeWeights, "supports", staticmethod(lambda model: False))


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
        weights, token = model.decode_weights(), prompt[:, -1]
        assert weights is not None
        for pos in range(T, T + steps):
            ref = model(token[:, None], kv_caches=caches[0], start_pos=pos).logits[:, -1]
            lean = model.decode_step(weights, token, pos, caches[1])
            torch.testing.assert_close(lean, ref, atol=1e-5, rtol=0)
            token = ref.argmax(-1)
        for a, b in zip(*caches):  # the lean step wrote the same keys (after RoPE) and values
            torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=0)


def test_decode_step_with_left_padding_equals_forward():
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
        n_pad = T - full_mask[:, :T].sum(-1)
        weights, token = model.decode_weights(), prompt[:, -1]
        for pos in range(T, T + steps):
            ref = model(token[:, None], attention_mask=full_mask[:, :pos + 1], kv_caches=caches[0], start_pos=pos).logits[:, -1]
            lean = decode_step(weights, token, pos, caches[1], positions=pos - n_pad, key_mask=full_mask.bool())
            torch.testing.assert_close(lean, ref, atol=1e-5, rtol=0)
            token = ref.argmax(-1)


GENERATE_CASES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3),
    "eos": dict(temperature=0, eos_token_id=[5, 7, 11]),
}


@pytest.mark.parametrize("name", ["gqa", "moe-shared-unnormalised"])
@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_lean_equals_forward_path(name, case, monkeypatch):
    model = make(name)
    prompt = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(GENERATE_CASES[case], max_new_tokens=20, attention_mask=mask)
    calls = []
    real_step = model.decode_step
    model.decode_step = lambda *a, **k: calls.append(1) or real_step(*a, **k)
    fast = model.generate(prompt, generator=torch.Generator().manual_seed(4), **kw)
    assert calls, "generate did not use the lean step"
    forward_path(monkeypatch)
    calls.clear()
    slow = model.generate(prompt, generator=torch.Generator().manual_seed(4), **kw)
    assert not calls
    assert torch.equal(fast, slow)


def test_generate_greedy_equals_naive_loop():
    model = make("moe")
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(ids, max_new_tokens=15, temperature=0), naive_greedy(model, ids, 15))


def test_decode_weights_are_cached_until_a_parameter_changes(monkeypatch):
    model = make("gqa")
    w = model.decode_weights()
    assert model.decode_weights() is w
    assert set(model.state_dict()) == set(make("gqa").state_dict()), "the cache must not enter the state_dict"
    prompt = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(prompt, labels=prompt).loss.backward()
    opt.step()  # in-place update: version counters move
    w2 = model.decode_weights()
    assert w2 is not w
    fresh = model.generate(prompt, max_new_tokens=12, temperature=0)
    model.load_state_dict(make("gqa", seed=9).state_dict())  # copy_ into the same tensors
    assert model.decode_weights() is not w2
    after_load = model.generate(prompt, max_new_tokens=12, temperature=0)
    model.double()  # new tensors
    assert model.decode_weights().head.dtype == torch.float64
    forward_path(monkeypatch)
    model.float()
    assert torch.equal(after_load, model.generate(prompt, max_new_tokens=12, temperature=0))
    assert not torch.equal(fresh, after_load)


def test_lora_and_training_dropout_fall_back_to_forward():
    model = make("gqa")
    assert model.decode_weights() is not None
    attn = model.layers[0].self_attn
    attn.q_proj = LoRALinear(attn.q_proj, rank=2)
    with torch.no_grad():
        attn.q_proj.lora_B.normal_()  # the adapter changes the function
    assert model.decode_weights() is None
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.generate(ids, max_new_tokens=10, temperature=0), naive_greedy(model, ids, 10))
    assert not DecodeWeights.supports(make("gqa").to("meta")), "off the CPU the copy would cost memory for nothing"
    dropout_model = make("gqa", dropout=0.1)
    assert dropout_model.decode_weights() is not None  # eval mode: dropout is off
    assert dropout_model.train().decode_weights() is None


def test_bfloat16_lean_step_close_to_forward():
    model = make("gqa").to(torch.bfloat16)
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    caches = [[KVCache(2, c.n_kv_heads, 12, c.head_dim, torch.bfloat16) for _ in model.layers] for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompt, kv_caches=cache)
        ref = model(prompt[:, -1:], kv_caches=caches[0], start_pos=6).logits[:, -1].float()
        lean = model.decode_step(model.decode_weights(), prompt[:, -1], 6, caches[1]).float()
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
    assert torch.equal(compiled.generate(prompt, max_new_tokens=8, temperature=0),
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
        out = compiled.generate(prompt, max_new_tokens=8, temperature=0)
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
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0)
    assert torch.equal(out, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per function, then plain eager
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, temperature=0)


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
