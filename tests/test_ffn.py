"""zer02llm.ffn: the SwiGLU FFN against independent formulations (float32, atol 1e-5) and Hugging Face's LlamaMLP."""
import math

import pytest
import torch
import torch.nn.functional as F

from zer02llm.ffn import FFN, swiglu_hidden_dim

ATOL = 1e-5  # float32, sums of at most a few hundred products


def fused_reference(x, ffn):
    """One matmul for gate and up (stacked weights, chunked), SiLU as a·sigmoid(a), einsum matmuls."""
    w = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
    a, b = torch.einsum("...d,hd->...h", x, w).chunk(2, dim=-1)
    return torch.einsum("...h,dh->...d", a * torch.sigmoid(a) * b, ffn.down_proj.weight)


@pytest.mark.parametrize("dim,multiple_of", [(1, 64), (3, 8), (64, 64), (100, 64), (512, 64), (768, 64), (4096, 256), (896, 1)])
def test_hidden_dim_rule(dim, multiple_of):
    h = swiglu_hidden_dim(dim, multiple_of)
    target = math.floor(8 * dim / 3)
    assert h % multiple_of == 0 and target <= h < target + multiple_of


def test_hidden_dim_known_values():
    assert swiglu_hidden_dim(512) == 1408  # MiniMind's 512-wide model
    assert swiglu_hidden_dim(4096, 256) == 11008  # Llama-2-7B
    assert swiglu_hidden_dim(768) == 2048


def test_layout_and_parameter_count():
    ffn = FFN(64, hidden_dim=96)
    assert [n for n, _ in ffn.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert ffn.gate_proj.weight.shape == ffn.up_proj.weight.shape == (96, 64)
    assert ffn.down_proj.weight.shape == (64, 96)
    assert FFN(64).gate_proj.out_features == swiglu_hidden_dim(64)
    assert FFN(64, multiple_of=32).gate_proj.out_features == swiglu_hidden_dim(64, 32)


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (2, 3, 4, 24)])
def test_forward_and_grads_match_fused_reference(shape):
    torch.manual_seed(0)
    ffn = FFN(24, hidden_dim=40)
    x = torch.randn(*shape, requires_grad=True)
    y, y_ref = ffn(x), fused_reference(x, ffn)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-5)
    params = [x, *ffn.parameters()]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_matches_hf_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    ffn = FFN(32, hidden_dim=64)
    hf = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu"))
    hf.load_state_dict({k: v for k, v in ffn.state_dict().items()})
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ffn(x), hf(x), atol=ATOL, rtol=1e-5)


def test_dropout_train_and_eval():
    torch.manual_seed(0)
    ffn = FFN(16, hidden_dim=32, dropout=0.25)
    x = torch.randn(64, 16)
    ffn.eval()
    y_eval = ffn(x)
    torch.testing.assert_close(y_eval, fused_reference(x, ffn), atol=ATOL, rtol=1e-5)
    ffn.train()
    torch.manual_seed(1)
    y_train = ffn(x)
    torch.manual_seed(1)  # the same random draws: dropout is the only random op
    torch.testing.assert_close(y_train, F.dropout(y_eval.detach(), 0.25, training=True), atol=ATOL, rtol=1e-5)


def test_bf16_in_bf16_out():
    ffn = FFN(16, hidden_dim=32).to(torch.bfloat16)
    assert ffn(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 0}, "dim must be a positive"),
        ({"dim": -4}, "dim must be a positive"),
        ({"dim": 16, "hidden_dim": 0}, "hidden_dim must be a positive"),
        ({"dim": 16, "multiple_of": 0}, "multiple_of must be a positive"),
        ({"dim": 16, "dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
        ({"dim": 16, "dropout": -0.1}, r"dropout is a probability"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FFN(**kwargs)


def test_hidden_dim_bad_arguments():
    with pytest.raises(ValueError, match="multiple_of"):
        swiglu_hidden_dim(64, -1)
    with pytest.raises(ValueError, match="dim"):
        swiglu_hidden_dim(0)
