"""compress-eval: compress a Hugging Face causal LM and evaluate it with lm-evaluation-harness."""

__version__ = "0.1.0"
