"""The training config: errors name their file and key path; presets validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchscale.cli import main
from batchscale.training import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("optim:\n  lrr: 1e-5\n", "optim.lrr: unknown key"),
    ("loss:\n  name: bsc\n  temprature: 0.05\n", "loss.temprature: unknown key"),
    ("bogus: 1\n", "bogus: unknown key"),
    ("train:\n  batch_size: 1\n", "train.batch_size: Input should be greater than or equal to 2"),
    ("loss:\n  temperature: 0\n", "loss.temperature: Input should be greater than 0"),
    ("loss:\n  name: simclr\n", "loss.name: Input should be"),
    ("train:\n  gradient_cache: {chunk_size: 8, max_tokens: 512}\n",
     "train.gradient_cache: Value error, give chunk_size or max_tokens, not both"),
    ("optim:\n  lr_scaling: cubic\n", "optim.lr_scaling: Input should be"),
    ("loss:\n  name: triplet\n", "triplet needs data.kind: triplets"),
    ("eval:\n  dev: {task: scifact, split: holdout}\n", "holdout needs data.dev_holdout > 0"),
    ("loss:\n  plus: [{name: bsc, wieght: 2}]\n", "loss.plus.0.wieght: unknown key"),
    ("loss:\n  plus: [{name: bsc, weight: 0}]\n", "loss.plus.0.weight: Input should be greater"),
    ("loss:\n  plus: [{name: bsc, learnable_temperature: true}]\n",
     "loss.plus.0: Value error, only the main loss may learn its temperature"),
    ("data: {kind: triplets}\nloss:\n  name: triplet\n  plus: [{name: cosent}]\n",
     "loss.plus.0.name: cosent needs scored pairs, not triplets"),
])
def test_config_errors_name_the_file_and_the_key_path(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_bad_values_are_quoted(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.warmup: .*\(got 1\.5\)"):
        load_config(_write(tmp_path, "optim:\n  warmup: 1.5\n"))


def test_unreadable_or_non_mapping_configs(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_overrides_set_nested_values_and_are_validated(tmp_path):
    path = _write(tmp_path, "loss:\n  name: bsc\n")
    config = load_config(path, ["loss.temperature=0.1", "train.gradient_cache.chunk_size=16",
                                "eval.test=null", "optim.betas=[0.9, 0.98]"])
    assert config.loss.temperature == 0.1 and config.loss.name == "bsc"
    assert config.train.gradient_cache.chunk_size == 16 and config.eval.test is None
    assert config.optim.betas == (0.9, 0.98)
    with pytest.raises(ConfigError, match=r"\(with --set\): optim\.lrr: unknown key"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"loss\.name is not a section"):
        load_config(path, ["loss.name.x=1"])


def test_the_cli_reports_config_errors_and_exits_1(tmp_path, capsys):
    path = _write(tmp_path, "optim:\n  lrr: 1\n")
    assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "batchscale train: error:" in err and f"{path}: optim.lrr: unknown key" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", sorted(  # sweeps (a grid) are tested in test_study.py
    p.name for p in CONFIGS.glob("*.yaml")
    if "grid" not in yaml.safe_load(p.read_text(encoding="utf-8"))))
def test_presets_validate(preset):
    """Every value the preset writes is the value the validated config holds (nothing is
    dropped, renamed or coerced on the way)."""
    raw = yaml.safe_load((CONFIGS / preset).read_text(encoding="utf-8"))
    loaded = load_config(CONFIGS / preset).model_dump(mode="json")

    def leaves(d: dict, path: tuple = ()):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, (*path, k))
            else:
                yield (*path, k), v

    def at(d: object, path: tuple) -> object:
        for k in path:
            d = d[int(k)] if isinstance(d, list) else d[k]
        return d

    written = list(leaves(raw))
    assert written
    for path, value in written:
        got = at(loaded, path)
        if isinstance(value, list):
            got = list(got)
        assert got == value, f"{preset}: {'.'.join(map(str, path))}: {got!r} != {value!r}"


def test_presets_exist():
    assert (CONFIGS / "stsb-best.yaml").is_file()


def test_every_terms_softmax_block_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"loss\.plus\.0\.softmax_batch \(3\) must divide "
                                          r"train\.batch_size \(8\)"):
        config_from_dict({"train": {"batch_size": 8},
                          "loss": {"name": "infonce", "softmax_batch": 4,
                                   "plus": [{"name": "bsc", "softmax_batch": 3}]}})
