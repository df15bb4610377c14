"""Label verdicts and reviews without a model (fast): the journal's rules, trusted sources,
screening switched off, and a review that names no quarantined label changing nothing.

Screening with a real champion is tests/test_screening.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.config import validate
from mnist_mlops.errors import UserError
from mnist_mlops.records import feedback, verdicts
from mnist_mlops.training import review, screening


def store_with(tmp_path: Path, sources: list[str]) -> feedback.Examples:
    images = np.random.default_rng(1).integers(0, 256, (len(sources), 28, 28), dtype=np.uint8)
    feedback.FeedbackStore(tmp_path).add([{"label": i % 10, "source": s, "prediction_id": f"{i:028x}"}
                                          for i, s in enumerate(sources)], images)
    return feedback.accepted(tmp_path)


def test_the_newest_verdict_of_a_digit_and_label_wins_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    verdicts.append(tmp_path, [{"sha": "a" * 32, "label": 3, "verdict": "quarantined", "by": "screen"},
                               {"sha": "a" * 32, "label": 5, "verdict": "accepted", "by": "screen"}])
    verdicts.append(tmp_path, [{"sha": "a" * 32, "label": 3, "verdict": "accepted", "by": "review"}])
    with (tmp_path / verdicts.FILE).open("a") as fh:
        fh.write('{"sha": "' + "a" * 32 + '", "label": 5, "verdict": "rej')  # a crash mid-append
    found = verdicts.read(tmp_path)
    assert found[("a" * 32, 3)]["verdict"] == "accepted" and found[("a" * 32, 3)]["by"] == "review"
    assert found[("a" * 32, 5)]["verdict"] == "accepted"
    with pytest.raises(ValueError, match="unknown verdict"):
        verdicts.append(tmp_path, [{"sha": "b", "label": 1, "verdict": "maybe", "by": "review"}])


def test_trusted_sources_are_accepted_and_the_rest_wait_for_a_champion(tmp_path: Path, monkeypatch) -> None:
    examples = store_with(tmp_path, ["import", "feedback", "import"])
    params = validate({"data": {"trusted_sources": ["import"]}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a registry, no champion
    ref = screening.Reference(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    assert list(screening.judge(examples, ref, tmp_path, params)) == ["accepted", "pending", "accepted"]
    assert {v["by"] for v in verdicts.read(tmp_path).values()} == {"trusted"}
    off = validate({"data": {"screen_labels": False}})
    assert list(screening.judge(examples, ref, tmp_path, off)) == ["accepted"] * 3


def test_a_review_that_names_no_quarantined_label_changes_nothing(tmp_path: Path) -> None:
    examples = store_with(tmp_path, ["feedback"] * 3)
    verdicts.append(tmp_path, [{"sha": r["sha"], "label": r["label"], "verdict": "quarantined", "by": "screen",
                                "predicted": 9, "score": 0.01} for r in examples.records[:2]])
    journal = (tmp_path / verdicts.FILE).read_bytes()
    first, second = (r["prediction_id"] for r in examples.records[:2])
    for ids, why in ((["nope"], "'nope' names no quarantined label"),
                     ([first, examples.records[2]["prediction_id"]], "names no quarantined label")):
        with pytest.raises(UserError, match=why):
            review.decide(tmp_path, ids, "accepted")
    assert (tmp_path / verdicts.FILE).read_bytes() == journal
    assert [s.id for s in review.suspects(tmp_path)] == [first, second]
    review.decide(tmp_path, [examples.records[1]["sha"][:10]], "rejected")  # a sha prefix names it too
    assert [s.id for s in review.suspects(tmp_path)] == [first]
    with pytest.raises(UserError, match="names no quarantined label"):  # decided already
        review.decide(tmp_path, [second], "accepted")
