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


NEEDS_PROJECT = [["run"], ["monitor"], ["fetch"], ["verify"], ["promote", "1"], ["rollback"], ["ui"], ["package"],
                 ["serve"], ["feedback"], ["feedback", "import", "digits"], ["feedback", "export", "x.npz"],
                 ["schedule", "--interval", "60"], ["sweep", "--grid", "train.epochs=1,2"]]


def outside_message(where: Path) -> str:
    return (f"no params.yaml in {where} or any folder above it: run from the project directory "
            "(or set MNIST_MLOPS_ROOT to it)")


@pytest.mark.parametrize("args", NEEDS_PROJECT, ids=" ".join)
def test_every_command_that_needs_the_project_says_so_the_same_way(args: list[str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the project, a command must not read or write the current folder's stores as if it
    were one (`feedback` printed zero labels and exited 0): each says so in the same line."""
    from typer.testing import CliRunner

    from mnist_mlops.cli import app

    (tmp_path / "digits").mkdir()
    monkeypatch.delenv("MNIST_MLOPS_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    assert str(result.exception) == outside_message(tmp_path.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"], "it wrote into a folder that is no project"


def test_outside_the_project_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MNIST_MLOPS_ROOT"}
    proc = subprocess.run([str(Path(sys.executable).parent / "mnist-mlops"), "feedback"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip().splitlines() == [f"error: {outside_message(tmp_path.resolve())}"]


def test_a_root_from_the_environment_must_be_a_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mnist_mlops.config import project_root

    monkeypatch.setenv("MNIST_MLOPS_ROOT", str(tmp_path))
    with pytest.raises(UserError, match=r"^no params.yaml in .* \(MNIST_MLOPS_ROOT\): "):
        project_root()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert project_root() == tmp_path.resolve()


@pytest.mark.parametrize("override", ["train.epochs=3", "model.filters=[16, 32]", "data.sha256=abc"])
def test_set_changes_only_the_line_of_its_key(root: Path, override: str) -> None:
    """`--set` writes params.yaml: `git diff` must show the changed value only (no wrapped URLs,
    no `null` turned into an empty value, comments and layout kept)."""
    import difflib

    before = (root / "params.yaml").read_text().splitlines()
    write_params(root, [override])
    after = (root / "params.yaml").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, n=0, lineterm="")
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    key, value = override.split("=", 1)
    assert len(changed) == 2 and changed[0].startswith("-") and changed[1].startswith("+"), changed
    assert changed[1][1:].split("#")[0].strip() == f"{key.split('.')[1]}: {value}", changed


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["serve", "--help"], ["feedback", "--help"],
                                  ["sweep", "--help"]], ids=" ".join)
def test_help_shows_no_type_after_plain_flags(args: list[str]) -> None:
    """A flag takes no value: `--verbose <bool>` in the help reads as if it did."""
    from typer.testing import CliRunner

    from mnist_mlops.cli import app

    result = CliRunner().invoke(app, args, terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output, result.output
