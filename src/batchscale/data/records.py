"""The typed records the loaders return."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pair:
    """Two texts, with an optional graded score.

    ``score`` is the value as the file has it (STS-B: 0-5); ``label`` is the score scaled to
    [0, 1] when the loader knows the range (STS-B, a generic file given ``score_range``), or
    the value of a label column. Losses that take labels want ``label``.

    ``group`` names the unit whose texts paraphrase each other (one image's captions, one
    paper's title and abstract), when the file has a group column; two pairs of one group
    are not negatives of each other.
    """

    text1: str
    text2: str
    score: float | None = None
    label: float | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Triplet:
    """An anchor, a text that paraphrases it and a hard negative; ``group`` as for
    :class:`Pair` (the anchor's and positive's unit)."""

    anchor: str
    positive: str
    negative: str
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A BEIR corpus entry."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """What is encoded: ``(title + " " + text).strip()``, as BEIR's and MTEB's dense
        retrieval do (MTEB's newer ``"\\n"`` separator tokenises the same for BERT models)."""
        return (self.title + " " + self.text).strip()
