"""Zero to LLM: a notebook-first course that builds a modern small language model in PyTorch, and the package it exports.

Modules:

- `zer02llm.corpus`: The course's data files: a seeded "tiny world" generator, the JSONL formats, and a reader with clear errors. - `python -m zer02llm.corpus [--out dataset] [--seed 0] [--size_mb 4]` writes `dataset/pretrain_hq.jsonl` (`{"text": ...}` per line), `dataset/sft_data.jsonl` (MiniMind's `{"conversations": [{"role", "content"}, ...]}`) and `dataset/eval_facts.jsonl` (`{"question", "answer"}`: facts stated in the pretraining text but in no SFT example; `answer_matches(reply, answer)` is the metric). - `write_builtin_dataset(out_dir="dataset", seed=0, size_mb=4.0) -> {"pretrain", "sft", "eval"}` (paths) does the same from Python. The same seed gives byte-identical files; every file is written to a temporary name and renamed. - Real data: `python -m zer02llm.corpus download --source tinystories|minimind --out dataset [--size_mb N]` downloads from the Hugging Face Hub (needs `huggingface_hub`) and converts to the same formats. - `iter_jsonl(path, check, skip_bad_lines)` reads a JSONL file line by line (never whole); a bad line raises `JsonlError` naming the file and line, or is skipped and counted with `skip_bad_lines=True`.
- `zer02llm.data`: Training examples from the JSONL files: `(input_ids, labels)` LongTensors of length `max_seq_len`. - Labels follow Hugging Face: the same positions as `input_ids` (the model shifts them inside), `-100` where no loss is taken. - `PretrainDataset(path, tokenizer, max_seq_len, cache_dir=None, skip_bad_lines=False)`: documents wrapped in `bos`/`eos`, packed into fixed blocks without padding, `labels == input_ids`. The JSONL file is tokenized once into a uint16 memmap cached next to it (or in `cache_dir`) and rebuilt when the file or the tokenizer changes. - `SFTDataset(path, tokenizer, max_seq_len, cache_dir=None, skip_bad_lines=False)`: a conversation in the chat template, padded with `pad_id`; labels only on assistant tokens (from the first content token through `<|im_end|>`); lines are read through a cached byte-offset index. `encode_sft(tokenizer, messages, max_seq_len)` makes one example. - `make_loader(dataset, batch_size, shuffle=True, num_workers=0, distributed=False, seed=0, drop_last=True) -> (DataLoader, sampler_or_None)`: with `distributed=True` a `DistributedSampler` (call `sampler.set_epoch(epoch)` every epoch).
- `zer02llm.tokenizer`: Byte-level BPE tokenizer with MiniMind's special tokens and a ChatML chat template. - `load_tokenizer(path=None) -> ChatTokenizer`: `None` loads the default shipped in `zer02llm/assets/tokenizer`; the seed's path `model/zer02llm_tokenizer` loads that folder when it exists, else the shipped default. - `ChatTokenizer`: `.encode(text) -> list[int]`, `.decode(ids) -> str` (exact inverse), `.vocab_size`, `.bos_id` (`<|im_start|>` = 1), `.eos_id` (`<|im_end|>` = 2), `.pad_id` (`<|endoftext|>` = 0), `.apply_chat_template(messages, add_generation_prompt=False) -> str`, `.encode_chat(messages) -> (ids, mask)` (mask True on assistant content and its `<|im_end|>`), `.stream_decoder()` (`push(id) -> str` emits only whole UTF-8 characters, `flush()`), `.save(dir)`. - Saved as `tokenizer.json` + `tokenizer_config.json` (with the Jinja chat template): `transformers.AutoTokenizer.from_pretrained(dir)` loads it too. - `python -m zer02llm.tokenizer --train [--vocab_size 6400] [--out zer02llm/assets/tokenizer] [--data file.jsonl]` retrains the shipped tokenizer from the built-in corpus (deterministic), or trains one on a JSONL file of `{"text"}`."""

from .utils import atomic_save, get_device, seed_everything  # 00
from .norm import RMSnorm  # 01
from .rope import apply_rope, precompute_rope  # 02
from .attention import Attention, KVCache, causal_mask  # 03
from .ffn import FFN, swiglu_hidden_dim  # 04
from .moe import MoEFFN, MoEgate  # 05

# 07: imported on first use, so `python -m zer02llm.corpus` / `-m zer02llm.tokenizer` do not import themselves twice
_LAZY = {"write_builtin_dataset": "corpus", "load_tokenizer": "tokenizer", "ChatTokenizer": "tokenizer",
         "PretrainDataset": "data", "SFTDataset": "data", "make_loader": "data"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
