"""Named training sources in the shared data folder, and the ``mix`` of all of them.

``pairs:NAME`` is ``DATA/pairs/NAME.jsonl`` (sentence-transformers' columns ``anchor``,
``positive``, with a ``group``); :data:`MIX` is every pair set with STS-B train and the SNLI
entailment pairs: about 99,000 pairs in five genres (captions, scientific sentences,
title -> abstract, news paraphrases, NLI). See ``DATA/README.md`` for each set's origin.
"""

from __future__ import annotations

from pathlib import Path

#: The pair sets of ``DATA/pairs/``, in the order ``mix`` takes them.
PAIR_SETS: tuple[str, ...] = ("flickr8k-captions", "parasci", "acl-title-abstract",
                              "mrpc-paraphrases")
PAIRS_PREFIX = "pairs:"
#: ``data.train: mix``: STS-B train, SNLI's entailment pairs, then every pair set.
MIX: tuple[str, ...] = ("stsb", "snli", *(PAIRS_PREFIX + name for name in PAIR_SETS))


def is_pair_set(source: str) -> bool:
    return source.startswith(PAIRS_PREFIX)


def pair_set_path(source: str, data_dir: Path) -> Path:
    """The file of ``pairs:NAME``; a name the folder does not have is an error that lists
    the names it has."""
    name = source[len(PAIRS_PREFIX):]
    path = data_dir / "pairs" / f"{name}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in (data_dir / "pairs").glob("*.jsonl"))
        raise FileNotFoundError(f"{source}: no {path} (pair sets in {data_dir / 'pairs'}: "
                                f"{', '.join(have) or 'none'})")
    return path


def expand(sources: list[str]) -> list[str]:
    """``mix`` replaced by its sources, in place in the list."""
    out: list[str] = []
    for s in sources:
        out += list(MIX) if s == "mix" else [s]
    return out
