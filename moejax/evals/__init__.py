"""Evaluations beyond the validation loss (see ``long_context.py``)."""

from moejax.evals.long_context import EVAL_TASKS, perplexity_by_position, retrieval_grid, run, write_report

__all__ = ["EVAL_TASKS", "perplexity_by_position", "retrieval_grid", "run", "write_report"]
