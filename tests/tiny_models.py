"""The small seeded models and token ids that the model, generation, checkpoint, DPO and GRPO tests share."""
import torch

from zer02llm.config import LLMconfig
from zer02llm.model import LLM
from zer02llm.utils import seed_everything


def tiny(seed=0, **kw) -> LLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    cfg.update(kw)
    return LLM(LLMconfig(**cfg)).eval()


def ids(b, t, vocab=97, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def tiny_llm(vocab, seed=0, **kw) -> LLM:
    """A 2-layer dim-32 model over a real tokenizer's vocabulary, in train mode (the DPO and GRPO tests)."""
    seed_everything(seed)
    cfg = dict(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return LLM(LLMconfig(**{**cfg, **kw}))
