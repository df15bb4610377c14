"""Typed parameters (params.yaml) and project paths.

Every tunable lives in params.yaml; this module is the only place that reads it, so a
bad value stops the run before any work with one line naming the key.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mnist_mlops.errors import UserError

PARAMS_FILE = "params.yaml"
MODEL_NAME = "mnist-convnet"
CHAMPION_ALIAS = "champion"
# Where the loop keeps its records: one setting each, read by the service, the fetch step and
# the monitor alike (through `Paths`), so replicas sharing storage and the training that learns
# from them always look in the same place. Unset: inside the project.
PREDICTION_LOG_ENV = "MNIST_MLOPS_PREDICTION_LOG"
FEEDBACK_ENV = "MNIST_MLOPS_FEEDBACK"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: str = "sample"
    mnist_url: str = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    mnist_sha256: str = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
    sha256: str | None = None
    retries: int = Field(2, ge=0, le=20)
    retry_delay_seconds: float = Field(1.0, ge=0)
    timeout_seconds: float = Field(60.0, gt=0)
    max_class_imbalance: float = Field(3.0, ge=1.0)
    feedback: bool = True
    feedback_min_new: int = Field(20, ge=0)
    # Labels are screened by the champion with cleanlab before they become data (training/screening.py);
    # suspects wait in quarantine for `mnist-mlops feedback review`.
    screen_labels: bool = True
    trusted_sources: list[Literal["feedback", "import"]] = Field(default_factory=list)  # accepted unscreened

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'sample', 'mnist', or a path/URL")
        return v.strip()


class PrepareParams(_Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    feedback_slice_fraction: float = Field(0.2, ge=0, lt=1)
    robust_digits: int = Field(200, ge=10, le=100_000)


class ForeignParams(_Section):
    """The foreign slice (training/foreign.py): printed and stroke-drawn digits of font families
    split by family; `train_share` of every training batch comes from the training families."""

    digits: int = Field(500, ge=10, le=100_000)  # of each source, in the val and in the test slice
    train_digits: int = Field(2000, ge=10, le=1_000_000)  # of each source, from the training families
    train_share: float = Field(0.2, ge=0, lt=1)
    # True: they come on top of MNIST's digits (an epoch still shows each MNIST digit once on
    # average, and grows by train_share / (1 - train_share)); False: they take that share of it.
    on_top: bool = True


class ModelParams(_Section):
    filters: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=3)
    convs_per_block: int = Field(1, ge=1, le=4)
    dense_units: int = Field(256, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)
    batch_norm: bool = True

    @field_validator("filters")
    @classmethod
    def _positive_filters(cls, v: list[int]) -> list[int]:
        if any(f < 1 for f in v):
            raise ValueError("every filter count must be at least 1")
        return v


class AugmentParams(_Section):
    """Random distortions of the training digits (tf.data, training batches only): what
    people's digits do that MNIST's do not. `enabled: false` trains on the digits as they are."""

    enabled: bool = True
    rotation_degrees: float = Field(10.0, ge=0, le=90)
    shear: float = Field(0.4, ge=0, le=1)
    scale: float = Field(0.15, ge=0, lt=1)
    shift_pixels: float = Field(2.0, ge=0, le=8)
    thickness: float = Field(0.5, ge=0, le=1)
    blur: float = Field(0.2, ge=0, le=1)


class TrainParams(_Section):
    epochs: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1, le=8192)
    learning_rate: float = Field(0.003, gt=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    seed: int = 42
    deterministic: bool = True
    jit_compile: bool = False


class EvaluateParams(_Section):
    min_accuracy: float = Field(0.95, ge=0, le=1)
    max_robust_drop: float = Field(0.01, ge=0, le=1)
    max_foreign_drop: float = Field(0.01, ge=0, le=1)
    misclassified_grid: int = Field(36, ge=0, le=400)


class ServeParams(_Section):
    """The BentoML service's limits (baked into the Bento as build arguments)."""

    max_batch_size: int = Field(256, ge=1, le=8192)
    max_latency_ms: int = Field(30000, ge=10)
    max_images_per_request: int = Field(512, ge=1, le=8192)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(25_000_000, ge=784)
    workers: int = Field(0, ge=0, le=64)
    timeout_seconds: float = Field(60.0, gt=0)
    follow_seconds: float = Field(5.0, gt=0, le=3600)
    log_predictions: bool = True
    log_max_mb: float = Field(256.0, gt=0)
    max_feedback_items: int = Field(1000, ge=1, le=100_000)


class MonitorParams(_Section):
    """The monitor flow: when the traffic has moved enough, or the labels say so, to retrain."""

    window_hours: float = Field(24.0, gt=0, le=24 * 366)
    drift_threshold: float = Field(0.2, gt=0, le=10)
    p_value: float = Field(0.01, gt=0, lt=1)
    min_predictions: int = Field(100, ge=1)
    min_labels: int = Field(20, ge=1)
    low_confidence: float = Field(0.6, gt=0, lt=1)
    retrain: bool = True


class Params(_Section):
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    foreign: ForeignParams = ForeignParams()
    model: ModelParams = ModelParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    serve: ServeParams = ServeParams()
    monitor: MonitorParams = MonitorParams()

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, the form MLflow params and --set use."""
        return {
            f"{section}.{key}": value
            for section, values in self.model_dump().items()
            for key, value in values.items()
        }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown parameter '{key}'"
    got = err.get("input")
    return f"invalid parameter '{key}': {err['msg'].lower()} (got {got!r})"


def parse_overrides(pairs: list[str] | None) -> dict[str, dict[str, object]]:
    """Turn `["train.epochs=3"]` into `{"train": {"epochs": 3}}` (values parsed as YAML)."""
    nested: dict[str, dict[str, object]] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise UserError(f"bad override '{pair}': expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        nested.setdefault(section, {})[name] = value
    return nested


def _merge(base: dict, overrides: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise UserError(f"invalid parameter '{section}': must be a section")
        target.update(values)
    return merged


def validate(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_first_error(exc)) from None


def load_params(root: Path, overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml under `root`, with `section.key=value` overrides."""
    path = root / PARAMS_FILE
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project directory") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections")
    return validate(_merge(raw, parse_overrides(overrides)))


def write_params(root: Path, overrides: list[str] | None) -> list[str]:
    """Persist `--set` overrides into params.yaml (comments kept), as `dvc exp run -S` does.

    DVC stages read params.yaml, so an override must land there to reach them and to be
    recorded in dvc.lock. The file is validated first and replaced atomically.
    Returns the keys whose value changed.
    """
    nested = parse_overrides(overrides)
    if not nested:
        return []
    load_params(root, overrides)  # validate the result before touching the file
    path = root / PARAMS_FILE
    rt = _round_trip_yaml()
    try:
        doc = rt.load(path.read_text())
    except Exception as exc:  # noqa: BLE001 - ruamel's errors (duplicate keys...) as one line
        raise UserError(f"{path} cannot be updated: {str(exc).splitlines()[0]} ({type(exc).__name__})") from None
    changed = []
    for section, values in nested.items():
        for key, value in values.items():
            if doc.setdefault(section, {}).get(key) != value:
                doc[section][key] = _as_written(value)
                changed.append(f"{section}.{key}={value}")
    if changed:
        tmp = path.with_suffix(".yaml.tmp")
        with tmp.open("w") as fh:
            rt.dump(doc, fh)
        os.replace(tmp, path)
    return changed


def _round_trip_yaml():
    """ruamel as params.yaml is written by hand: no line wrapped, `null` spelled out, so a
    `--set` shows in `git diff` as its own line only."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _as_written(value: object) -> object:
    """A list as the file writes lists: `[16, 32]` on the key's line."""
    if not isinstance(value, list):
        return value
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """`90s`, `30m`, `24h`, `7d` or plain seconds -> seconds (one-line error otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise UserError(f"{option}: expected a duration like 90s, 30m, 24h or 7d (got {text!r})")
    return float(match[1]) * _UNITS[match[2] or "s"]


METRIC_DETAILS = ("robustness", "foreign", "per_class", "feedback")  # reports/<name>.json, the evaluate stage's


class Paths:
    """Where each step reads and writes, relative to the project root."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.data = self.root / "data"
        self.data_dvc = self.root / "data.dvc"
        self.artifacts = self.root / "artifacts"
        self.prepared = self.artifacts / "prepared"
        self.robust = self.artifacts / "robust"  # the robustness slices (training/robustness.py)
        self.foreign = self.artifacts / "foreign"  # the foreign digits and slices (training/foreign.py)
        self._place_train_outputs(self.artifacts / "model", self.root / "reports")
        self.evaluated = self.artifacts / "evaluated.json"  # the evaluate stage's output: the logged model
        self.registered = self.artifacts / "registered.json"  # the promote step's: its registered version
        self.metrics = self.reports / "metrics.json"  # the headline; the tables behind it beside it
        self.metric_details = {name: self.reports / f"{name}.json" for name in METRIC_DETAILS}
        self.confusion = self.reports / "confusion.csv"
        self.lock = self.root / ".mnist-mlops.lock"
        # the labelled digits (mnist_mlops.records.feedback) and what the service answered ($FEEDBACK_ENV,
        # $PREDICTION_LOG_ENV when set: the service's, the fetch step's and the monitor's alike)
        self.feedback = _env_path(FEEDBACK_ENV) or self.root / "feedback"
        self.prediction_log = _env_path(PREDICTION_LOG_ENV) or self.root / "logs" / "predictions"
        self.monitoring = self.reports / "monitoring"  # the monitor's HTML reports
        self.cache = Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))


    def _place_train_outputs(self, model_dir: Path, reports: Path) -> None:
        """Where the train step writes: the model, the history and the figures."""
        self.model_dir = model_dir
        self.model_file = model_dir / "model.keras"
        self.reports = reports
        self.history = reports / "history.csv"
        self.figures = reports / "figures"

    def with_train_outputs_in(self, workdir: Path) -> Paths:
        """A copy whose train step writes into `workdir` (a sweep candidate's); the rest unchanged."""
        paths = copy.copy(self)
        paths._place_train_outputs(workdir / "model", workdir / "reports")
        return paths


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def project_root() -> Path:
    """The project directory: $MNIST_MLOPS_ROOT, else the nearest parent holding params.yaml.

    Outside a project there is none: every command that needs one says so in the same line,
    rather than reading (or creating) stores in whatever folder it was started from."""
    env = os.environ.get("MNIST_MLOPS_ROOT")
    if env:
        root = Path(env).resolve()
        if not (root / PARAMS_FILE).is_file():
            raise UserError(f"no {PARAMS_FILE} in {root} (MNIST_MLOPS_ROOT): point it at the project directory")
        return root
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / PARAMS_FILE).is_file():
            return candidate
    raise UserError(f"no {PARAMS_FILE} in {here} or any folder above it: run from the project directory "
                    "(or set MNIST_MLOPS_ROOT to it)")


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else a sqlite store inside the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
