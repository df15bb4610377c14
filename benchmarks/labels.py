"""Label poisoning, measured: how much of it the screening catches, and what it saves the model.

    python benchmarks/labels.py [--labels 100] [--wrong 0.6] [--seeds 3] [--epochs 3]

Needs a trained project (`make run`): its champion screens, exactly as the fetch step does
(`mnist_mlops.training.screening`: the champion's probabilities beside the base validation
split, cleanlab's `find_label_issues`). The labelled digits are base test digits moved one
pixel (digits the champion never trained on), from the first half of the test split; the
second half is where the models are scored, so nothing scored was labelled.

Two kinds of wrong labels, each at `--wrong` of the labels: systematic (each digit always
labelled as the same other one, as a person who mixes digits up, or a script, would) and
random (any other digit). For each: recall of the wrong labels (quarantined ÷ wrong), the
share of honest labels quarantined, and the test accuracy of a small ConvNet trained on the
base train split plus the labels with screening (accepted ones only) and without (all of
them), on the held-out half of the test split as it is and moved one pixel like the labels
(the "feedback-like" digits). Prints the table; not a test; exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import champion_and_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMATIC = np.array([2, 7, 0, 8, 9, 6, 5, 1, 3, 4])  # each digit always labelled as this one


def wrong_labels(truth: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "systematic":
        return SYSTEMATIC[truth]
    return (truth + rng.integers(1, 10, len(truth))) % 10  # any digit but the right one


def small_model_accuracy(x: np.ndarray, y: np.ndarray, evals: dict, epochs: int, seed: int) -> dict[str, float]:
    import keras

    from mnist_mlops.config import validate
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.training.model import build_model

    keras.utils.set_random_seed(seed)
    params = validate({"model": {"filters": [16, 32], "dense_units": 64, "batch_norm": False}})
    model = build_model(params.model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(normalize(x), y, epochs=epochs, batch_size=64, verbose=0)
    return {name: float((np.asarray(model(normalize(ex))).argmax(1) == ey).mean()) for name, (ex, ey) in evals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--wrong", type=float, default=0.6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from mnist_mlops.records.feedback import Examples, digit_sha
    from mnist_mlops.training.screening import Reference, screen

    found = champion_and_data(ROOT)
    if found is None:
        return 2
    champion, params, data, rows = found
    base = (data.images, data.labels)
    reference = Reference.from_base(*base, params)
    test = rows["test"]
    label_rows, eval_rows = test[: len(test) // 2], test[len(test) // 2:]
    evals = {"test": (data.images[eval_rows], data.labels[eval_rows]),
             "feedback-like": (np.roll(data.images[eval_rows], 1, axis=2), data.labels[eval_rows])}
    train_x, train_y = data.images[rows["train"]], data.labels[rows["train"]]
    print(f"champion v{champion}; {args.labels} labels, {args.wrong:.0%} wrong; {args.seeds} seeds; "
          f"models: small ConvNet, {args.epochs} epochs on {len(train_y)} base train digits + the labels")
    print(f"{'wrong labels':<12} {'seed':>4} {'recall':>7} {'honest held':>11} "
          f"{'test with/without':>18} {'feedback-like with/without':>27}")
    for kind in ("systematic", "random"):
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            pick = rng.choice(label_rows, args.labels, replace=False)
            images, truth = np.roll(data.images[pick], 1, axis=2), data.labels[pick].astype(np.int64)
            wrong = np.zeros(args.labels, bool)
            wrong[: int(args.wrong * args.labels)] = True
            labels = np.where(wrong, wrong_labels(truth, kind, rng), truth).astype(np.uint8)
            records = [{"sha": digit_sha(i), "label": int(v)} for i, v in zip(images, labels, strict=True)]
            examples = Examples(images, labels, records)
            held = np.array([v["verdict"] == "quarantined" for v in screen(examples, reference)])
            keep = ~held
            with_ = small_model_accuracy(np.concatenate([train_x, images[keep]]),
                                         np.concatenate([train_y, labels[keep]]), evals, args.epochs, seed)
            without = small_model_accuracy(np.concatenate([train_x, images]), np.concatenate([train_y, labels]),
                                           evals, args.epochs, seed)
            print(f"{kind:<12} {seed:>4} {held[wrong].mean():>7.2f} {held[~wrong].mean():>11.3f} "
                  f"{with_['test']:>8.4f}/{without['test']:.4f} "
                  f"{with_['feedback-like']:>17.4f}/{without['feedback-like']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
