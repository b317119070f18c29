"""LoRA (zer02llm.lora) against the formula y = x W^T + b + (alpha/r) x A^T B^T, on single layers and on an LLM.
Tolerance for float32 comparisons: 1e-5."""
import pytest
import torch
from torch import nn

from zer02llm.config import LLMconfig
from zer02llm.lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora, save_lora
from zer02llm.model import LLM
from zer02llm.utils import seed_everything

ATOL = 1e-5
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llm(dim: int = 32, seed: int = 0) -> LLM:
    seed_everything(seed)
    return LLM(LLMconfig(vocab_size=50, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)).eval()


def test_lora_linear_matches_the_formula_and_starts_at_the_base():
    seed_everything(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6)
    x = torch.randn(4, 5, 12)
    assert torch.equal(layer(x), base(x)), "B = 0 at initialisation: the adapted layer equals the base layer"
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3) and layer.scaling == 2.0
    with torch.no_grad():
        layer.lora_B.normal_()
    want = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(layer.merged()(x), want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_lora_linear_rejects_bad_settings():
    with pytest.raises(ValueError, match="positive int"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="exceeds"):
        LoRALinear(nn.Linear(4, 8), rank=5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))


def test_apply_lora_freezes_the_model_and_counts_parameters():
    model = tiny_llm()
    x = torch.randint(0, 50, (2, 10))
    before = model(x).logits
    names = apply_lora(model, rank=4, alpha=8, targets=TARGETS)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(x).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    want = sum(4 * (m.base.in_features + m.base.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=TARGETS)
    with pytest.raises(ValueError, match=r"match no nn.Linear.*q_proj"):
        apply_lora(tiny_llm(), targets=["query"])


def test_training_moves_only_the_adapters_and_merge_keeps_outputs(tmp_path):
    model = tiny_llm()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, targets=TARGETS)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (4, 12))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base.", ".")]), name
    adapted = model(x).logits
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(x).logits, adapted, atol=ATOL, rtol=ATOL)
    assert set(merged.state_dict()) == set(base_state), "a merged model is a plain LLM again"


def test_save_load_round_trip_and_bad_files(tmp_path):
    model = tiny_llm()
    apply_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    path = save_lora(model, tmp_path / "adapter.pth", base="out/pretrain_32.pth")
    saved = torch.load(path, weights_only=True)
    assert saved["lora"] == {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]}
    assert set(saved["weights"]) == set(lora_state_dict(model)) and len(saved["weights"]) == 2 * 2 * 2
    fresh = tiny_llm()
    assert load_lora(fresh, path) == {"base": "out/pretrain_32.pth"}
    x = torch.randint(0, 50, (2, 8))
    assert torch.equal(fresh(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="another model size"):
        load_lora(tiny_llm(dim=64), path)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable LoRA adapter"):
        load_lora(tiny_llm(), tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_lora(tiny_llm(), tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(tiny_llm(), tmp_path / "none.pth")


def test_lora_refuses_a_tied_lm_head_and_adapts_an_untied_one(tmp_path):
    """Defect: merging an adapter on a tied lm_head untied it while the saved config still said tied, so the reloaded
    model differed (max logit difference 2.6) without an error. A shared weight is now refused, with the fix."""
    torch.manual_seed(0)
    tied = LLM(LLMconfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(ValueError, match="lm_head: its weight is also embed_tokens.weight .*tie_word_embeddings=False"):
        apply_lora(tied, targets=["lm_head", "q_proj"])
    assert not any(isinstance(m, LoRALinear) for m in tied.modules()) and all(p.requires_grad for p in tied.parameters())
    untied = LLM(LLMconfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16, tie_word_embeddings=False))
    apply_lora(untied, targets=["lm_head"])
    with torch.no_grad():
        untied.lm_head.lora_B.normal_()
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = untied(x).logits
        merge_lora(untied).save_checkpoint(tmp_path / "m.pth")
        torch.testing.assert_close(LLM.from_checkpoint(tmp_path / "m.pth")(x).logits, want, atol=1e-5, rtol=0)
