"""Evaluation: lm-eval accuracy, the task table and its offline lm-eval task files (lm_eval_tasks/), perplexity, quality against the baseline, paired statistics."""
