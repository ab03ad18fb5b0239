"""Every batchscale loss as a drop-in loss for sentence-transformers' Trainer.

::

    from batchscale.integrations.sentence_transformers import BSCLoss
    loss = BSCLoss(model, temperature=0.05, mini_batch_size=64)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss)

Modules: :class:`BSCLoss` (BSC, label masking, BSC + MSE with ``mu``), :class:`InfoNCELoss`,
:class:`WEINCELoss`, and :class:`VRNSLoss` (adds the VRNS penalty to any of them). Each takes
``mini_batch_size`` (gradient cache), ``tile_size`` (memory-linear loss) and
``gather_across_ranks`` (negatives from every torch.distributed rank, on by default when a
process group is up). sentence-transformers' ``scale`` is ``1 / temperature``.
"""

from .base import BatchscaleLoss, BatchSoftmaxLoss
from .embedding import cached_embeddings, embed_columns
from .losses import BSCLoss, InfoNCELoss, WEINCELoss
from .vrns import VRNSLoss

__all__ = [
    "BSCLoss",
    "BatchSoftmaxLoss",
    "BatchscaleLoss",
    "InfoNCELoss",
    "VRNSLoss",
    "WEINCELoss",
    "cached_embeddings",
    "embed_columns",
]
