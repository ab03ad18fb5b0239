"""Contrastive fine-tuning measured by examples seen.

* :class:`RunConfig` / :func:`load_config`: the validated configuration (YAML + overrides)
* :class:`Objective`: the configured loss as ``objective(embeddings, labels)``
* :class:`Trainer`: the loop, evaluation points, best-model selection, atomic checkpoints,
  exact resume, NaN guard (:class:`TrainingDiverged`)
"""

from .config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from .examples import TrainingSet
from .objective import Objective
from .trainer import FitResult, RunDirectoryError, Trainer, TrainingDiverged

__all__ = [
    "ConfigError",
    "FitResult",
    "Objective",
    "RunConfig",
    "RunDirectoryError",
    "Trainer",
    "TrainingDiverged",
    "TrainingSet",
    "config_from_dict",
    "dump_config",
    "load_config",
]
