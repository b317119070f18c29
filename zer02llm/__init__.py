"""Zero to LLM: a notebook-first course that builds a modern small language model in PyTorch, and the package it exports.

Modules:

- `zer02llm.config`: `LLMconfig`: every hyperparameter of an `LLM` in one validated dataclass, stored inside every checkpoint. - Fields (defaults): `vocab_size=6400, dim=512, n_layers=8, n_heads=8, n_kv_heads=2` (`None` = `n_heads`), `max_seq_len=512, rope_theta=1e6, norm_eps=1e-6, hidden_dim=None` (SwiGLU width 8/3·dim rounded up to `multiple_of=64`), `dropout=0.0, flash_attn=True, tie_word_embeddings=True, use_moe=False, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, norm_topk_prob=True, aux_loss_alpha=0.01`; `.head_dim`. - Invalid combinations (sizes, head divisibility, odd head_dim, top-k > experts, dropout outside [0, 1), wrong types) raise one `ValueError` at construction that lists every problem and what to change. - `to_dict()` / `from_dict(d)` (unknown keys are an error, missing keys take their defaults), `to_json(path=None) -> str` / `from_json(text_or_path)`.
- `zer02llm.corpus`: The course's data files: a seeded "tiny world" generator, the JSONL formats, and a reader with clear errors. - `python -m zer02llm.corpus [--out dataset] [--seed 0] [--size_mb 4]` writes `dataset/pretrain_hq.jsonl` (`{"text": ...}` per line), `dataset/sft_data.jsonl` (MiniMind's `{"conversations": [{"role", "content"}, ...]}`) and `dataset/eval_facts.jsonl` (`{"question", "answer"}`: facts stated in the pretraining text but in no SFT example; `answer_matches(reply, answer)` is the metric). - `write_builtin_dataset(out_dir="dataset", seed=0, size_mb=4.0) -> {"pretrain", "sft", "eval"}` (paths) does the same from Python. The same seed gives byte-identical files; every file is written to a temporary name and renamed. - Real data: `python -m zer02llm.corpus download --source tinystories|minimind --out dataset [--size_mb N]` downloads from the Hugging Face Hub (needs `huggingface_hub`) and converts to the same formats. - `iter_jsonl(path, check, skip_bad_lines)` reads a JSONL file line by line (never whole); a bad line raises `JsonlError` naming the file and line, or is skipped and counted with `skip_bad_lines=True`.
- `zer02llm.data`: Training examples from the JSONL files, and the one loader that batches them. - Labels follow Hugging Face: the same positions as `input_ids` (the model shifts them inside), `-100` where no loss is taken. - `PretrainDataset(path, tokenizer, max_seq_len, cache_dir=None, skip_bad_lines=False)`: documents wrapped in `bos`/`eos`, packed into blocks of `max_seq_len` without padding, `labels == input_ids`; tokenized once into a cached memmap. - `SFTDataset(path, tokenizer, max_seq_len, cache_dir=None, skip_bad_lines=False)`: a conversation in the chat template, up to `max_seq_len` tokens, labels only on assistant tokens; `collate` pads a batch to its longest example and adds the `attention_mask`. `encode_sft(tokenizer, messages, max_seq_len)` makes one example. - `make_loader(dataset, batch_size, epoch=0, seed=0, skip_batches=0, rank=0, world_size=1, shuffle=True, num_workers=0, pin_memory=False) -> DataLoader`: one epoch's batches for one rank, in an order fixed by `(seed, epoch)`, resumable mid-epoch.
- `zer02llm.generate`: The generation loop and sampling: `generate(model, input_ids, max_new_tokens=128, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, eos_token_id=None, attention_mask=None, generator=None, stream=False)` (also `model.generate(...)`), `stream_generate(...)`, and `sample_next_token`, `top_k_filter`, `top_p_filter`, `apply_repetition_penalty`.
- `zer02llm.hf`: Hugging Face `transformers` round trip with equal logits (`transformers` is imported only inside these functions). - `export_hf(model, out_dir, tokenizer=None, **hf_config) -> Path`: config.json + generation_config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads without custom code: dense -> `LlamaForCausalLM`; MoE -> `MixtralForCausalLM` (norm_topk_prob, no shared experts), `Qwen2MoeForCausalLM` (no renormalisation, no shared experts) or `GraniteMoeSharedForCausalLM` (shared experts, norm_topk_prob). Both configs carry eos = the end-of-turn `<|im_end|>` (2), pad 0, bos 1 (the tokenizer's ids; by default the shipped tokenizer's), so `transformers`' `generate` stops at the end of a turn; a given tokenizer is saved beside the weights (tokenizer.json + tokenizer_config.json, for `AutoTokenizer`); keyword arguments override config fields. - `import_hf(path_or_model, max_seq_len=None) -> LLM`: the inverse for those architectures; a setting it cannot compute exactly raises `ValueError` naming it. - Needs transformers >= 5 for MoE models (experts held fused in memory as `gate_up_proj`/`down_proj`); the folder itself is what `save_pretrained` writes.
- `zer02llm.tokenizer`: Byte-level BPE tokenizer with MiniMind's special tokens and a ChatML chat template. - `load_tokenizer(path=None) -> ChatTokenizer`: `None` loads the default shipped in `zer02llm/assets/tokenizer`; the seed's path `model/zer02llm_tokenizer` loads that folder when it exists, else the shipped default. - `ChatTokenizer`: `.encode(text) -> list[int]`, `.decode(ids) -> str` (exact inverse), `.vocab_size`, `.bos_id` (`<|im_start|>` = 1), `.eos_id` (`<|im_end|>` = 2), `.pad_id` (`<|endoftext|>` = 0), `.apply_chat_template(messages, add_generation_prompt=False) -> str`, `.encode_chat(messages) -> (ids, mask)` (mask True on assistant content and its `<|im_end|>`), `.stream_decoder(skip_special_tokens=False) -> StreamDecoder`, `.save(dir)`. - `StreamDecoder`: `push(ids) -> str` returns only whole characters, `flush()` the rest; joined, they equal `decode`. - Saved as `tokenizer.json` + `tokenizer_config.json` (with the Jinja chat template): `transformers.AutoTokenizer.from_pretrained(dir)` loads it too. - `python -m zer02llm.tokenizer --train [--vocab_size 6400] [--out zer02llm/assets/tokenizer] [--data file.jsonl]` retrains the shipped tokenizer from the built-in corpus (deterministic), or trains one on a JSONL file of `{"text"}`."""

from .utils import atomic_save, get_device, seed_everything  # 00
from .norm import RMSnorm  # 01
from .rope import apply_rope, precompute_rope  # 02
from .attention import Attention, KVCache, causal_mask  # 03
from .ffn import FFN, swiglu_hidden_dim  # 04
from .moe import MoEFFN, MoEgate  # 05
from .config import LLMconfig  # 06
from .checkpoint import read_checkpoint
from .model import LLM, Block, LLMOutput, lm_loss
from .generate import sample_next_token
from .hf import export_hf, import_hf
from .lora import LoRALinear, apply_lora, load_lora, merge_lora, save_lora  # 09
from .fast import compile_model  # 11

# 07, 08: imported on first use, so `python -m zer02llm.corpus` / `-m zer02llm.tokenizer` do not import themselves
# twice (the trainer reads its batches through zer02llm.data, which reads zer02llm.corpus)
_LAZY = {"write_builtin_dataset": "corpus", "load_tokenizer": "tokenizer", "ChatTokenizer": "tokenizer",
         "PretrainDataset": "data", "SFTDataset": "data", "make_loader": "data",
         **{name: "trainer" for name in ("TrainConfig", "Trainer", "checkpoint_path", "configure_optimizer", "get_lr")}}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
