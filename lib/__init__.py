"""The model-agnostic experiment harness (README.md for its use, docs/algorithms.md for its rules)."""
