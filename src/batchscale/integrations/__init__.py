"""Adapters that plug batchscale into other training libraries.

:mod:`batchscale.integrations.sentence_transformers`: every batchscale loss as a loss module for
``SentenceTransformerTrainer``. The maths stays in :mod:`batchscale.losses`; an adapter only
embeds the columns and hands the embeddings over. Nothing here is imported by the rest of the
package, so sentence-transformers stays an optional dependency.
"""
