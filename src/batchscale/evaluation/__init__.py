"""Evaluation: STS correlations, BEIR retrieval metrics (pytrec_eval), pair geometry.

* :func:`evaluate_sts` / :func:`sts_correlations`: Spearman and Pearson of cosine (x100)
* :func:`evaluate_retrieval` / :func:`search` / :func:`retrieval_metrics`: exact chunked
  top-k; nDCG@10, MAP@100, Recall@10/@100, MRR@10 (x100)
* :func:`pair_geometry`: alignment, uniformity, positive / negative cosine statistics,
  WEINCE tail diagnostics
* :func:`run_task`: the named tasks of ``batchscale eval``
"""

from .geometry import pair_geometry, uniformity
from .retrieval import METRICS, TopK, evaluate_retrieval, retrieval_metrics, search, to_run
from .sts import cosine_pairs, evaluate_sts, sts_correlations
from .tasks import default_data_dir, run_task, task_path

__all__ = [
    "METRICS",
    "TopK",
    "cosine_pairs",
    "default_data_dir",
    "evaluate_retrieval",
    "evaluate_sts",
    "pair_geometry",
    "retrieval_metrics",
    "run_task",
    "search",
    "sts_correlations",
    "task_path",
    "to_run",
    "uniformity",
]
