"""The champion gate on a real MLflow registry (sqlite): every path a version can take.

Models of known quality are made in seconds: a softmax regression fitted for a few
epochs (good), the same fitted less (worse), an untrained one (below the floor) and one
whose weights are NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_mlops import registry
from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.errors import UserError
from mnist_mlops.preprocess import to_uint8

from helpers import log_keras

# slow: it trains (small softmax models, seconds each) and logs and loads real MLflow models
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def digits():
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.training.data import load_sample

    d = load_sample()
    order = np.random.default_rng(0).permutation(len(d.labels))  # the sample is sorted by digit
    x, y = normalize(d.images)[order], d.labels[order].astype(np.int32)
    return x[:4000], y[:4000], x[4000:], y[4000:]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("gate-test")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def softmax_model(x, y, epochs: int, nan: bool = False):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    if epochs:
        model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    if nan:
        model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    return model


def register(model) -> str:
    import mlflow

    with mlflow.start_run():
        info = log_keras(model, registered_model_name=MODEL_NAME)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def models(digits):
    x, y, _, _ = digits
    return {"good": softmax_model(x, y, 4), "worse": softmax_model(x[:300], y[:300], 1),
            "untrained": softmax_model(x, y, 0), "nan": softmax_model(x, y, 0, nan=True)}


def tags(client, version: str) -> dict[str, str]:
    return client.get_model_version(MODEL_NAME, version).tags


def champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)


def test_first_better_worse_below_floor_nan(store, digits, models) -> None:
    _, _, xt, yt = digits
    worse = register(models["worse"])
    d = registry.gate(worse, xt, yt, min_accuracy=0.5)
    assert d.promoted and champion(store) == worse and "first model" in d.reason and d.slice is None

    good = register(models["good"])
    d = registry.gate(good, xt, yt, min_accuracy=0.5)
    assert d.promoted and champion(store) == good
    assert d.accuracy > d.champion_accuracy  # the old champion was re-scored on the same data
    assert tags(store, good)[registry.TAG_PREVIOUS] == worse

    again = register(models["worse"])
    d = registry.gate(again, xt, yt, min_accuracy=0.5)
    assert not d.promoted and champion(store) == good and d.slice == "test"  # the set that refused it
    assert tags(store, again)[registry.TAG_DECISION] == "rejected"
    assert "worse than champion" in tags(store, again)[registry.TAG_REASON]

    low = register(models["untrained"])
    d = registry.gate(low, xt, yt, min_accuracy=0.5)
    assert not d.promoted and champion(store) == good and "below the floor" in d.reason and d.slice == "test"

    nan = register(models["nan"])
    d = registry.gate(nan, xt, yt, min_accuracy=0.0)
    assert not d.promoted and champion(store) == good and "NaN" in d.reason

    # deciding twice changes nothing
    assert not registry.gate(again, xt, yt, min_accuracy=0.5).promoted and champion(store) == good


def test_champion_is_rescored_not_trusted(store, digits, models) -> None:
    """A champion whose recorded metric is inflated loses to a better model on real data."""
    _, _, xt, yt = digits
    old = register(models["worse"])
    registry.gate(old, xt, yt, 0.5)
    store.set_model_version_tag(MODEL_NAME, old, "test_accuracy", "0.9999")
    new = register(models["good"])
    assert registry.gate(new, xt, yt, 0.5).promoted


def test_first_model_below_floor_leaves_no_champion(store, digits, models) -> None:
    _, _, xt, yt = digits
    low = register(models["untrained"])
    assert not registry.gate(low, xt, yt, 0.5).promoted
    assert registry.champion_version() is None
    with pytest.raises(UserError, match="no champion yet"):
        registry.require_champion()


def test_manual_promote_force_and_rollback(store, digits, models) -> None:
    _, _, xt, yt = digits
    good = register(models["good"])
    registry.gate(good, xt, yt, 0.5)
    low = register(models["untrained"])
    with pytest.raises(UserError, match="below the floor.*--force"):
        registry.promote(low, xt, yt, 0.5)
    assert champion(store) == good
    worse = register(models["worse"])
    registry.promote(worse, xt, yt, 0.5)  # manual override of the "not worse" rule
    assert champion(store) == worse
    registry.promote(low, xt, yt, 0.5, force=True)
    assert champion(store) == low and "forced" in tags(store, low)[registry.TAG_REASON]

    assert registry.rollback().version == worse and champion(store) == worse
    assert registry.rollback().version == good and champion(store) == good
    with pytest.raises(UserError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(UserError, match="has no version 99"):
        registry.promote("99", xt, yt, 0.5)


def test_a_new_floor_regates_the_same_version_without_registering_again(store, digits, models) -> None:
    """`--set evaluate.min_accuracy=…` re-runs the gate on the registered version, never re-registers."""
    _, _, xt, yt = digits
    good = register(models["good"])
    assert registry.gate(good, xt, yt, 0.5).promoted
    # same floor: the decision stands; a higher floor than the champion scores keeps it (never demotes)
    assert registry.gate(good, xt, yt, 0.5).reason.startswith("decided earlier")
    high = registry.gate(good, xt, yt, 0.9999)
    assert not high.promoted and "stays champion" in high.reason and champion(store) == good
    # a version refused under an old floor is decided again when the floor drops
    worse = register(models["worse"])
    floor = registry.gate(worse, xt, yt, 0.99)
    assert not floor.promoted and "below the floor" in floor.reason
    again = registry.gate(worse, xt, yt, 0.1)
    assert not again.reason.startswith("decided earlier") and "worse than champion" in again.reason
    assert sorted(int(v.version) for v in store.search_model_versions(f"name='{MODEL_NAME}'")) == [1, 2]


def test_promote_holds_the_floor_without_a_prepared_split(store, digits, models, tmp_path, monkeypatch) -> None:
    """A fresh clone has no artifacts/: `mnist-mlops promote` rebuilds the test split from data/,
    or refuses with one line when there is no data either; only --force skips the floor."""
    from typer.testing import CliRunner

    from mnist_mlops.cli import app
    from mnist_mlops.config import Params, Paths, write_params
    from mnist_mlops.training.data import fetch

    from helpers import REPO

    good = register(models["good"])
    registry.gate(good, *digits[2:], 0.5)
    low = register(models["untrained"])
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_params(tmp_path, ["evaluate.min_accuracy=0.5"])
    monkeypatch.setenv("MNIST_MLOPS_ROOT", str(tmp_path))
    runner = CliRunner()

    refused = runner.invoke(app, ["promote", low])
    assert isinstance(refused.exception, UserError), refused.output
    assert "no test data" in str(refused.exception) or "holds no data" in str(refused.exception)
    assert champion(store) == good

    fetch(Params().data, Paths(tmp_path).data, tmp_path / "cache")  # data/ back, still no artifacts/
    assert not Paths(tmp_path).prepared.exists()
    below = runner.invoke(app, ["promote", low])
    assert isinstance(below.exception, UserError) and "below the floor" in str(below.exception)
    assert champion(store) == good and not Paths(tmp_path).prepared.exists()

    forced = runner.invoke(app, ["promote", low, "--force"])
    assert forced.exit_code == 0, forced.output
    assert champion(store) == low


def test_a_challenger_clearly_less_robust_is_refused(store, digits, models) -> None:
    """Two softmax regressions, one fitted on clean digits, one also on corrupted ones, differ on
    the real robustness slice by more than `evaluate.max_robust_drop`: the more robust is
    champion, the other, challenging on test digits both answer alike (clean accuracy not
    worse), is refused, and the reason says so. A tolerance wider than the drop lets it through."""
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.training import robustness

    x, y, xt, yt = digits
    seen, unseen = robustness.pick(y, 100, seed=1), robustness.pick(yt, 60, seed=2)
    xc, yc, _ = robustness.build(to_uint8(x[seen]), y[seen])
    xr, yr, _ = robustness.build(to_uint8(xt[unseen]), yt[unseen])
    slices = {"robust": (normalize(xr), yr)}
    also_corrupted = softmax_model(np.concatenate([x, normalize(xc)]), np.concatenate([y, yc.astype(np.int32)]), 4)
    pair = [models["good"], also_corrupted]
    robust_acc = [float((m.predict(slices["robust"][0], verbose=0).argmax(1) == yr).mean()) for m in pair]
    more, less = (pair[0], pair[1]) if robust_acc[0] > robust_acc[1] else (pair[1], pair[0])
    drop = abs(robust_acc[0] - robust_acc[1])
    assert drop > 0.02, f"the two models should differ clearly on the robustness slice (by {drop:.4f})"
    champ = register(more)
    assert registry.gate(champ, xt, yt, 0.5).promoted
    same = more.predict(xt, verbose=0).argmax(1) == less.predict(xt, verbose=0).argmax(1)
    test = (xt[same], yt[same])  # the same answers on these: the clean check passes

    refused = register(less)
    d = registry.gate(refused, *test, 0.5, slices, tolerances={"robust": 0.01})
    assert not d.promoted and champion(store) == champ
    assert "robust accuracy" in d.reason and "evaluate.max_robust_drop=0.01" in d.reason
    assert f"{drop:.4f} below champion v{champ}" in d.reason
    assert "test accuracy" not in d.reason  # refused for robustness alone
    assert tags(store, refused)[registry.TAG_DECISION] == "rejected"

    # Better on clean test digits (those it answers right and the champion wrong, too), the drop
    # on the robustness slice within a wider tolerance: promoted, the reason says "within".
    fixes = (less.predict(xt, verbose=0).argmax(1) == yt) & ~same
    assert fixes.any()
    better = (xt[same | fixes], yt[same | fixes])
    tolerated = register(less)
    d = registry.gate(tolerated, *better, 0.5, slices, tolerances={"robust": drop + 0.01})
    assert d.promoted and champion(store) == tolerated and "within" in d.reason


def test_a_tie_keeps_the_champion(store, digits, models) -> None:
    """The same model again (an unchanged retrain) ties the champion everywhere: it is refused,
    the champion keeps the alias, so no follower reloads a copy of what it serves."""
    _, _, xt, yt = digits
    champ = register(models["good"])
    assert registry.gate(champ, xt, yt, 0.5).promoted
    same = register(models["good"])
    d = registry.gate(same, xt, yt, 0.5)
    assert not d.promoted and champion(store) == champ
    assert f"ties champion v{champ}" in d.reason and "the champion stays" in d.reason
    assert tags(store, same)[registry.TAG_DECISION] == "rejected"


def test_a_trained_model_is_registered_once(store) -> None:
    """The promote step registers the model the evaluate stage logged: a second call for the same
    run and weights (evaluate re-ran after a code change) returns the same version."""
    import keras
    import mlflow

    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    with mlflow.start_run() as run:
        uri = log_keras(model).model_uri
    first = registry.register(run.info.run_id, uri, "md5-a", {"test_accuracy": "0.9"})
    assert registry.register(run.info.run_id, uri, "md5-a", {"test_accuracy": "0.9"}) == first
    assert len(store.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    assert tags(store, first)["test_accuracy"] == "0.9" and tags(store, first)[registry.TAG_WEIGHTS] == "md5-a"
    assert registry.register(run.info.run_id, uri, "md5-b", {}) != first  # other weights: a new version


def test_what_a_gate_that_changes_nothing_says(store, digits, models) -> None:
    """Issue 30 point 4: a decision reported again is not a promotion, a rolled-back version is
    not re-gated by a new floor (and says so), and `promote` of the champion changes nothing."""
    from pipelines.tasks import Promoted, gate_rows

    def promoted_row(d: registry.Decision) -> str:  # as the flow's promote task hands it to the summary
        return gate_rows(Promoted(model="m", version=d.version, run_id="r", promoted=d.promoted, reason=d.reason,
                                  changed=d.changed, earlier=d.earlier,
                                  champion=registry.champion_version()))["promoted"]

    _, _, xt, yt = digits
    worse = register(models["worse"])
    first = registry.gate(worse, xt, yt, 0.5)
    assert first.promoted and first.changed and not first.earlier
    assert promoted_row(first) == "yes"
    again = registry.gate(worse, xt, yt, 0.5)
    assert not again.changed and again.earlier and again.reason.startswith("decided earlier under "
                                                                            "evaluate.min_accuracy=0.5")
    assert promoted_row(again) == "no change (decided earlier: champion)"
    high = registry.gate(worse, xt, yt, 0.9999)  # a new floor re-gates the champion: it stays
    assert not high.changed and promoted_row(high).startswith("no change")

    same = registry.promote(worse, xt, yt, 0.5)
    assert (same.previous_champion, same.changed) == (None, False) and "already champion" in same.reason
    assert registry.TAG_PREVIOUS not in tags(store, worse) and "manual" not in tags(store, worse)[registry.TAG_REASON]

    good = register(models["good"])
    assert registry.gate(good, xt, yt, 0.5).changed
    registry.rollback()
    assert champion(store) == worse
    regated = registry.gate(good, xt, yt, 0.99)  # `run --set evaluate.min_accuracy=0.99` after a rollback
    assert not regated.promoted and not regated.changed and champion(store) == worse
    assert f"v{good} was rolled back to v{worse} by hand" in regated.reason and "not re-gated" in regated.reason
    assert promoted_row(regated) == "no change (decided earlier: rolled back)"


def test_a_challenger_clearly_worse_on_foreign_digits_is_refused(store, digits, models) -> None:
    """A softmax regression also fitted on the training families' printed and pen-drawn digits
    reads the foreign slice's (other families') clearly better than one fitted on MNIST alone:
    challenging it, the MNIST-only one is refused, naming evaluate.max_foreign_drop."""
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.training import foreign

    x, y, xt, yt = digits
    seen, unseen = foreign.build("train", 200), foreign.build("test", 100)
    slices = {"foreign": (normalize(unseen["x"]), unseen["y"].astype(np.int32))}
    also_foreign = softmax_model(np.concatenate([x, normalize(seen["x"])]),
                                 np.concatenate([y, seen["y"].astype(np.int32)]), 4)
    pair = [also_foreign, models["good"]]
    acc = [float((m.predict(slices["foreign"][0], verbose=0).argmax(1) == unseen["y"]).mean()) for m in pair]
    drop = acc[0] - acc[1]
    assert drop > 0.02, f"the model that saw other fonts should read these clearly better (by {drop:.4f})"
    champ = register(also_foreign)
    assert registry.gate(champ, xt, yt, 0.5).promoted
    same = also_foreign.predict(xt, verbose=0).argmax(1) == models["good"].predict(xt, verbose=0).argmax(1)

    refused = register(models["good"])
    d = registry.gate(refused, xt[same], yt[same], 0.5, slices, tolerances={"foreign": 0.01})
    assert not d.promoted and champion(store) == champ
    assert "foreign accuracy" in d.reason and "evaluate.max_foreign_drop=0.01" in d.reason
    assert "test accuracy" not in d.reason
