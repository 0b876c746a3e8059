"""qjax.eval: perplexity, zero-shot scoring, embedding fidelity."""
