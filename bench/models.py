"""The configurations under test, and pairs of models with identical weights (ours and transformers')."""
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zer02llm.config import LLMconfig
from zer02llm.hf import export_hf, import_hf
from zer02llm.model import LLM

# Config D of the issue; the MoE variant routes each token to 2 of 4 experts (no shared expert, so that it exports
# to a stock transformers architecture: Mixtral).
DENSE = dict(vocab_size=6400, dim=512, n_layers=8, n_heads=8, n_kv_heads=2)
MOE = dict(DENSE, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0)
TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)  # --quick: keeps the harness from rotting
TINY_MOE = dict(TINY, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0)
GPU = dict(vocab_size=32000, dim=1024, n_layers=16, n_heads=16, n_kv_heads=4)  # the GPU variant (bf16)


@dataclass
class Pair:
    """Our model and the transformers model it exports to, same weights; `hf_dir`/`ckpt` hold them on disk."""

    ours: LLM
    hf: torch.nn.Module
    hf_dir: Path
    ckpt: Path
    max_abs_logit_diff: float


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def make_pair(kwargs: dict, max_seq_len: int, workdir: Path, seed: int = 0) -> Pair:
    """Seeded random init of our model -> export_hf -> transformers loads it, and import_hf brings it back to us.

    Both sides compute with weights that went through the HF round trip; their logits are compared here."""
    transformers = quiet_transformers()
    torch.manual_seed(seed)
    name = "moe" if kwargs.get("use_moe") else "dense"
    hf_dir = Path(workdir) / f"{name}-hf"
    # eos_token_id=None: greedy decoding of a random model must run the full length on both sides, whatever it emits
    export_hf(LLM(LLMconfig(**kwargs, max_seq_len=max_seq_len)), hf_dir, eos_token_id=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = import_hf(hf_dir, max_seq_len=max_seq_len).eval()
    ckpt = ours.save_checkpoint(Path(workdir) / f"{name}.pt")
    ids = torch.randint(0, kwargs["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"{name}: our logits differ from transformers' by {diff:.2e}: the comparison would be unfair")
    return Pair(ours, hf, hf_dir, ckpt, diff)


def clone(model: LLM) -> LLM:
    return copy.deepcopy(model)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="zer02llm-bench-"))


def flops_per_token(config: LLMconfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (active matmul parameters, LM head included) + attention, 12·L·dim·T
    (PaLM's estimate; causal masking's halving not counted). The embedding lookup is free."""
    c = config
    hd, kv = c.head_dim, c.n_kv_heads * c.head_dim
    hidden = c.hidden_dim or _swiglu(c.dim, c.multiple_of)
    ffn = 3 * c.dim * hidden * ((c.num_experts_per_tok + c.n_shared_experts) if c.use_moe else 1)
    attn = c.dim * (c.n_heads * hd) * 2 + c.dim * kv * 2
    router = c.dim * c.n_routed_experts if c.use_moe else 0
    per_layer = attn + ffn + router
    params = c.n_layers * per_layer + c.dim * c.vocab_size
    return 6 * params + 12 * c.n_layers * c.dim * seq_len


def _swiglu(dim: int, multiple_of: int) -> int:
    from zer02llm.ffn import swiglu_hidden_dim

    return swiglu_hidden_dim(dim, multiple_of)
