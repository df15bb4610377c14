"""Faults injected into the real pipeline: the last good state survives every one of them.

Each test breaks something for real (SIGKILL of the training process, a mirror serving
garbage, a flipped byte in data/, a closed MLflow port, a full disk) and then checks that
the champion, the Bento, `data/` and the registry are as they were, and that the failure
was one clear line. The below-floor and NaN gate paths are covered on a real registry in
tests/test_gate.py; here a below-floor model goes through the whole flow.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME

from helpers import BIN, Project, copy_project, free_port, npz_bytes, stop_group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


# --------------------------------------------------------------------------- helpers


def tree_digest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def state(project: Project) -> dict:
    """What must survive a fault: data/, the pin, the registry, the champion, the Bentos."""
    client = project.mlflow_client()
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'"))
    try:
        champion = str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)
    except Exception:  # noqa: BLE001 - no champion yet
        champion = None
    bentos = project.root / ".bentoml" / "bentos"
    return {
        "data": tree_digest(project.root / "data"),
        "data.dvc": (project.root / "data.dvc").read_text(),
        "versions": versions,
        "champion": champion,
        "bentos": sorted(p.relative_to(bentos).as_posix() for p in bentos.glob("*/*") if p.is_dir()),
    }


def runs(project: Project) -> list:
    client = project.mlflow_client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"])


def leftovers(root: Path) -> list[str]:
    """Temp files an interrupted write would leave: .part downloads, .data-* dirs, .model-* files."""
    patterns = [".cache/*.part", ".data-*", "artifacts/model/.model-*"]
    return [str(p) for pattern in patterns for p in root.glob(pattern)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def flip_byte(path: Path, offset: int = -100) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- SIGKILL mid-training


@pytest.mark.timeout(900)
def test_sigkill_mid_training_keeps_champion_bento_and_data(trained_project: Project, prefect_server: str,
                                                            tmp_path: Path) -> None:
    import psutil

    copy = copy_project(trained_project, tmp_path / "copy", prefect_server)
    before = state(copy)
    assert before["champion"] == "1" and before["bentos"], before
    runs_before = {r.info.run_id for r in runs(copy)}

    proc = subprocess.Popen([str(BIN / "mnist-mlops"), "run", "--set", "train.epochs=2"], cwd=copy.root,
                            env=copy.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    first_epoch = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if re.search(r"epoch\s+1/2", line):
                first_epoch.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_epoch.wait(480), "".join(lines)[-4000:]
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "mnist_mlops.training.stages" in " ".join(p.cmdline()) and "train" in p.cmdline()]
        assert len(trainers) == 1, trainers
        trainers[0].send_signal(signal.SIGKILL)  # epoch 2 of 2 is under way
        assert proc.wait(300) == 2
    finally:
        if proc.poll() is None:
            stop_group(proc, 5)
        reader.join(10)
    out = "".join(lines)
    assert "stage 'train' failed" in out, out[-4000:]
    assert len(error_lines(out)) == 1, out[-4000:]

    after = state(copy)
    assert after == before  # champion, registry, Bentos, data/ and its pin: all as they were
    killed = [r for r in runs(copy) if r.info.run_id not in runs_before]
    assert len(killed) == 1 and killed[0].info.status == "RUNNING"  # what SIGKILL leaves in MLflow
    assert not copy.mlflow_client().search_model_versions(f"run_id='{killed[0].info.run_id}'")
    assert not leftovers(copy.root)

    # The next run completes: trains again, closes the dead run, registers and gates a version.
    # It runs with secrets in its environment, which must not reach MLflow or the log.
    secret_env = {"MNIST_MLOPS_API_KEY": "mmkey-" + secrets.token_hex(16),
                  "AWS_SECRET_ACCESS_KEY": "awssecret-" + secrets.token_hex(20)}
    done = Project(copy.root, {**copy.env, **secret_env}).cli("run", "--no-package")
    out = done.stdout + done.stderr
    assert "stage train ran" in out and "stage evaluate ran" in out, out[-4000:]
    assert f"MLflow run {killed[0].info.run_id} was left RUNNING" in out
    assert copy.mlflow_client().get_run(killed[0].info.run_id).info.status == "KILLED"
    final = state(copy)
    assert final["versions"] == [1, 2] and final["data"] == before["data"]
    assert final["bentos"] == before["bentos"]  # --no-package: the served Bento is untouched
    assert json.loads((copy.root / "artifacts" / "registered.json").read_text())["version"] == "2"

    client = copy.mlflow_client()
    version = client.get_model_version(MODEL_NAME, "2")
    run = client.get_run(version.run_id)
    recorded = [out, *run.data.params.values(), *run.data.tags.values(), *version.tags.values(),
                *[(copy.root / "artifacts" / n).read_text() for n in ("registered.json", "evaluated.json")]]
    for secret in secret_env.values():
        assert not [text for text in recorded if secret in text], f"{secret[:6]}… leaked"


# --------------------------------------------------------------------------- bad downloads, retried


class BadMirror:
    """A local mirror whose every answer is broken in a different way, counting requests."""

    def __init__(self, good: bytes) -> None:
        corrupt = bytearray(good)
        corrupt[len(corrupt) // 2] ^= 0xFF
        self.answers = [
            (200, b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>", None),
            (200, good[: len(good) // 3], len(good)),  # truncated: connection closes early
            (200, bytes(corrupt), None),  # right length, one byte flipped
        ]
        self.hits = 0
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                status, body, length = mirror.answers[min(mirror.hits, len(mirror.answers) - 1)]
                mirror.hits += 1
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mnist.npz"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(600)
def test_bad_downloads_are_retried_then_rejected_before_data_changes(project: Project) -> None:
    from mnist_mlops.training.data import load_sample

    project.cli("fetch")  # the good data/ the failed run must not replace
    before = state(project)
    assert before["data"]
    good = npz_bytes(load_sample())
    mirror = BadMirror(good)
    try:
        proc = project.cli("run", "--source", mirror.url, "--set", f"data.sha256={hashlib.sha256(good).hexdigest()}",
                           "--set", "data.retries=2", "--set", "data.retry_delay_seconds=0", check=False,
                           timeout=400)
    finally:
        mirror.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert mirror.hits == 3  # data.retries=2: one attempt + two retries, then it gives up
    assert "checksum mismatch" in out and re.search(r"truncated|RemoteProtocolError", out), out[-4000:]
    assert len(error_lines(out)) == 1 and "Traceback" not in out, out[-4000:]
    assert state(project) == before  # data/ exactly as it was
    assert not leftovers(project.root)
    assert not (project.root / "artifacts").exists() and not (project.root / "dvc.lock").exists()


# --------------------------------------------------------------------------- data/ edited by hand


def test_verify_detects_a_flipped_byte_in_data(project: Project) -> None:
    project.cli("fetch")
    ok = project.cli("verify")
    assert "matches data.dvc" in ok.stdout
    flip_byte(project.root / "data" / "images.npy")
    bad = project.cli("verify", check=False)
    assert bad.returncode == 2
    assert "data/ does not match data.dvc" in bad.stderr, bad.stderr
    flip_byte(project.root / "data" / "images.npy")
    assert project.cli("verify").returncode == 0


@pytest.mark.timeout(600)
def test_flow_reports_hand_edited_data_and_keeps_the_champion_over_a_below_floor_model(
        trained_project: Project, prefect_server: str, tmp_path: Path) -> None:
    """One flow run, two faults: a flipped byte in data/, and a new version below the floor."""
    copy = copy_project(trained_project, tmp_path / "copy", prefect_server)
    before = state(copy)
    flip_byte(copy.root / "data" / "labels.npy")  # one label changed by hand
    assert tree_digest(copy.root / "data") != before["data"]

    proc = copy.cli("run", "--set", "evaluate.min_accuracy=0.9999")
    out = proc.stdout + proc.stderr
    # reported, by name, in the log and in the summary; then restored from the source
    assert re.search(r"WARNING.*data/ does not match data\.dvc \(modified labels\.npy\)", out), out[-4000:]
    assert "data check" in out and "restored from the source" in out
    after = state(copy)
    assert after["data"] == before["data"] and after["data.dvc"] == before["data.dvc"]
    assert copy.cli("verify").returncode == 0
    assert "stage train skipped" in out  # restored data = pinned data: nothing to retrain
    # a new floor re-gates the registered version; it does not re-run evaluate or register again
    assert "stage evaluate skipped" in out, out[-4000:]
    assert after["versions"] == [1]
    assert after["champion"] == "1" and after["bentos"] == before["bentos"]
    assert re.search(r"promoted\s*│\s*no", out) or "not promoted" in out, out[-3000:]
    assert "below the floor" in out and "stays champion" in out, out[-3000:]
    version = copy.mlflow_client().get_model_version(MODEL_NAME, "1")
    assert version.tags.get("gate.min_accuracy") == "0.9999", version.tags


# --------------------------------------------------------------------------- MLflow unreachable


@pytest.mark.timeout(400)
def test_unreachable_mlflow_fails_fast_with_one_line_and_writes_nothing(project: Project) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = dict(project.env, MLFLOW_TRACKING_URI=uri)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        env.pop(key, None)  # the project's own defaults must bound MLflow's retries
    before = {p.relative_to(project.root).as_posix() for p in project.root.rglob("*")
              if ".prefect" not in p.parts and ".git" not in p.parts}
    params = (project.root / "params.yaml").read_text()
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "mnist-mlops"), "run"], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    errors = error_lines(proc.stderr)
    assert errors == [f"error: MLflow tracking server {uri} unreachable (connection refused): "
                      "start it or fix MLFLOW_TRACKING_URI"], out[-4000:]
    assert len(re.findall(r"Retry \d/2 will start", out)) == 2, out[-4000:]  # the flow retried the check
    assert "Traceback" not in out, out[-4000:]
    assert took < 240, took  # MLflow's own default would retry ~4 minutes per attempt
    after = {p.relative_to(project.root).as_posix() for p in project.root.rglob("*")
             if ".prefect" not in p.parts and ".git" not in p.parts}
    assert after - before <= {".mnist-mlops.lock", ".mnist-mlops.pid"}, sorted(after - before)
    assert not (project.root / "data").exists() and not (project.root / "dvc.lock").exists()
    assert (project.root / "params.yaml").read_text() == params


# --------------------------------------------------------------------------- disk full


def _mount_tmpfs(path: Path, size: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return proc.returncode == 0


# Where a tmpfs cannot be mounted (not root), the same failure is raised by Keras' save.
ENOSPC_SHIM = """
import errno, keras, runpy, sys
_save = keras.Model.save
def save(self, filepath, *a, **kw):
    _save(self, filepath, *a, **kw)
    with open(filepath, "r+b") as fh:
        fh.truncate(4096)
    raise OSError(errno.ENOSPC, "No space left on device", str(filepath))
keras.Model.save = save
sys.argv = ["mnist_mlops.training.stages", "train"]
runpy.run_module("mnist_mlops.training.stages", run_name="__main__")
"""


@pytest.mark.timeout(600)
def test_disk_full_while_saving_the_model_fails_cleanly(trained_project: Project, tmp_path: Path) -> None:
    copy = copy_project(trained_project, tmp_path / "copy")
    model_dir = copy.root / "artifacts" / "model"
    saved = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    before = state(copy)
    runs_before = {r.info.run_id for r in runs(copy)}
    # a disk with room for the current model and a little more, not for a second copy of it
    size = sum(len(b) for b in saved.values()) + 256 * 1024
    tmpfs = _mount_tmpfs(model_dir, size)
    try:
        if tmpfs:
            for name, raw in saved.items():
                (model_dir / name).write_bytes(raw)
            cmd = [sys.executable, "-m", "mnist_mlops.training.stages", "train"]
        else:
            cmd = [sys.executable, "-c", ENOSPC_SHIM]
        proc = subprocess.run(cmd, cwd=copy.root, env=copy.env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 2, proc.stderr[-4000:]
        expected = f"error: cannot save the model to {model_dir / 'model.keras'}: No space left on device"
        assert error_lines(proc.stderr) == [expected], proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
        assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == saved  # old model, no temp file
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", str(model_dir)], check=False)
    assert state(copy) == before
    new = [r for r in runs(copy) if r.info.run_id not in runs_before]
    assert len(new) == 1 and new[0].info.status == "FAILED"  # closed, not left RUNNING
    assert not copy.mlflow_client().search_model_versions(f"run_id='{new[0].info.run_id}'")
