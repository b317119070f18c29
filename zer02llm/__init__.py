"""Zer02LLM: the package exported from the course's notebooks. Public names, chapter by chapter."""
from .utils import atomic_save, get_device, seed_everything
