"""Evaluation: lm-eval accuracy, the task table, perplexity, quality against the baseline, paired statistics."""
