"""Benchmarks of zer02llm against Hugging Face transformers (identical configs and weights): `python -m bench`.

A runnable suite, not tests: see bench/README.md. Speed is measured here and never asserted in a test."""
