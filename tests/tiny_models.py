"""The small seeded model and token ids that the model, generation and checkpoint tests share."""
import torch

from zer02llm.config import LLMconfig
from zer02llm.model import LLM


def tiny(seed=0, **kw) -> LLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    cfg.update(kw)
    return LLM(LLMconfig(**cfg)).eval()


def ids(b, t, vocab=97, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
