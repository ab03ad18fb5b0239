"""What goes into a batch and how it crosses memory and machines.

Batch composition: :class:`RandomBatchSampler`, :class:`NoDuplicatesBatchSampler`,
:class:`BSCShuffleSampler` (BSC's kNN / k-means hard-batch shuffling),
:class:`ShingleShuffleSampler` (its model-free random-word-shingle variant),
:class:`TeacherHardBatchSampler`, and the per-epoch statistics (:func:`mean_hardest_negative`,
:func:`duplicate_rate`). Batch size free of activation memory: :func:`cached_backward`
(gradient cache). Negatives across ``torch.distributed`` ranks: :func:`local_pair_loss`
(OpenCLIP's local loss), :func:`gathered_pair_loss` and :func:`gather_batch` (the global loss),
:func:`gather_with_grad`, :func:`init_distributed`. The memory-linear loss itself lives in
:mod:`batchscale.losses` (``tile_size``).
"""

from .batch_stats import (
    DuplicateStats,
    duplicate_rate,
    duplicate_stats,
    epoch_hardest_negative,
    hardest_negatives,
    mean_hardest_negative,
)
from .distributed import (
    CollectiveError,
    DistributedInfo,
    average_gradients,
    end_rank_process,
    gather_rows,
    gather_with_grad,
    init_distributed,
    shutdown_distributed,
)
from .distributed_loss import gather_batch, gathered_pair_loss, local_pair_loss
from .embedding_cache import EmbeddingCache
from .gradient_cache import cached_backward
from .hard_batches import BSCShuffleSampler, ShingleShuffleSampler, TeacherHardBatchSampler
from .no_duplicates import no_duplicate_batches
from .samplers import EpochBatchSampler, NoDuplicatesBatchSampler, RandomBatchSampler
from .text_keys import text_keys

__all__ = [
    "BSCShuffleSampler",
    "CollectiveError",
    "DistributedInfo",
    "DuplicateStats",
    "EmbeddingCache",
    "EpochBatchSampler",
    "NoDuplicatesBatchSampler",
    "RandomBatchSampler",
    "ShingleShuffleSampler",
    "TeacherHardBatchSampler",
    "average_gradients",
    "cached_backward",
    "duplicate_rate",
    "duplicate_stats",
    "end_rank_process",
    "epoch_hardest_negative",
    "gather_batch",
    "gather_rows",
    "gather_with_grad",
    "gathered_pair_loss",
    "hardest_negatives",
    "init_distributed",
    "local_pair_loss",
    "mean_hardest_negative",
    "no_duplicate_batches",
    "shutdown_distributed",
    "text_keys",
]
