"""Reports reproduce byte for byte: the same store gives the same files (twice in a row, under
another matplotlib style, and against every report shipped in the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from batchscale.study.report import REPORT_FILES, write_report
from study_stores import make_store
from test_study_reach import scores

ROOT = Path(__file__).resolve().parents[1]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png_text_chunks(png: bytes) -> list[bytes]:
    """The keywords of a PNG's tEXt / iTXt / zTXt chunks."""
    out, i = [], 8
    while i < len(png):
        n = int.from_bytes(png[i:i + 4], "big")
        kind = png[i + 4:i + 8]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            out.append(png[i + 8:i + 8 + n].split(b"\0")[0])
        i += 12 + n
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("repro") / "repro.sqlite", scores())


def test_a_report_written_twice_is_identical_byte_for_byte(store, tmp_path):
    write_report(store, tmp_path / "one")
    with matplotlib.rc_context({"lines.linewidth": 4.0, "font.size": 17.0,
                                "figure.facecolor": "black"}):
        write_report(store, tmp_path / "two")  # a user's style must not leak in
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert set(one) == set(two)
    assert {*REPORT_FILES, "plots/quality.png", "plots/curves_examples.png"} <= set(one)
    different = [name for name in one if one[name] != two[name]]
    assert different == []
    for name, content in one.items():
        assert str(tmp_path).encode() not in content, name  # no absolute path of this call
        assert str(store.parent).encode() not in content, name
        if name.endswith(".png"):
            assert png_text_chunks(content) == [], name  # no "Software: matplotlib x.y"


def test_rewriting_a_report_folder_drops_plots_it_no_longer_draws(store, tmp_path):
    out = tmp_path / "rep"
    write_report(store, out)
    (out / "plots" / "blocks.png").write_bytes(b"an earlier report's plot")
    (out / "plots" / "mine.png").write_bytes(b"not the report's")
    write_report(store, out)
    assert not (out / "plots" / "blocks.png").exists()
    assert (out / "plots" / "mine.png").exists()
    assert not [p for p in out.rglob(".tmp-*")]


# -- shipped reports --------------------------------------------------------------------------
def shipped() -> list[tuple[Path, Path]]:
    """(store, report folder) of every shipped report: results/<study>/ (the store beside
    the report) and the SogCLR benchmark's."""
    out = [(s, s.parent) for s in sorted((ROOT / "results").glob("*/study.sqlite"))]
    bench = ROOT / "benchmarks" / "results"
    out.append((bench / "sogclr_small_batch.sqlite", bench / "sogclr_small_batch_report"))
    return out


def _id(pair: tuple[Path, Path]) -> str:
    return pair[1].relative_to(ROOT).as_posix()


def _matplotlib_of(folder: Path) -> str | None:
    """The matplotlib version that drew a shipped report (its provenance.json)."""
    path = folder / "provenance.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["machine"]["packages"]["matplotlib"]


@pytest.mark.parametrize("pair", shipped(), ids=_id)
def test_a_shipped_report_reproduces_from_its_store(pair, tmp_path):
    store, folder = pair
    assert store.is_file() and (folder / "report.md").is_file(), folder
    write_report(store, tmp_path)
    new, old = files(tmp_path), files(folder)
    for name in ("report.json", "report.md"):
        assert new[name] == old[name], f"{folder / name} differs from its store's report"
    images = sorted(n for n in new if n.startswith("plots/"))
    assert images == sorted(n for n in old if n.startswith("plots/"))
    if _matplotlib_of(folder) != matplotlib.__version__:
        pytest.skip(f"the plots were drawn by matplotlib {_matplotlib_of(folder)}, this is "
                    f"{matplotlib.__version__}: text files compared, images not")
    for name in [*images, "report.html"]:
        assert new[name] == old[name], f"{folder / name} differs from its store's report"
