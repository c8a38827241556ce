"""Evaluation stage: μ-Bench data, the task registry, zero-shot scoring, sweeps and the results store."""
