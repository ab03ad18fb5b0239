"""STS Benchmark, official CSV distribution (``sts-{train,dev,test}.csv``).

Tab-separated, no quoting (quotes are part of the text), columns genre, file, year, id,
score (0-5), sentence1, sentence2; some rows carry extra trailing columns (source notes),
which are ignored.
"""

from __future__ import annotations

from pathlib import Path

from . import _reader
from .records import Pair

STSB_MAX_SCORE = 5.0
STSB_SPLITS = ("train", "dev", "test")
_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")


def stsb_path(path: str | Path, split: str = "test") -> Path:
    """The CSV of ``split`` when ``path`` is the folder, else ``path`` itself."""
    p = Path(path)
    if p.is_dir():
        if split not in STSB_SPLITS:
            raise ValueError(f"STS-B split must be one of {STSB_SPLITS}, got {split!r}")
        p = p / f"sts-{split}.csv"
    return _reader.open_checked(p, "STS-B file")


def parse_stsb_row(line: str) -> Pair:
    cols = line.split("\t")
    if len(cols) < len(_COLUMNS):
        raise _reader.RowError("missing column",
                       f"{len(cols)} tab-separated fields, expected at least {len(_COLUMNS)} "
                       f"({', '.join(_COLUMNS)}); missing {', '.join(_COLUMNS[len(cols):])}")
    score = _reader.check_number(cols[4], "score", lo=0.0, hi=STSB_MAX_SCORE)
    s1 = _reader.check_text(cols[5], "sentence1")
    s2 = _reader.check_text(cols[6], "sentence2")
    return Pair(s1, s2, score=score, label=score / STSB_MAX_SCORE)


def load_stsb(path: str | Path, split: str = "test", *,
              skip_bad_rows: bool = False) -> _reader.Records[Pair]:
    """STS-B pairs of ``split`` (``path``: the ``stsbenchmark`` folder or one CSV).

    ``Pair.score`` is the raw 0-5 score, ``Pair.label`` the score / 5. Texts are kept
    exactly as in the file, as MTEB feeds them to the model.
    """
    file = stsb_path(path, split)
    v = _reader.Validator(file, skip_bad_rows)
    pairs: list[Pair] = []
    for lineno, line in _reader.decoded_lines(file, v):
        v.report.rows_read += 1
        try:
            pairs.append(parse_stsb_row(line))
        except _reader.RowError as e:
            v.bad(lineno, e)
    v.report.rows_kept = len(pairs)
    return _reader.Records(pairs, v.finish())
