"""Contrastive fine-tuning measured by examples seen.

* :class:`RunConfig` / :func:`load_config`: the validated configuration (YAML + overrides)
* :class:`Objective`: the configured loss as ``objective(embeddings, labels)``
* :class:`Trainer`: the loop, evaluation points, best-model selection, atomic checkpoints,
  exact resume, NaN guard (:class:`TrainingDiverged`)
* :func:`measure_noise_scale`: the gradient noise scale B_simple at an evaluation point
  (:class:`NoiseScale`)
"""

from .config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from .examples import TrainingSet
from .noise_scale import NoiseScale, measure_noise_scale, two_batch_estimate
from .objective import Objective
from .trainer import FitResult, RunDirectoryError, Trainer, TrainingDiverged

__all__ = [
    "ConfigError",
    "FitResult",
    "NoiseScale",
    "Objective",
    "RunConfig",
    "RunDirectoryError",
    "Trainer",
    "TrainingDiverged",
    "TrainingSet",
    "config_from_dict",
    "dump_config",
    "load_config",
    "measure_noise_scale",
    "two_batch_estimate",
]
