"""Evaluate: score the trained model on the test split (and the feedback, robustness and
foreign slices) and log it to its MLflow run; the flow's promote step registers it (once per
trained model) and gates it."""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mnist_mlops import redact
from mnist_mlops.config import MODEL_NAME, Params, Paths
from mnist_mlops.digit_features import REFERENCE_DIGITS, REFERENCE_FILE, feature_arrays
from mnist_mlops.errors import UserError
from mnist_mlops.model_file import TAG_WEIGHTS, file_md5
from mnist_mlops.scoring import load_keras, probabilities, score
from mnist_mlops.training.prepare import FEEDBACK_INFO, FEEDBACK_SPLIT, load_split

TAG_MODEL_URI = "model.uri"  # the run's logged model, reused when the stage re-runs on the same weights


def per_class(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=range(10), zero_division=0)
    metrics = {}
    for digit in range(10):
        metrics |= {f"precision_{digit}": float(p[digit]), f"recall_{digit}": float(r[digit]),
                    f"f1_{digit}": float(f[digit])}
    return metrics


def confusion(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (y.astype(int), pred.astype(int)), 1)
    return matrix


def write_confusion_csv(y: np.ndarray, pred: np.ndarray, path: Path) -> None:
    """One row per test digit: the shape `dvc plots` wants for its confusion template."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(y.tolist(), pred.tolist(), strict=False))


def write_figures(model, x, y, probs, robust: dict[str, float], params: Params, paths: Paths) -> list[Path]:
    from mnist_mlops.training import plots

    pred = probs.argmax(axis=1)
    figs = paths.figures
    first_conv = next(layer for layer in model.layers if layer.__class__.__name__ == "Conv2D")
    return [
        plots.confusion_matrix(confusion(y, pred), figs / "confusion_matrix.png"),
        plots.misclassified(x, y, probs, params.evaluate.misclassified_grid, figs / "misclassified.png"),
        plots.conv_filters(np.asarray(first_conv.get_weights()[0]), figs / "conv_filters.png"),
        plots.robustness(robust, float((pred == y).mean()), figs / "robustness.png"),
    ]


def robustness_metrics(model, paths: Paths) -> dict[str, float]:
    """`robust_accuracy` and `robust_<corruption>` on the robustness slice of the test split:
    the same digits drawn on paper, corrupted and converted as uploads are (robustness.py)."""
    from mnist_mlops.training.robustness import load_slice, per_corruption

    robust = load_slice(paths, "robust")
    correct = probabilities(model, robust.x).argmax(axis=1) == robust.y
    return per_corruption(correct, robust.kind)


def foreign_metrics(model, paths: Paths) -> tuple[dict[str, float], dict[str, float]]:
    """`foreign_accuracy`, per source, per class and the worst class on the foreign test slice
    (digits of font families never trained on: foreign.py), and the accuracy per family."""
    from mnist_mlops.training.foreign import load, metrics, per_family

    foreign = load(paths, "test")
    correct = probabilities(model, foreign.x).argmax(axis=1) == foreign.y
    return metrics(correct, foreign), per_family(correct, foreign)


def _patch_keras_input_example() -> None:
    """mlflow 3.17's keras flavor writes input_example.json before creating the model dir
    (FileNotFoundError); create the dir first. Harmless once MLflow fixes the order."""
    import mlflow.keras.save as keras_save

    original = keras_save._save_example
    if getattr(original, "_makes_dir", False):
        return

    def save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    save_example._makes_dir = True
    keras_save._save_example = save_example


def feedback_metrics(model, paths: Paths) -> tuple[dict[str, float], dict[str, str]]:
    """Accuracy on the held-out feedback slice (when it holds digits), and the data version's
    feedback record: how many labelled digits it has, and when the newest was labelled."""
    info_file = paths.prepared / FEEDBACK_INFO
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    metrics = {"feedback_digits": float(info.get("digits", 0))}
    tags = {"data.feedback_count": str(info.get("digits", 0)), "data.feedback_newest": str(info.get("newest"))}
    if (paths.prepared / f"{FEEDBACK_SPLIT}_y.npy").exists():
        fb = load_split(paths.prepared, FEEDBACK_SPLIT)
        metrics["feedback_slice_digits"] = float(len(fb.y))
        if len(fb.y):
            metrics["feedback_accuracy"] = score(probabilities(model, fb.x), fb.y).accuracy
    return metrics, tags


def log_model(model, x_example: np.ndarray, probs: np.ndarray, weights_md5: str) -> str:
    """Log the Keras model with a signature and input example to the active run, once per
    trained model: an evaluate stage that re-runs on the same model (a code change) reuses the
    logged one. Returns its model URI; the flow's promote step registers it."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    run = mlflow.active_run()
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    if tags.get(TAG_WEIGHTS) == weights_md5 and tags.get(TAG_MODEL_URI):
        return tags[TAG_MODEL_URI]
    _patch_keras_input_example()
    keras.config.disable_interactive_logging()  # MLflow's input-example check calls predict: no bars
    signature = infer_signature(x_example[:1], probs[:1])
    # Explicit requirements: inferring them reloads the model in a fresh subprocess (TensorFlow
    # imported again), ~70 s of a 100 s evaluate stage on a busy 2-core machine, ~2 s without.
    requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"]
    info = mlflow.keras.log_model(model, name="model", signature=signature, input_example=x_example[:1],
                                  pip_requirements=requirements)
    mlflow.set_tags({TAG_WEIGHTS: weights_md5, TAG_MODEL_URI: info.model_uri})
    return info.model_uri


def training_run(weights_md5: str, logged: bool = False):
    """The newest MLflow run that trained the model file with this md5 (the train stage tags it),
    with its model logged by evaluate when `logged`. Found by content rather than written beside
    the model: the train stage's output stays reproducible, and a model DVC restores from its
    cache still finds the run that trained it."""
    import mlflow

    from mnist_mlops.platform.tracking import EXPERIMENT

    query = f"tags.`{TAG_WEIGHTS}` = '{weights_md5}'" + (f" and tags.`{TAG_MODEL_URI}` != ''" if logged else "")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    if not runs:
        what = "logged the model" if logged else "trained the model"
        raise UserError(f"no MLflow run in {redact.url(mlflow.get_tracking_uri())} {what} with md5 {weights_md5}: "
                        "run `mnist-mlops run` to train it here")
    return runs[0]


def monitoring_reference(paths: Paths, test_probs: np.ndarray, out: Path) -> Path:
    """What the monitor compares live traffic with, logged beside the model it describes:
    the training labels' counts, the features of (up to `REFERENCE_DIGITS` of) the training
    digits, and this model's answers on the base test split (class counts, confidences). A
    few hundred kB; the monitor then needs neither TensorFlow nor the training data."""
    train = load_split(paths.prepared, "train")
    pick = np.random.default_rng(0).permutation(len(train.y))[:REFERENCE_DIGITS]
    feats = feature_arrays(train.x[pick])
    np.savez_compressed(out, labels=np.bincount(train.y.astype(int), minlength=10),
                        predicted=np.bincount(test_probs.argmax(axis=1), minlength=10),
                        confidence=test_probs.max(axis=1).astype(np.float32),
                        **{f"feature_{k}": v.astype(np.float32) for k, v in feats.items()})
    return out


def version_tags(result, robust: dict, foreign: dict, fb_metrics: dict, fb_tags: dict, data_md5: str) -> dict[str, str]:
    """The registered version's tags: its scores and data version, as the registry shows them."""
    return {"test_accuracy": f"{result.accuracy:.6f}", "robust_accuracy": f"{robust['robust_accuracy']:.6f}",
            "foreign_accuracy": f"{foreign['foreign_accuracy']:.6f}",
            "foreign_worst_class": f"{foreign['foreign_worst_class']:.6f}",
            "finite_outputs": str(result.finite).lower(),
            "data.md5": data_md5, **fb_tags,
            **({"feedback_accuracy": f"{fb_metrics['feedback_accuracy']:.6f}"}
               if "feedback_accuracy" in fb_metrics else {})}


def metrics_summary(result, foreign: dict, robust: dict, fb_metrics: dict) -> dict:
    """reports/metrics.json, the headline `dvc metrics show` compares in one terminal-wide row."""
    return {"test_accuracy": result.accuracy, "test_loss": result.loss if result.finite else None,
            "robust_accuracy": robust["robust_accuracy"], "foreign_accuracy": foreign["foreign_accuracy"],
            "foreign_worst_class": foreign["foreign_worst_class"],
            **({"feedback_accuracy": fb_metrics["feedback_accuracy"]} if "feedback_accuracy" in fb_metrics else {})}


def metric_details(metrics: dict, robust: dict, foreign: dict, families: dict, fb_metrics: dict) -> dict[str, dict]:
    """The tables behind the headline, a file each (`dvc metrics show reports/robustness.json`):
    accuracy per corruption, per foreign source, class and family, per-class precision/recall/F1
    on the test split, and the feedback slice's size."""
    return {"robustness": {k.removeprefix("robust_"): round(v, 4) for k, v in robust.items() if k != "robust_accuracy"},
            "foreign": {k.removeprefix("foreign_"): round(v, 4) for k, v in foreign.items()
                        if k != "foreign_accuracy"} | {"families": families},
            "per_class": {k: round(v, 4) for k, v in metrics.items() if k.startswith(("precision_", "recall_", "f1_"))},
            "feedback": {k.removeprefix("feedback_"): v for k, v in fb_metrics.items()}}


def evaluate(params: Params, paths: Paths) -> dict:
    """The `evaluate` stage: metrics + plots for DVC, the same logged to the training run."""
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    test = load_split(paths.prepared, "test")
    model = load_keras(paths.model_file)
    probs = probabilities(model, test.x)
    result = score(probs, test.y)
    pred = probs.argmax(axis=1)
    metrics = {"test_loss": result.loss, "test_accuracy": result.accuracy,
               **per_class(test.y, pred)}
    robust = robustness_metrics(model, paths)
    metrics |= robust
    foreign, families = foreign_metrics(model, paths)
    metrics |= foreign
    paths.reports.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(test.y, pred, paths.confusion)
    figures = write_figures(model, test.x, test.y, probs, robust, params, paths)
    fb_metrics, fb_tags = feedback_metrics(model, paths)
    metrics |= fb_metrics

    setup_mlflow(paths.root)
    weights = file_md5(paths.model_file)
    run_id = training_run(weights).info.run_id
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        mlflow.set_tag("model.finite_outputs", str(result.finite).lower())
        mlflow.set_tags(fb_tags)
        for fig in figures:
            mlflow.log_artifact(str(fig), "figures")
        mlflow.log_artifact(str(paths.confusion), "reports")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(monitoring_reference(paths, probs, Path(tmp) / REFERENCE_FILE)), "monitoring")
        tags = version_tags(result, robust, foreign, fb_metrics, fb_tags, run.data.tags.get("data.md5", "untracked"))
        model_uri = log_model(model, test.x, probs, weights)
    paths.metrics.write_text(json.dumps(metrics_summary(result, foreign, robust, fb_metrics), indent=2) + "\n")
    for name, table in metric_details(metrics, robust, foreign, families, fb_metrics).items():
        paths.metric_details[name].write_text(json.dumps(table, indent=2) + "\n")
    # No run id or model URI in the stage's output (reproducible, for dvc.lock): promote finds
    # them by the model's md5 (`training_run(..., logged=True)`).
    evaluated = ({"model": MODEL_NAME, "weights_md5": weights, "version_tags": tags} | asdict(result)
                 | {"robust_accuracy": robust["robust_accuracy"], "foreign_accuracy": foreign["foreign_accuracy"],
                    "foreign_worst_class": foreign["foreign_worst_class"]})
    paths.evaluated.write_text(json.dumps(evaluated, indent=2) + "\n")
    return evaluated | {"run_id": run_id, "model_uri": model_uri}


def stage(params: Params, paths: Paths) -> str:
    """The DVC `evaluate` stage."""
    r = evaluate(params, paths)
    return (f"evaluate: test accuracy {r['accuracy']:.4f}, robust accuracy {r['robust_accuracy']:.4f}, "
            f"foreign accuracy {r['foreign_accuracy']:.4f} (worst class {r['foreign_worst_class']:.4f}), "
            f"model logged to run {r['run_id']}")
