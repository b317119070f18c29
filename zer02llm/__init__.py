"""Zero to LLM: a notebook-first course that builds a modern small language model in PyTorch, and its package.

Map: chapter notebook -> module (one concern each; `help(zer02llm.<module>)` for the details).
- 00 setup -> `utils`: device, seeding, atomic writes
- 01 RMSNorm -> `norm`; 02 RoPE -> `rope`; 03 attention and the KV cache -> `attention`
- 04 SwiGLU -> `ffn`; 05 mixture of experts -> `moe`
- 06a -> `config` (`LLMconfig`); 06 -> `model` (`LLM`: the model and its loss, nothing else)
- 06b -> `generate` (the generation loop and sampling); 06c -> `hf` (transformers round trip); 06d -> `checkpoint`
- 07a -> `corpus` (the tiny world, JSONL); 07b -> `tokenizer` (BPE, chat template, stream decoder); 07c -> `data`
- 07d -> `evaluate` (fact probe, strict answers and baselines, story checker)
- 08 pretraining -> `trainer`; 09 SFT and LoRA -> `lora`; 10 DDP and chat -> `train`, `chat` (the command lines)
- 11 speed -> `fast` (the opt-in lean CPU decoding step, `compile_model`); 12 preference tuning -> `dpo`
- 13 RL from verifiable rewards -> `grpo`
- 14 serving -> `serve` (OpenAI-compatible HTTP server and chat page); 15 -> `gguf_export` (llama.cpp, Ollama)"""

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

# 07, 08, 12, 13: imported on first use, so `python -m zer02llm.corpus` / `-m zer02llm.tokenizer` do not import
# themselves twice (the trainer reads its batches through zer02llm.data, which reads zer02llm.corpus)
_LAZY = {"write_builtin_dataset": "corpus", "load_tokenizer": "tokenizer", "ChatTokenizer": "tokenizer",
         "PretrainDataset": "data", "SFTDataset": "data", "make_loader": "data",
         **{name: "trainer" for name in ("TrainConfig", "Trainer", "checkpoint_path", "configure_optimizer", "get_lr")},
         **{name: "dpo" for name in ("DPODataset", "DPOObjective", "dpo_loss", "sequence_logprobs")},
         **{name: "grpo" for name in ("GRPODataset", "GRPOObjective", "group_advantages", "grpo_token_loss")}}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
