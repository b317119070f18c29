"""Zer02LLM: the package exported from the course's notebooks. Public names, chapter by chapter."""
from .utils import atomic_save, get_device, seed_everything  # 00
from .norm import RMSnorm  # 01
from .rope import apply_rope, precompute_rope  # 02
from .attention import Attention, KVCache, causal_mask  # 03
