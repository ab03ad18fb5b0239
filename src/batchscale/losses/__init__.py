"""Contrastive losses as pure functions on embedding tensors (no model, no I/O, no state).

Batch-softmax family: :func:`bsc_loss` (BSC, L0 + L1), :func:`infonce_loss` (L0),
:func:`weince_loss` (WEINCE on pairs), :func:`nt_xent` (SimCLR 2N layout, plain or WEINCE),
:func:`bsc_mse_loss` (BSC + MSE), :func:`sogclr_loss` (SogCLR's global contrastive loss:
a moving-average partition per example, kept by the caller). Regulariser: :func:`vrns_penalty`.
Baselines: :func:`cosine_mse_loss`, :func:`cosent_loss`, :func:`triplet_loss`.
Trainable temperature: :class:`LearnableTemperature`.
"""

from .batch_softmax import DIRECTIONS, Directions
from .bsc import bsc_loss, infonce_loss
from .combined import bsc_mse_loss
from .logits import weince_logits
from .nt_xent import nt_xent
from .pointwise import cosent_loss, cosine_mse_loss
from .similarity import NORMALIZATIONS, Normalization
from .sogclr import SOGCLR_GAMMA, sogclr_directions, sogclr_loss
from .temperature import LearnableTemperature
from .triplet import triplet_loss
from .vrns import vrns_penalty
from .weince import weince_loss
from .weince_tail import WeinceConfig, WeinceLambda, WeinceStats, weince_lambda

__all__ = [
    "DIRECTIONS",
    "NORMALIZATIONS",
    "SOGCLR_GAMMA",
    "Directions",
    "LearnableTemperature",
    "Normalization",
    "WeinceConfig",
    "WeinceLambda",
    "WeinceStats",
    "bsc_loss",
    "bsc_mse_loss",
    "cosent_loss",
    "cosine_mse_loss",
    "infonce_loss",
    "nt_xent",
    "sogclr_directions",
    "sogclr_loss",
    "triplet_loss",
    "vrns_penalty",
    "weince_lambda",
    "weince_logits",
    "weince_loss",
]
