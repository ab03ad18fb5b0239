"""Contrastive losses as pure functions on embedding tensors (no model, no I/O, no state).

Entry points: :func:`bsc_loss`, :func:`infonce_loss`, :func:`weince_loss`, :func:`nt_xent`,
:func:`bsc_mse_loss`, :func:`vrns_penalty`, :func:`cosine_mse_loss`, :func:`cosent_loss`,
:func:`triplet_loss`, and :class:`LearnableTemperature`.
"""

from .bsc import bsc_loss, infonce_loss
from .nt_xent import nt_xent
from .weince import weince_loss
from .weince_tail import WeinceConfig, WeinceLambda, WeinceStats, weince_lambda, weince_logits

__all__ = [
    "WeinceConfig",
    "WeinceLambda",
    "WeinceStats",
    "bsc_loss",
    "infonce_loss",
    "nt_xent",
    "weince_lambda",
    "weince_logits",
    "weince_loss",
]
