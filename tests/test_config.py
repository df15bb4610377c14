"""params.yaml validation and --set overrides: bad params stop before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mnist_mlops.config import load_params, parse_overrides, write_params
from mnist_mlops.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_repo_params_are_valid_and_complete(root: Path) -> None:
    params = load_params(root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert {"data", "prepare", "model", "train", "evaluate"} <= set(raw)
    assert params.data.source == "sample"
    assert params.train.epochs >= 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", "invalid parameter 'train.epochs'"),
        ("train.epochs=three", "invalid parameter 'train.epochs'"),
        ("prepare.test_fraction=1.0", "invalid parameter 'prepare.test_fraction'"),
        ("model.filters=[0, 32]", "invalid parameter 'model.filters'"),
        ("train.lr_schedule=wild", "invalid parameter 'train.lr_schedule'"),
        ("train.epochz=3", "unknown parameter 'train.epochz'"),
        ("nosuch.key=1", "unknown parameter 'nosuch'"),
        ("epochs=3", "bad override 'epochs=3'"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(root: Path, override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_params(root, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_value_in_file_is_reported(root: Path) -> None:
    text = re.sub(r"epochs: \d+", "epochs: 0", (root / "params.yaml").read_text())
    (root / "params.yaml").write_text(text)
    with pytest.raises(UserError, match="train.epochs"):
        load_params(root)


def test_overrides_are_parsed_as_yaml() -> None:
    assert parse_overrides(["train.epochs=3", "model.filters=[8, 16]", "data.source=mnist"]) == {
        "train": {"epochs": 3}, "model": {"filters": [8, 16]}, "data": {"source": "mnist"}}


def test_write_params_keeps_comments_and_validates(root: Path) -> None:
    before = (root / "params.yaml").read_text()
    assert write_params(root, ["train.epochs=3"]) == ["train.epochs=3"]
    after = (root / "params.yaml").read_text()
    assert "# Every tunable" in after and "epochs: 3" in after
    assert load_params(root).train.epochs == 3
    assert write_params(root, ["train.epochs=3"]) == []  # no change, no write
    with pytest.raises(UserError):
        write_params(root, ["train.epochs=-5"])
    assert (root / "params.yaml").read_text() == after != before


def test_cli_bad_param_stops_before_any_work(project) -> None:
    proc = project.cli("run", "--set", "train.epochs=-1", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: invalid parameter 'train.epochs': input should be greater than or equal "
                     "to 1 (got -1)"]
    assert not (project.root / "data").exists()
    assert not (project.root / "mlflow.db").exists()


def test_params_yaml_and_the_code_defaults_agree() -> None:
    """Two places hold the defaults (the file users edit, the typed model): they must not drift."""
    import yaml

    from mnist_mlops.config import Params, validate

    assert validate(yaml.safe_load((REPO / "params.yaml").read_text())) == Params()
