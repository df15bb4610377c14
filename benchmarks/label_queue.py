"""The labelling queue, measured: how many of the top 20 are the digits only a person can read.

    python benchmarks/label_queue.py [--draws 10] [--ambiguous 20] [--answers 200]

Needs a trained project (`make run`): its champion answers. Each draw takes `--answers`
base test digits (digits the champion never trained on); the last `--ambiguous` of them are
two test digits of different classes blended half and half. The answers go through the
service's own prediction log (`records.prediction_log`), and the queue ranks them as
GET /feedback/queue does (`records.queue`: margin, near-copies left out). For comparison,
the same answers ranked by the other usual uncertainty criteria: entropy and least
confidence. Prints, per criterion, how many of the top 20 are blends (mean, min, max over
the draws); chance would be 20 × ambiguous ÷ answers. Not a test; exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import champion_and_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOP = 20


def blended_draw(images: np.ndarray, labels: np.ndarray, answers: int, ambiguous: int,
                 rng: np.random.Generator) -> np.ndarray:
    """`answers` digits; the last `ambiguous` are two of different classes averaged."""
    order = rng.permutation(len(labels))
    clear, rest = order[: answers - ambiguous], order[answers - ambiguous:]
    firsts, pool = rest[:ambiguous], rest[ambiguous:]
    seconds = [rng.choice(pool[labels[pool] != labels[i]]) for i in firsts]
    blends = ((images[firsts].astype(np.float32) + images[seconds]) / 2).astype(np.uint8)
    return np.concatenate([images[clear], blends])


def other_rankings(probs: np.ndarray) -> dict[str, np.ndarray]:
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1)
    return {"entropy": np.argsort((p * np.log(p)).sum(axis=1), kind="stable"),
            "least confidence": np.argsort(p.max(axis=1), kind="stable")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--ambiguous", type=int, default=20)
    parser.add_argument("--answers", type=int, default=200)
    args = parser.parse_args()

    from mnist_mlops import registry
    from mnist_mlops.records import prediction_log, queue

    found = champion_and_data(ROOT)
    if found is None:
        return 2
    champion, _, data, rows = found
    test = rows["test"]
    images, labels = data.images[test], data.labels[test]
    counts: dict[str, list[int]] = {"margin (the queue)": [], "entropy": [], "least confidence": []}
    for draw in range(args.draws):
        digits = blended_draw(images, labels, args.answers, args.ambiguous, np.random.default_rng(draw))
        probs = registry.probabilities_of(champion, digits)
        with tempfile.TemporaryDirectory() as tmp:
            log = prediction_log.PredictionLog(Path(tmp) / "log", max_mb=64)
            ids = prediction_log.new_ids(len(digits))
            log.record(ids, "/predict", champion, probs.astype(np.float32), digits[..., None] / 255.0)
            log.close()
            blended = set(ids[args.answers - args.ambiguous:])
            top = queue.queue(Path(tmp) / "log", Path(tmp) / "feedback", TOP)
            counts["margin (the queue)"].append(sum(q.prediction_id in blended for q in top))
        for name, order in other_rankings(probs).items():
            counts[name].append(int((order[:TOP] >= args.answers - args.ambiguous).sum()))
    chance = TOP * args.ambiguous / args.answers
    print(f"champion v{champion}; {args.draws} draws of {args.answers} test digits, {args.ambiguous} of them "
          f"two digits blended; blends among the top {TOP} (chance: {chance:.0f})")
    print(f"{'criterion':<20} {'mean':>5} {'min':>4} {'max':>4}  per draw")
    for name, values in counts.items():
        print(f"{name:<20} {np.mean(values):>5.1f} {min(values):>4} {max(values):>4}  {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
