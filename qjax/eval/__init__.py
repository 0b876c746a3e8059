"""qjax.eval: perplexity, zero-shot multiple choice, embedding fidelity."""

from qjax.eval.metrics import embedding_fidelity, multiple_choice_accuracy, perplexity

__all__ = ["embedding_fidelity", "multiple_choice_accuracy", "perplexity"]
