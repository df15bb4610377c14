"""No anonymous writes beyond this machine (issue 24 point 1): a non-loopback bind needs the API key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mnist_mlops.errors import UserError
from mnist_mlops.serving.settings import API_KEY_ENV, exposure_warning

from helpers import BIN, TELEMETRY_OFF


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "digits.example.org"])
def test_serving_beyond_loopback_without_a_key_is_refused_in_one_line(host: str, tmp_path: Path) -> None:
    env = {**TELEMETRY_OFF, "PATH": str(BIN), "HOME": str(tmp_path)}  # no MNIST_MLOPS_API_KEY
    proc = subprocess.run([str(BIN / "mnist-mlops"), "serve", "--host", host, "--port", "3999"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"--host {host} serves beyond this machine" in line and API_KEY_ENV in line, line
    assert "--allow-anonymous-feedback" in line and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("bentoml*")) and proc.stdout == ""  # nothing built, nothing started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_key(host: str) -> None:
    assert exposure_warning(host, allow_anonymous=False, environ={}) is None


def test_a_key_or_an_explicit_choice_lets_it_serve_beyond_loopback() -> None:
    assert exposure_warning("0.0.0.0", allow_anonymous=False, environ={API_KEY_ENV: "k" * 32}) is None
    warning = exposure_warning("0.0.0.0", allow_anonymous=True, environ={})
    assert warning.startswith("warning: serving on 0.0.0.0 without") and "labels" in warning
    with pytest.raises(UserError, match="set MNIST_MLOPS_API_KEY"):
        exposure_warning("0.0.0.0", allow_anonymous=False, environ={API_KEY_ENV: ""})
