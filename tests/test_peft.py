"""LoRA adapters in PEFT's format (zer02llm.lora, format="peft") against the real peft on the real transformers model
that export_hf writes: both directions give equal logits (float32, 1e-5), and adapters we cannot compute are refused
with a clear error."""
import json

import pytest
import torch

from zer02llm.config import LLMconfig
from zer02llm.hf import export_hf
from zer02llm.lora import apply_lora, load_lora, save_lora
from zer02llm.model import LLM
from zer02llm.utils import seed_everything

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' notice on a deprecated name
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llm(seed: int = 0, **kw) -> LLM:
    seed_everything(seed)
    cfg = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return LLM(LLMconfig(**{**cfg, **kw})).eval()


def hf_model(model: LLM, directory):
    export_hf(model, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def trained_adapter(model: LLM, targets, rank: int = 4, alpha: float = 8.0) -> LLM:
    """`model` with LoRA on `targets`, A and B random (a fresh adapter has B = 0 and would change nothing)."""
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


X = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, tied):
    targets = TARGETS if tied else [*TARGETS, "lm_head"]
    ours = trained_adapter(tiny_llm(tie_word_embeddings=tied), targets)
    folder = save_lora(ours, tmp_path / "adapter", format="peft", base="tiny.pth")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, sorted(targets))
    base = hf_model(tiny_llm(tie_word_embeddings=tied), tmp_path / "hf")
    with torch.no_grad():
        before = base(X).logits.clone()
    theirs = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        want, got = ours(X).logits, theirs(X).logits
    assert (want - before).abs().max() > 0.1, "the adapter must change the logits for the test to mean anything"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert load_lora(tiny_llm(tie_word_embeddings=tied), folder, format="peft") == {"base": "tiny.pth"}


def peft_adapter(tmp_path, targets=("q_proj", "v_proj", "down_proj"), r=4, **kw):
    """An adapter made and saved by peft itself on the exported model (random A and B), and that PeftModel."""
    base = hf_model(tiny_llm(), tmp_path / "hf")
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=list(targets), init_lora_weights=False, **kw)
    theirs = peft.get_peft_model(base, cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    return tmp_path / "theirs", theirs


def test_peft_adapter_loads_into_our_model_with_equal_logits(tmp_path):
    folder, theirs = peft_adapter(tmp_path)
    ours = tiny_llm()
    with torch.no_grad():
        before = ours(X).logits.clone()
    assert load_lora(ours, folder, format="peft") == {}
    assert sorted({n.rsplit(".", 2)[-2] for n, p in ours.named_parameters() if p.requires_grad}) == [
        "down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        want, got = theirs(X).logits, ours(X).logits
    assert (want - before).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_mismatching_adapters_are_refused_clearly(tmp_path):
    folder, _ = peft_adapter(tmp_path)
    edit_config(folder, r=8)
    with pytest.raises(ValueError, match=r"says r=8, but layers.0.mlp.down_proj.lora_A has rank 4"):
        load_lora(tiny_llm(), folder, format="peft")
    edit_config(folder, r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"does not fit this model: missing \[\], unexpected \['layers.0.mlp.down"):
        load_lora(tiny_llm(), folder, format="peft")
    edit_config(folder, target_modules=["query"])
    with pytest.raises(ValueError, match=r"match no nn.Linear"):
        load_lora(tiny_llm(), folder, format="peft")
    edit_config(folder, target_modules=["q_proj", "v_proj", "down_proj"])
    with pytest.raises(ValueError, match="another model size"):
        load_lora(tiny_llm(dim=64), folder, format="peft")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder: no adapter_config.json"):
        load_lora(tiny_llm(), tmp_path, format="peft")
    with pytest.raises(ValueError, match="format must be 'native' or 'peft'"):
        load_lora(tiny_llm(), folder, format="hf")


@pytest.mark.parametrize("change, what", [({"use_rslora": True}, "rsLoRA"), ({"use_dora": True}, "DoRA"),
                                          ({"target_modules": "all-linear"}, "pattern"),
                                          ({"bias": "all"}, "trained biases"), ({"peft_type": "IA3"}, "only LORA")])
def test_peft_features_we_do_not_compute_are_refused(tmp_path, change, what):
    folder, _ = peft_adapter(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(ValueError, match=what):
        load_lora(tiny_llm(), folder, format="peft")


def test_moe_experts_have_no_peft_export(tmp_path):
    model = tiny_llm(use_moe=True, n_shared_experts=0)
    apply_lora(model, targets=["q_proj", "gate_proj"])
    with pytest.raises(ValueError, match="PEFT has no LoRA for layers.0.mlp.experts"):
        save_lora(model, tmp_path / "a", format="peft")
