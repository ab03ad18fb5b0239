"""Loaders that validate as they read.

A bad row raises :class:`DataError` whose message is ``path:line: reason``; with
``skip_bad_rows=True`` the row is skipped and counted by reason in the result's ``report``
(a :class:`LoadReport`; a warning is logged). Nothing is dropped silently.

* :func:`load_stsb`: STS Benchmark (official CSV) -> :class:`Pair` (score 0-5, label 0-1)
* :func:`load_pairs` / :func:`load_triplets`: generic JSONL / CSV / TSV / Parquet files and
  ``datasets`` directories (default columns: sentence-transformers' ``anchor`` / ``positive``
  / ``negative``, else ``sentence1`` / ``sentence2``; an optional ``group`` column);
  :func:`load_training_file` loads pairs or triplets as the file's columns say
  (:func:`detect_kind`)
* :func:`load_snli_pairs` / :func:`load_snli_triplets`: SNLI in SentEval layout
* :class:`BeirDataset` / :func:`load_beir`: BEIR folders (streamed corpus, checked qrels,
  training pairs from train qrels)
"""

from ._reader import DataError, LoadReport, Records
from .beir import BeirDataset, BeirSplit, Qrels, load_beir
from .pairs import detect_kind, load_pairs, load_training_file, load_triplets
from .records import Document, Pair, Triplet
from .snli import SNLI_LABELS, load_snli_pairs, load_snli_triplets
from .stsb import STSB_MAX_SCORE, STSB_SPLITS, load_stsb

__all__ = [
    "SNLI_LABELS",
    "STSB_MAX_SCORE",
    "STSB_SPLITS",
    "BeirDataset",
    "BeirSplit",
    "DataError",
    "Document",
    "LoadReport",
    "Pair",
    "Qrels",
    "Records",
    "Triplet",
    "detect_kind",
    "load_beir",
    "load_pairs",
    "load_snli_pairs",
    "load_snli_triplets",
    "load_stsb",
    "load_training_file",
    "load_triplets",
]
