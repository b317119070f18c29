"""Hugging Face round trip: exported folders load in transformers with equal logits, imports match, generate agrees."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from zer02llm.config import LLMconfig  # noqa: E402
from zer02llm.hf import export_hf, import_hf  # noqa: E402
from zer02llm.model import LLM  # noqa: E402
from zer02llm.tokenizer import EOS_TOKEN, PAD_TOKEN, ChatTokenizer, load_tokenizer  # noqa: E402

ATOL = 1e-5  # float32
BASE = dict(vocab_size=211, max_seq_len=64)
CASES = {
    "gqa-tied": dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2),
    "mha-3-heads-untied": dict(dim=48, n_layers=2, n_heads=3, n_kv_heads=None, tie_word_embeddings=False, rope_theta=1e4),
    "mqa-5-heads": dict(dim=80, n_layers=3, n_heads=5, n_kv_heads=1, rope_theta=5e5, norm_eps=1e-5, hidden_dim=136),
    "mixtral": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, use_moe=True, n_shared_experts=0),
    "qwen2-moe-raw-weights": dict(dim=64, n_layers=2, n_heads=4, use_moe=True, n_shared_experts=0, norm_topk_prob=False,
                                  n_routed_experts=5, num_experts_per_tok=3, tie_word_embeddings=False),
    "granite-shared": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, use_moe=True, n_shared_experts=2),
}
ARCH = {"gqa-tied": "LlamaForCausalLM", "mha-3-heads-untied": "LlamaForCausalLM", "mqa-5-heads": "LlamaForCausalLM",
        "mixtral": "MixtralForCausalLM", "qwen2-moe-raw-weights": "Qwen2MoeForCausalLM", "granite-shared": "GraniteMoeSharedForCausalLM"}


def ours(name, seed=0):
    torch.manual_seed(seed)
    return LLM(LLMconfig(**BASE, **CASES[name])).eval()


def x(b=2, t=33, vocab=211, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (our model, transformers model loaded from the exported folder, folder)."""
    out = {}
    for name in CASES:
        folder = tmp_path_factory.mktemp(name)
        model = ours(name)
        export_hf(model, folder)
        out[name] = (model, transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), folder)
    return out


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_transformers_with_equal_logits(exported, name):
    model, hf, folder = exported[name]
    assert type(hf).__name__ == ARCH[name]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == model.config.tie_word_embeddings and (folder / "model.safetensors").exists()
    inp = x()
    with torch.no_grad():
        torch.testing.assert_close(hf(inp).logits, model(inp).logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", CASES)
def test_import_back_is_the_same_model(exported, name):
    model, hf, folder = exported[name]
    for source in (hf, folder, str(folder)):
        back = import_hf(source).eval()
        hidden = (back.layers[0].mlp.experts[0] if back.config.use_moe else back.layers[0].mlp).gate_proj.out_features
        assert back.config == dataclasses.replace(model.config, hidden_dim=hidden)  # the width is stored explicitly
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["gqa-tied", "mixtral", "qwen2-moe-raw-weights", "granite-shared"])
def test_greedy_generate_matches_transformers(exported, name):
    model, hf, _ = exported[name]
    prompt = x(2, 9, seed=3)
    mask = torch.ones_like(prompt)
    mask[0, :3], prompt[0, :3] = 0, 0  # left padding
    ours_out = model.generate(prompt, max_new_tokens=20, temperature=0, attention_mask=mask, repetition_penalty=1.3)
    hf_out = hf.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, repetition_penalty=1.3,
                         eos_token_id=None)  # random weights: no turn to end (stopping: see below)
    assert torch.equal(ours_out, hf_out)


def _hf_models():
    T = transformers
    common = dict(vocab_size=150, max_position_embeddings=64, hidden_act="silu")
    yield "llama-gqa", T.LlamaForCausalLM(T.LlamaConfig(**common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=8, num_key_value_heads=2, rope_theta=3e4))
    yield "llama-5-heads-tied", T.LlamaForCausalLM(T.LlamaConfig(**common, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                                                 num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=True,
                                                                 rms_norm_eps=1e-5))
    yield "mixtral", T.MixtralForCausalLM(T.MixtralConfig(**common, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                         num_experts_per_tok=2))
    qwen = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**common, hidden_size=32, intermediate_size=48, moe_intermediate_size=40,
                                                 shared_expert_intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                                                 qkv_bias=False))
    with torch.no_grad():  # a zero shared expert adds exactly 0: importable
        for name, p in qwen.named_parameters():
            if ".shared_expert." in name:
                p.zero_()
    yield "qwen2-moe", qwen
    yield "granite-shared", T.GraniteMoeSharedForCausalLM(T.GraniteMoeSharedConfig(
        **common, hidden_size=32, intermediate_size=40, shared_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, attention_multiplier=8**-0.5))


@pytest.mark.parametrize("name,hf", list(_hf_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_import_models_built_by_transformers(name, hf):
    hf.eval()
    model = import_hf(hf).eval()
    inp = x(2, 21, vocab=150)
    with torch.no_grad():
        torch.testing.assert_close(model(inp).logits, hf(inp).logits, atol=ATOL, rtol=ATOL)
    prompt = x(1, 6, vocab=150, seed=4)
    assert torch.equal(model.generate(prompt, max_new_tokens=15, temperature=0),
                       hf.generate(prompt, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0))


def test_import_max_seq_len_override():
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                num_attention_heads=4, max_position_embeddings=4096))
    assert import_hf(hf, max_seq_len=128).config.max_seq_len == 128


SPECIAL = ("eos_token_id", "pad_token_id", "bos_token_id")


def _special_ids(folder) -> dict:
    """{file: [eos, pad, bos]} as written in config.json and generation_config.json."""
    files = ("config.json", "generation_config.json")
    return {f: [json.loads((folder / f).read_text()).get(k) for k in SPECIAL] for f in files}


@pytest.mark.parametrize("name", CASES)
def test_export_writes_the_chat_special_tokens(exported, name):
    """<|im_end|> = 2 ends a turn, <|endoftext|> = 0 pads, <|im_start|> = 1: in both files, for every architecture."""
    _, hf, folder = exported[name]
    assert _special_ids(folder) == {"config.json": [2, 0, 1], "generation_config.json": [2, 0, 1]}
    assert "_from_model_config" not in json.loads((folder / "generation_config.json").read_text())  # explicit
    assert [getattr(hf.generation_config, k) for k in SPECIAL] == [2, 0, 1]


def test_default_special_ids_are_the_shipped_tokenizers(exported):
    tok = load_tokenizer()
    assert _special_ids(exported["gqa-tied"][2])["config.json"] == [tok.eos_id, tok.pad_id, tok.bos_id]


def countdown_model(vocab_size=64, dim=64, seed=0):
    """Greedy next token after t is t - 1: orthonormal embeddings (RMS 1) dominate the residual stream, and LM head
    row t - 1 is embedding row t (margin ~64 logits), so a prompt ending in t reaches id 2 after t - 2 tokens."""
    torch.manual_seed(seed)
    model = LLM(LLMconfig(vocab_size=vocab_size, dim=dim, n_layers=2, n_heads=4, max_seq_len=64,
                          tie_word_embeddings=False))
    rows = torch.linalg.qr(torch.randn(dim, dim))[0][:vocab_size] * dim**0.5
    with torch.no_grad():
        model.embed_tokens.weight.copy_(rows)
        model.lm_head.weight.copy_(rows.roll(-1, dims=0))
    return model.eval()


def test_transformers_generate_stops_at_eos_like_ours(tmp_path):
    model = countdown_model()
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[30, 41, 9], [12, 5, 6], [50, 60, 4]])  # countdowns of 7, 4 and 2 tokens
    hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    ours_out = model.generate(prompt, max_new_tokens=20, eos_token_id=2, temperature=0)
    assert hf_out.shape == ours_out.shape == (3, 3 + 7)  # both stopped when the last row ended, not after 20 tokens
    for n, row_hf, row_ours in zip((7, 4, 2), hf_out.tolist(), ours_out.tolist()):
        end = 3 + n
        assert row_hf[:end] == row_ours[:end] == row_hf[:3] + list(range(row_hf[2] - 1, 1, -1))
        assert row_hf[end - 1] == 2 and 2 not in row_hf[3:end - 1]
        assert row_hf[end:] == [0] * (7 - n) and row_ours[end:] == [2] * (7 - n)  # filled with pad / with eos


def test_export_config_overrides(tmp_path):
    export_hf(ours("gqa-tied"), tmp_path, eos_token_id=3, bos_token_id=5)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert _special_ids(tmp_path) == {"config.json": [3, 0, 5], "generation_config.json": [3, 0, 5]}


def test_export_override_none_exports_a_model_that_never_stops(tmp_path):
    export_hf(countdown_model(), tmp_path, eos_token_id=None)
    assert _special_ids(tmp_path)["generation_config.json"] == [None, 0, 1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[30, 41, 9]])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert out.shape[1] == 3 + 12 and out[0, 9].item() == 2  # went past <|im_end|>


def test_export_with_tokenizer_is_a_complete_folder(tmp_path):
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
    export_hf(model, tmp_path, tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id] == [2, 0, 1]
    assert [tok.eos_id, tok.pad_id, tok.bos_id] == [2, 0, 1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie heißt du? 你好 🙂"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    for s in (text, "plain text, with  spaces\nand lines", "<|im_start|>user\nhi<|im_end|>"):
        assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s)
        assert hf_tok.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [getattr(hf.generation_config, k) for k in SPECIAL] == [2, 0, 1]


def test_export_takes_the_ids_from_the_tokenizer(tmp_path):
    base = load_tokenizer()  # the same vocabulary, other roles: <|endoftext|> ends a turn, <|im_end|> pads
    tok = ChatTokenizer(base.tokenizer, eos_token=PAD_TOKEN, pad_token=EOS_TOKEN)
    model = LLM(LLMconfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
    export_hf(model, tmp_path, tokenizer=tok)
    assert _special_ids(tmp_path) == {"config.json": [0, 2, 1], "generation_config.json": [0, 2, 1]}
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token_id == 0


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    tok = load_tokenizer()
    with pytest.raises(ValueError, match=f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size=211"):
        export_hf(ours("gqa-tied"), tmp_path, tokenizer=tok)


def test_export_refuses_shared_experts_without_renormalisation(tmp_path):
    model = LLM(LLMconfig(**BASE, dim=32, n_layers=1, n_heads=2, use_moe=True, n_shared_experts=1, norm_topk_prob=False))
    with pytest.raises(ValueError, match="norm_topk_prob=True or n_shared_experts=0"):
        export_hf(model, tmp_path)


def _unsupported():
    T = transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    yield T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)), "model_type 'qwen3_moe'"
    yield T.LlamaForCausalLM(T.LlamaConfig(**small, attention_bias=True)), "biases"
    yield T.LlamaForCausalLM(T.LlamaConfig(**small, rope_scaling={"rope_type": "linear", "factor": 2.0})), "RoPE type 'linear'"
    yield T.LlamaForCausalLM(T.LlamaConfig(**small, hidden_act="gelu")), "hidden_act 'gelu'"
    yield T.MixtralForCausalLM(T.MixtralConfig(**small, num_local_experts=4, sliding_window=16, max_position_embeddings=64)), "sliding_window=16"
    yield T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**small, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                              qkv_bias=False)), "non-zero shared expert"
    yield T.GraniteMoeSharedForCausalLM(T.GraniteMoeSharedConfig(**small, num_local_experts=4, shared_intermediate_size=64,
                                                                 embedding_multiplier=12.0)), "multipliers"


@pytest.mark.parametrize("hf,message", list(_unsupported()), ids=lambda v: v if isinstance(v, str) else "")
def test_import_refuses_what_it_cannot_compute_exactly(hf, message):
    with pytest.raises(ValueError, match=message):
        import_hf(hf)


def test_import_bad_argument():
    with pytest.raises(TypeError, match="folder path or a transformers PreTrainedModel"):
        import_hf(42)


def test_package_import_does_not_import_transformers():
    code = "import sys, zer02llm, zer02llm.model, zer02llm.hf, zer02llm.generate; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_refuses_overriding_the_architecture(tmp_path):
    with pytest.raises(ValueError, match=r"\['num_hidden_layers'\] follow from model.config"):
        export_hf(ours("gqa-tied"), tmp_path, num_hidden_layers=5)
