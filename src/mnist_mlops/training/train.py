"""Train: the ConvNet on mini-batches from a tf.data pipeline, one MLflow run per training."""

from __future__ import annotations

import csv
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from mnist_mlops import redact
from mnist_mlops.config import AugmentParams, ForeignParams, Params, Paths, TrainParams
from mnist_mlops.platform.devices import pick_strategy
from mnist_mlops.training.prepare import load_split


def make_deterministic(seed: int, deterministic: bool) -> None:
    """Seeds everywhere; with op determinism two runs give identical metrics on one machine."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _shuffled(x: np.ndarray, y: np.ndarray, seed: int | None):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32))).cache()
    return ds if seed is None else ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)


def epoch_examples(n: int, mix: tuple[np.ndarray, np.ndarray, float] | None, on_top: bool) -> int:
    """Examples per training epoch: the MNIST digits' count, or with the mixed-in digits `on_top`
    as many more as keep each MNIST digit seen once an epoch on average."""
    if mix is None or not on_top or not len(mix[1]):
        return n
    return int(round(n / (1 - mix[2])))


def dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None,
            augment: AugmentParams | None = None, mix: tuple[np.ndarray, np.ndarray, float] | None = None,
            examples: int | None = None):
    """In-memory tf.data: cached, shuffled per epoch with a fixed seed, batched, each batch
    distorted afresh every epoch when `augment` is given (training only), prefetched.

    `mix` (x, y, share): each example is drawn from those digits with probability `share`
    (seeded), else from (x, y); an epoch is `examples` long (default len(x): mixing costs no
    time, and MNIST gives up that share of each epoch)."""
    import tensorflow as tf

    from mnist_mlops.training.augment import augmented

    ds = _shuffled(x, y, shuffle_seed)
    if mix is not None and mix[2] > 0 and len(mix[1]):
        seed = shuffle_seed or 0
        other = _shuffled(mix[0], mix[1], seed + 1).repeat()
        ds = tf.data.Dataset.sample_from_datasets([ds.repeat(), other], weights=[1 - mix[2], mix[2]], seed=seed,
                                                  rerandomize_each_iteration=True).take(examples or len(x))
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = augmented(ds, augment, seed=shuffle_seed or 0)
    return ds.prefetch(tf.data.AUTOTUNE)


def compile_model(model, params: TrainParams, steps_per_epoch: int) -> None:
    import keras

    lr = params.learning_rate
    if params.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=params.epochs * steps_per_epoch)
    # named: Keras numbers a second optimizer of the process `adam_1`, and the saved bytes would differ
    model.compile(optimizer=keras.optimizers.Adam(lr, name="adam"), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=params.jit_compile)


def epoch_callback(total_epochs: int, history_rows: list[dict]):
    """Per-epoch (never per-batch) logging: console line + MLflow metrics."""
    import keras
    import mlflow
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            row = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._start, **logs}
            history_rows.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            console.print(
                f"  epoch {epoch + 1:>3}/{total_epochs}  loss {logs.get('loss', 0):.4f}  "
                f"acc {logs.get('accuracy', 0):.4f}  val_loss {logs.get('val_loss', 0):.4f}  "
                f"val_acc {logs.get('val_accuracy', 0):.4f}  ({row['seconds']:.1f}s)"
            )

    return EpochLogger()


def write_history(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]  # no seconds: a stage output is reproducible
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def foreign_digits(params: ForeignParams, paths: Paths) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The training families' printed and stroke-drawn digits (the `foreign` stage's), normalised,
    with the share of each batch they make up; None when `foreign.train_share` is 0."""
    from mnist_mlops.errors import UserError
    from mnist_mlops.preprocess import normalize

    if not params.train_share:
        return None
    try:
        x, y = np.load(paths.foreign / "train_x.npy"), np.load(paths.foreign / "train_y.npy")
    except FileNotFoundError:
        raise UserError(f"no foreign training digits in {paths.foreign}: run `dvc repro foreign`") from None
    return normalize(x), y, params.train_share


def fit(params: Params, paths: Paths, callbacks: list | None = None):
    """Build and fit the ConvNet on the prepared splits; returns (model, history rows)."""
    from mnist_mlops.training.model import build_model

    make_deterministic(params.train.seed, params.train.deterministic)
    train, val = load_split(paths.prepared, "train"), load_split(paths.prepared, "val")
    batch, mix = params.train.batch_size, foreign_digits(params.foreign, paths)
    examples = epoch_examples(len(train.y), mix, params.foreign.on_top)
    with pick_strategy().scope():
        model = build_model(params.model, seed=params.train.seed)
        compile_model(model, params.train, steps_per_epoch=int(np.ceil(examples / batch)))
    rows: list[dict] = []
    model.fit(
        dataset(train.x, train.y, batch, shuffle_seed=params.train.seed, augment=params.augment,
                mix=mix, examples=examples),
        validation_data=dataset(val.x, val.y, batch, shuffle_seed=None),
        epochs=params.train.epochs,
        callbacks=[epoch_callback(params.train.epochs, rows), *(callbacks or [])],
        verbose=0,
        shuffle=False,  # the tf.data pipeline shuffles (seeded); Keras would only warn
    )
    return model, rows


def log_datasets(paths: Paths) -> None:
    """The run's inputs as MLflow datasets (the runs table's Dataset column, the run page):
    train, val and test, each with the DVC md5 of data.dvc as its digest and data.dvc (plus
    the DVC remote, when one is set) as its source."""
    import mlflow

    from mnist_mlops.platform.versioning import dvc_md5, remote_url
    from mnist_mlops.training.data import FEEDBACK_FILE

    md5 = (dvc_md5(paths.data_dvc) or "untracked").removesuffix(".dir")
    remote = remote_url(paths.root)
    tags = {"dvc.md5": md5, **({"dvc.remote": redact.url(remote)} if remote else {})}
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        data = load_split(paths.prepared, split)
        with warnings.catch_warnings():  # MLflow registers its local source class twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(data.x, targets=data.y, source=str(paths.data_dvc),
                                             name=f"mnist-{split}", digest=md5[:32])
        mlflow.log_input(dataset, context=context, tags=tags)
    if (listing := paths.data / FEEDBACK_FILE).exists():  # which labelled digits this data version holds
        mlflow.log_artifact(str(listing), "data")


def train(params: Params, paths: Paths, tags: dict[str, str] | None = None) -> str:
    """The `train` stage: fit, save the model and curves, log it all to a new MLflow run
    (with `tags` beside the lineage tags: a sweep candidate says where it trains)."""
    import mlflow

    from mnist_mlops.model_file import TAG_WEIGHTS, file_md5, save_keras
    from mnist_mlops.platform.tracking import (
        PARENT_RUN_ENV,
        SYSTEM_METRICS_INTERVAL_S,
        close_stale_runs,
        run_tags,
        setup_mlflow,
        training_run_name,
    )
    from mnist_mlops.training.plots import learning_curves

    setup_mlflow(paths.root)
    for stale in close_stale_runs():
        print(f"train: MLflow run {stale} was left RUNNING by a killed training: marked KILLED")
    parent = os.environ.get(PARENT_RUN_ENV) or None  # a sweep's child run (see sweep.py)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines
    with mlflow.start_run(run_name=training_run_name(paths), parent_run_id=parent, log_system_metrics=True,
                          tags={**run_tags(paths, params.data.source), **(tags or {})}) as run:
        mlflow.log_params({k: redact.text(v) if isinstance(v, str) else v for k, v in params.flat().items()})
        log_datasets(paths)
        model, rows = fit(params, paths)
        save_keras(model, paths.model_file)
        mlflow.set_tag(TAG_WEIGHTS, file_md5(paths.model_file))  # how evaluate and promote find this run
        write_history(rows, paths.history)
        figure = learning_curves(rows, paths.figures / "learning_curves.png")
        mlflow.log_artifact(str(figure), "figures")
        mlflow.log_artifact(str(paths.history), "reports")
    return run.info.run_id


def stage(params: Params, paths: Paths) -> str:
    """The DVC `train` stage."""
    return f"train: MLflow run {train(params, paths)}"
