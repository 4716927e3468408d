"""Benchmark evaluation through lm-eval-harness (evaluate.py): the model adapter, batched
scoring, task lookup, and the shipped offline tasks in evals/tasks/."""
