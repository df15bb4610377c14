"""The loop's decisions, each on the evidence it is given (no servers: fast): the canary that
lets a worker serve a version, the monitor's reasons to retrain and its memory of the evidence
that already started one. The same code runs inside the service and the monitor flow; their
integration is in tests/test_follow.py and tests/test_monitoring.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mnist_mlops.config import Params
from mnist_mlops.monitoring.accuracy import accuracy
from mnist_mlops.monitoring.check import Result, Traffic, evidence, reasons
from mnist_mlops.serving.follow import FollowerState, canary_verdict

EMPTY = Traffic([], None, 0)  # type: ignore[arg-type]


def test_the_canary_judges_a_version_by_its_own_accuracy_not_by_chance() -> None:
    """A 0.955 champion with a 0.95 floor scores 188/200 (0.94) about one time in five: a raw
    comparison with the floor refused it then. Consistent with its recorded accuracy: served."""
    assert canary_verdict("3", 188, 200, recorded=0.955, floor=0.95) is None
    far = canary_verdict("3", 150, 200, recorded=0.955, floor=0.5)
    assert far and "far below its recorded test accuracy 0.9550" in far and "binomial p=" in far
    low = canary_verdict("4", 20, 200, recorded=None, floor=0.5)
    assert low and "below the floor evaluate.min_accuracy=0.5" in low
    # A container started without a floor and a version without a record: nothing to check against.
    assert "nothing to check" in canary_verdict("5", 190, 200, recorded=None, floor=None)


def test_a_follower_behind_the_champion_says_so() -> None:
    state = FollowerState(champion="3")
    assert state.behind("2") and not state.behind("3") and not FollowerState().behind("2")


def result(champion: str, labels: list[dict], new_labels: int = 0) -> Result:
    from mnist_mlops.monitoring.accuracy import by_version

    now = datetime.now(UTC)
    r = Result(now - timedelta(hours=1), now, champion, EMPTY)
    r.accuracy = by_version(labels)
    r.new_labels = new_labels
    return r


def labels(version: str, right: int, wrong: int) -> list[dict]:
    return ([{"predicted": 3, "label": 3, "model_version": version}] * right
            + [{"predicted": 3, "label": 5, "model_version": version}] * wrong)


def test_live_accuracy_fires_only_on_the_champions_labels_and_real_evidence() -> None:
    params = Params()  # floor 0.95, monitor.min_labels 20
    assert accuracy([(1, 1)] * 18 + [(1, 2)] * 2).high > 0.95
    assert reasons(result("2", labels("2", 18, 2)), params) == []  # 18/20: no evidence against 0.95
    assert reasons(result("2", labels("1", 10, 30) + labels("2", 40, 0)), params) == []  # v1's errors are v1's
    fired = reasons(result("2", labels("2", 20, 20)), params)
    assert len(fired) == 1 and fired[0].startswith("live accuracy of champion v2 0.500 (95% CI up to ")


def test_the_same_evidence_is_recognised_and_new_evidence_is_not() -> None:
    a = result("2", labels("2", 20, 20), new_labels=3)
    assert evidence(a, "md5-a") == evidence(result("2", labels("2", 20, 20), new_labels=3), "md5-a")
    assert evidence(a, "md5-a") != evidence(a, "md5-b")  # a new data version
    assert evidence(a, "md5-a") != evidence(result("3", labels("2", 20, 20), new_labels=3), "md5-a")
    assert evidence(a, "md5-a") != evidence(result("2", labels("2", 20, 21), new_labels=3), "md5-a")


@pytest.fixture
def monitoring_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    from pipelines.monitoring import EXPERIMENT

    mlflow.set_experiment(EXPERIMENT)
    yield
    mlflow.set_tracking_uri(None)


def test_a_retrain_is_started_once_per_evidence(monitoring_store) -> None:
    """Persistent drift after a finished retrain: the next check finds the evidence that started it
    and starts nothing, saying so; other evidence starts one."""
    import mlflow

    from pipelines.monitoring import retrain_decision

    assert retrain_decision(["drift in ink"], True, "fp-1") == ("started", True)
    with mlflow.start_run() as run:
        mlflow.set_tags({"retrain_evidence": "fp-1", "retrain_started": "true"})
    decision, start = retrain_decision(["drift in ink"], True, "fp-1")
    assert not start and run.info.run_id in decision and "same evidence" in decision
    assert retrain_decision(["drift in ink"], True, "fp-2") == ("started", True)
    assert retrain_decision(["drift in ink"], False, "fp-2") == ("not started (retrain off)", False)
    assert retrain_decision([], True, "fp-2") == ("no: nothing calls for it", False)
