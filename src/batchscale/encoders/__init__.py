"""Sentence encoders: :class:`SentenceEncoder` (transformer + pooling, or static token
embeddings), loaded offline from ``"default"`` (the packaged all-MiniLM-L6-v2) or a local
sentence-transformers / Hugging Face model directory."""

from .encoder import (
    DEFAULT_MODEL,
    EncoderLoadError,
    SentenceEncoder,
    check_model_dir,
    default_model_path,
    load_encoder,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "EncoderLoadError",
    "SentenceEncoder",
    "check_model_dir",
    "default_model_path",
    "load_encoder",
    "resolve_model_path",
]
