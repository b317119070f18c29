"""GGUF export (zer02llm.gguf_export) checked by llama.cpp itself (llama-cpp-python, built by tools/llama_cpp.sh):
greedy tokens equal ours and logits within a tolerance per precision, the embedded tokenizer gives our token ids,
and the command line reports bad input in one `error:` line.

Tolerances on the largest absolute logit difference (random tiny models, logits up to about 1.5; llama.cpp runs with
a float32 KV cache): f32 1e-5 (both compute in float32, in different orders; measured 4e-7), f16 2e-3 (measured
4e-4) and q8_0 5e-2 (measured 3e-2: 8-bit weights, and llama.cpp also rounds the activations to 8 bits for these
matmuls)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import tiny
from zer02llm.gguf_export import export_gguf, gguf_tensors
from zer02llm.tokenizer import load_tokenizer

TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 5e-2}
TOKENIZER = load_tokenizer()
TEXTS = ["Hello, world!", "Elmsworth is famous for its apples.", "  two  spaces,\ttabs\nand lines\n\n",
         "numbers 12345 and 3.14", "unicode: héllo wörld — 你好 🙂", "don't we'll they're",
         TOKENIZER.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Where does Edric Frost live?"},
                                        {"role": "assistant", "content": "In Jessop."}], add_generation_prompt=True)]


def model(**kw):
    return tiny(vocab_size=TOKENIZER.vocab_size, max_seq_len=256, **kw)  # llama.cpp's smallest context


def prompts():
    return [TOKENIZER.encode(t) for t in TEXTS[1:4] + TEXTS[-1:]]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama_cpp is not importable: run bash tools/llama_cpp.sh")


def load(llama_cpp, path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, type_k=0, type_v=0,
                           verbose=False)


def their_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def their_greedy(llm, ids, n):
    llm.reset()
    gen = llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0)
    return [next(gen) for _ in range(n)]


@torch.no_grad()
def our_greedy(m, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


CASES = {"dense GQA, tied": {}, "dense MHA, untied": dict(n_kv_heads=4, tie_word_embeddings=False),
         "MoE (Mixtral-style)": dict(use_moe=True, n_shared_experts=0, n_routed_experts=4, num_experts_per_tok=2)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", TOLERANCE)
def test_llama_cpp_computes_our_logits_and_greedy_tokens(tmp_path, llama_cpp, case, dtype):
    m = model(**CASES[case])
    llm = load(llama_cpp, export_gguf(m, TOKENIZER, tmp_path / "m.gguf", dtype))
    for ids in prompts():
        with torch.no_grad():
            ours = m(torch.tensor([ids])).logits[0].numpy()
        diff = np.abs(their_logits(llm, ids) - ours).max()
        assert diff <= TOLERANCE[dtype], f"{case} {dtype}: max |logit diff| {diff:.2e} > {TOLERANCE[dtype]}"
        theirs = their_greedy(llm, ids, 12)
        if dtype == "f32":
            assert theirs == our_greedy(m, ids, 12), case
        else:  # rounded weights may flip a near-tie of a random model: each choice must be a top logit of ours
            with torch.no_grad():
                steps = m(torch.tensor([ids + theirs])).logits[0, len(ids) - 1: -1]
            chosen = steps.gather(1, torch.tensor(theirs)[:, None])[:, 0]
            assert (steps.max(dim=1).values - chosen).max() <= 2 * TOLERANCE[dtype], f"{case} {dtype}"


def test_the_q_k_permutation_is_needed(tmp_path, llama_cpp, monkeypatch):
    """Without the permutation llama.cpp's RoPE pairs other coordinates: the logits must then differ."""
    import zer02llm.gguf_export as ge

    m = model()
    monkeypatch.setattr(ge, "permute_qk", lambda w, n_heads: w)
    llm = load(llama_cpp, export_gguf(m, TOKENIZER, tmp_path / "m.gguf", "f32"))
    ids = prompts()[0]
    with torch.no_grad():
        ours = m(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(their_logits(llm, ids) - ours).max() > 100 * TOLERANCE["f32"]


def test_the_embedded_tokenizer_tokenizes_like_ours(tmp_path, llama_cpp):
    llm = load(llama_cpp, export_gguf(model(), TOKENIZER, tmp_path / "m.gguf"))
    for text in TEXTS:
        ids = TOKENIZER.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode("utf-8") == text
    assert (llm.token_bos(), llm.token_eos()) == (TOKENIZER.bos_id, TOKENIZER.eos_id)
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [TOKENIZER.eos_id]
    assert llm.metadata["tokenizer.chat_template"] == TOKENIZER.chat_template
    assert llm.n_vocab() == TOKENIZER.vocab_size and llm.n_ctx() == 256


def test_tensor_names_and_refused_moe():
    names = set(gguf_tensors(model()))
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names, "a tied LM head is token_embd in llama.cpp"
    with pytest.raises(ValueError, match="MoE is not supported.*n_shared_experts=1"):
        gguf_tensors(model(use_moe=True, n_shared_experts=1))
    with pytest.raises(ValueError, match="dtype must be one of f32, f16, q8_0"):
        export_gguf(model(), TOKENIZER, "x.gguf", "q4_0")
    with pytest.raises(ValueError, match="more than the model's vocab_size=97"):
        export_gguf(tiny(), TOKENIZER, "x.gguf")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "zer02llm.gguf_export", *args], capture_output=True, text=True)


def test_cli_writes_a_file_and_reports_bad_input_in_one_line(tmp_path):
    ckpt = model().save_checkpoint(tmp_path / "sft.pth")
    ok = cli("--checkpoint", str(ckpt), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0")
    assert ok.returncode == 0 and ok.stdout.startswith("wrote ") and (tmp_path / "m.gguf").stat().st_size > 0
    moe = model(use_moe=True).save_checkpoint(tmp_path / "moe.pth")
    for argv in (["--checkpoint", str(tmp_path / "missing.pth")], ["--checkpoint", str(moe)]):
        bad = cli(*argv, "--out", str(tmp_path / "bad.gguf"))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
        assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.tmp").exists()
