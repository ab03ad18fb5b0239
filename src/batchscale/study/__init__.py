"""Runs and studies: one training run from a config (:func:`train_run`); sweeps, the results
store and the report build on it."""

from .run import RunResult, summary_table, train_run

__all__ = ["RunResult", "summary_table", "train_run"]
