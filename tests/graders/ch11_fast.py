"""Grader for exercises/11_fast_exercises.ipynb: decode bytes per token, the decoding floor, fused (in, out)
matrices, training flops per token and MFU.

The references count the tensors of real `LLM(config)` models (module by module, routed experts scaled by k/E),
independently of the closed-form formulas the task statements give."""
import math

import torch
from torch import nn

from grading import NotebookRun, assert_close, call, get
from zer02llm.config import LLMconfig
from zer02llm.model import LLM

NOTEBOOK = "11_fast_exercises.ipynb"

CONFIGS = {  # name -> config: dense/MoE, GQA/MHA/MQA, tied/untied, explicit and derived FFN widths
    "default (dense, GQA 8/2, tied)": LLMconfig(),
    "dense MHA, untied": LLMconfig(vocab_size=1000, dim=128, n_layers=3, n_heads=4, n_kv_heads=None,
                                   tie_word_embeddings=False),
    "MoE top-2 of 8, no shared expert, hidden_dim=200": LLMconfig(
        vocab_size=500, dim=96, n_layers=2, n_heads=6, n_kv_heads=3, hidden_dim=200, use_moe=True,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=0),
    "MoE top-1 of 4 + 2 shared, MQA, untied": LLMconfig(
        vocab_size=700, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32, use_moe=True,
        n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=2, tie_word_embeddings=False),
    "default MoE (top-2 of 4 + 1 shared)": LLMconfig(use_moe=True),
}
_models: dict[str, LLM] = {}


def _model(name: str) -> LLM:
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = LLM(CONFIGS[name])
    return _models[name]


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _ffn_matmul(block) -> int:
    """Matrix-product weights of one block's FFN that one token uses (router + k routed + shared experts for MoE)."""
    mlp = block.mlp
    if not block.is_moe:
        return _numel([mlp])
    routed = _numel(mlp.experts)  # all experts have the same size: a token uses k/E of them
    return mlp.gate.weight.numel() + routed * mlp.gate.top_k // len(mlp.experts) + _numel(mlp.shared_experts)


def _attention_matmul(block) -> int:
    return sum(m.weight.numel() for m in block.self_attn.modules() if isinstance(m, nn.Linear))


def _decode_parts(model: LLM, context: int) -> dict[str, int]:
    """Elements read by one decoding step, by kind."""
    layers = model.layers
    kv_per_position = sum(b.self_attn.k_proj.out_features + b.self_attn.v_proj.out_features for b in layers)
    return {
        "embedding row": model.embed_tokens.weight.shape[1],
        "norm gains": sum(_numel([b.input_layernorm, b.post_attention_layernorm]) for b in layers) + _numel([model.norm]),
        "attention matrices": sum(_attention_matmul(b) for b in layers),
        "FFN matrices (and routers)": sum(_ffn_matmul(b) for b in layers),
        "LM head": model.lm_head.weight.numel(),
        "KV cache": kv_per_position * context,
    }


def _check_decode_bytes(run: NotebookRun, cases) -> None:
    for name, dtype_bytes, context in cases:
        parts = {k: v * dtype_bytes for k, v in _decode_parts(_model(name), context).items()}
        want = sum(parts.values())
        got = call(run, "decode_bytes_per_token", CONFIGS[name], dtype_bytes=dtype_bytes, context=context)
        assert isinstance(got, int) and not isinstance(got, bool), (
            f"decode_bytes_per_token should return an int (a count of bytes), got {type(got).__name__} {got!r}")
        if got != want:
            diff, (vocab, dim) = got - want, _model(name).embed_tokens.weight.shape
            hints = [f"the difference is exactly the {k} ({'counted twice' if diff > 0 else 'left out'}?)"
                     for k, v in parts.items() if v and abs(diff) == v]
            if diff == (vocab - 1) * dim * dtype_bytes:
                hints.append("the lookup reads one row of the embedding table, not all of it")
            if parts["KV cache"] and 2 * diff == -parts["KV cache"]:
                hints.append("the cache holds keys and values: 2 vectors per layer, position and key/value head")
            if CONFIGS[name].use_moe and diff > 0:
                hints.append("for MoE count only the k routed experts a token picks, plus the shared ones and the router")
            raise AssertionError(
                f"decode_bytes_per_token({name}, dtype_bytes={dtype_bytes}, context={context}) = {got:,}, "
                f"expected {want:,} = " + " + ".join(f"{k} {v:,}" for k, v in parts.items())
                + "".join(f"; {h}" for h in hints))


def check_decode_bytes_weights(run: NotebookRun) -> None:
    _check_decode_bytes(run, [(name, 4, 0) for name in CONFIGS] + [("dense MHA, untied", 2, 0)])


def check_decode_bytes_kv_cache(run: NotebookRun) -> None:
    _check_decode_bytes(run, [("default (dense, GQA 8/2, tied)", 4, 1024), ("dense MHA, untied", 2, 37),
                              ("MoE top-1 of 4 + 2 shared, MQA, untied", 1, 4096),
                              ("MoE top-2 of 8, no shared expert, hidden_dim=200", 2, 1)])


def check_decode_floor(run: NotebookRun) -> None:
    for name, bandwidth, context, dtype_bytes in [("default (dense, GQA 8/2, tied)", 9.2, 0, 4),
                                                  ("dense MHA, untied", 3350.0, 2048, 2),
                                                  ("default MoE (top-2 of 4 + 1 shared)", 100.0, 500, 4)]:
        want = bandwidth * 1e9 / (dtype_bytes * sum(_decode_parts(_model(name), context).values()))
        got = call(run, "decode_floor_tokens_per_s", CONFIGS[name], bandwidth, context=context, dtype_bytes=dtype_bytes)
        assert isinstance(got, (int, float)) and not isinstance(got, bool), (
            f"decode_floor_tokens_per_s should return a number, got {type(got).__name__}")
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"decode_floor_tokens_per_s({name}, {bandwidth} GB/s, context={context}, dtype_bytes={dtype_bytes}) = "
            f"{got:.6g}, expected {want:.6g} tokens/s (bandwidth in bytes/s = GB/s × 1e9, ÷ bytes per token)")


def _linears(sizes, in_features, dtype=torch.float32):
    torch.manual_seed(sum(sizes) + in_features)
    return [nn.Linear(in_features, n, bias=False).to(dtype) for n in sizes]


def check_fuse_in_out_values(run: NotebookRun) -> None:
    for sizes, in_features, dtype in [((48, 16, 16), 48, torch.float32), ((40, 40), 24, torch.float32),
                                      ((7,), 5, torch.float32), ((3, 11, 1, 6), 9, torch.float64)]:
        linears = _linears(sizes, in_features, dtype)
        got = call(run, "fuse_in_out", *linears)
        assert isinstance(got, torch.Tensor), f"fuse_in_out should return a tensor, got {type(got).__name__}"
        what = f"fuse_in_out of {len(sizes)} Linear({in_features}, out) with out = {list(sizes)}"
        with torch.no_grad():
            assert_close(got.detach(), torch.cat([lin.weight.t() for lin in linears], dim=1), what, atol=0, rtol=0)
            x = torch.randn(4, in_features, dtype=dtype)
            assert_close(x @ got.detach(), torch.cat([lin(x) for lin in linears], dim=-1), f"x @ ({what})", atol=1e-6, rtol=1e-6)


def check_fuse_in_out_layout(run: NotebookRun) -> None:
    for sizes, in_features in [((64, 32, 32), 64), ((96,), 32), ((20, 20), 12)]:
        linears = _linears(sizes, in_features)
        got = call(run, "fuse_in_out", *linears)
        assert isinstance(got, torch.Tensor), f"fuse_in_out should return a tensor, got {type(got).__name__}"
        what = f"fuse_in_out of Linear({in_features}, out) with out = {list(sizes)}"
        assert tuple(got.shape) == (in_features, sum(sizes)), f"{what}: shape {tuple(got.shape)}, expected {(in_features, sum(sizes))}"
        assert got.is_contiguous(), f"{what} is not contiguous: `.t()` gives the (in, out) shape but keeps the (out, in) memory; add `.contiguous()`"
        ptr = got.untyped_storage().data_ptr()
        for lin in linears:
            assert ptr != lin.weight.untyped_storage().data_ptr(), f"{what} shares memory with a layer's weight: return a copy"


def check_fuse_in_out_rejects_mismatch(run: NotebookRun) -> None:
    fn = get(run, "fuse_in_out")
    for args, what in [((nn.Linear(8, 4, bias=False), nn.Linear(6, 4, bias=False)), "in_features 8 and 6"),
                       ((), "no layers")]:
        try:
            fn(*args)
        except ValueError:
            continue
        except NotImplementedError:
            raise AssertionError("`fuse_in_out` is not implemented yet") from None
        except Exception as e:
            raise AssertionError(f"fuse_in_out with {what} should raise ValueError, raised {type(e).__name__}: {e}") from e
        raise AssertionError(f"fuse_in_out with {what} should raise ValueError (the layers cannot share one input matrix)")


def _train_reference(name: str, seq_len: int) -> tuple[float, int, int]:
    """(flops per token, matrix-product weights N, attention term) for CONFIGS[name]."""
    model = _model(name)
    n = model.lm_head.weight.numel() + sum(_attention_matmul(b) + _ffn_matmul(b) for b in model.layers)
    attention = sum(12 * b.self_attn.q_proj.out_features * seq_len for b in model.layers)
    return 6 * n + attention, n, attention


def check_train_flops_per_token(run: NotebookRun) -> None:
    for name, seq_len in [("default (dense, GQA 8/2, tied)", 256), ("dense MHA, untied", 1024),
                          ("MoE top-2 of 8, no shared expert, hidden_dim=200", 64),
                          ("MoE top-1 of 4 + 2 shared, MQA, untied", 4096), ("default MoE (top-2 of 4 + 1 shared)", 512)]:
        want, n, attention = _train_reference(name, seq_len)
        got = call(run, "train_flops_per_token", CONFIGS[name], seq_len)
        assert isinstance(got, (int, float)) and not isinstance(got, bool), (
            f"train_flops_per_token should return a number, got {type(got).__name__}")
        assert math.isclose(got, want, rel_tol=1e-12), (
            f"train_flops_per_token({name}, seq_len={seq_len}) = {got:,.0f}, expected {want:,} = 6 × N ({n:,} "
            f"matrix-product weights per token: attention, FFN/active experts and router, LM head; no embedding, no "
            f"norms) + 12·L·H·D·T ({attention:,})")


def check_mfu(run: NotebookRun) -> None:
    for name, tokens_per_s, seq_len, peak in [("default (dense, GQA 8/2, tied)", 500.0, 256, 192e9),
                                               ("dense MHA, untied", 2.5e5, 2048, 989e12),
                                               ("default MoE (top-2 of 4 + 1 shared)", 300.0, 512, 1e11)]:
        want = tokens_per_s * _train_reference(name, seq_len)[0] / peak
        got = call(run, "mfu", tokens_per_s, CONFIGS[name], seq_len, peak)
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"mfu should return a number, got {type(got).__name__}"
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"mfu({tokens_per_s} tokens/s, {name}, seq_len={seq_len}, peak={peak:.3g}) = {got:.6g}, expected {want:.6g} "
            f"(tokens/s × train_flops_per_token ÷ peak flops/s)")
