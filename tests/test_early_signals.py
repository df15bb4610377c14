"""Issue 30 point 2: Ctrl-C or SIGTERM at any moment stops a command, the early moments too.

Each long-running command is started as a terminal starts it (its own process group) and sent
the signal while it is still starting: importing its libraries (0.3 s), starting its server
or flow (2.5 s). It must stop within seconds: exit 0 or 130, no traceback, and no process of it
left behind. (The schedule's early Ctrl-C is tested in test_schedule.py.)
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from mnist_mlops.platform.processes import free_port, start_group

from helpers import BIN, Project, copy_project, left_behind, wait_stopped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMMANDS = {
    "run": ["run", "--no-package"],
    "serve": ["serve", "--port", "{port}"],
    "ui": ["ui", "--port", "{port}"],
    "prefect-ui": ["prefect-ui", "--port", "{port}"],
}
MOMENTS = [(0.3, signal.SIGINT), (2.5, signal.SIGINT), (1.0, signal.SIGTERM)]
STOP_WITHIN = 30  # seconds from the signal to the command's exit


@pytest.fixture(scope="module")
def project(trained_project: Project, prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the trained project (a champion to serve, stores for the UIs) on the shared Prefect server."""
    return copy_project(trained_project, tmp_path_factory.mktemp("early") / "project", prefect_server)


@pytest.mark.parametrize(("delay", "signum"), MOMENTS, ids=lambda v: getattr(v, "name", f"{v}s"))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_signal_while_starting_stops_the_command(project: Project, tmp_path: Path, command: str,
                                                   delay: float, signum: signal.Signals) -> None:
    marker = uuid.uuid4().hex
    args = [a.format(port=free_port()) for a in COMMANDS[command]]
    log = tmp_path / f"{command}.log"
    env = {**project.env, "MNIST_MLOPS_TEST_MARKER": marker}
    if command == "prefect-ui":
        env.pop("PREFECT_API_URL")  # it serves the project's own Prefect database
    proc = start_group([str(BIN / "mnist-mlops"), *args], log, env, cwd=project.root, die_with_parent=False)
    try:
        time.sleep(delay)
        assert proc.poll() is None, f"{command} ended before the signal:\n{log.read_text(errors='replace')}"
        signalled = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            proc.send_signal(signum)  # `kill PID`, a timeout: the command alone passes it on
        wait_stopped(proc, log, STOP_WITHIN, f"{command}: {signum.name} {delay} s after the start")
        took = time.monotonic() - signalled
    finally:
        left = left_behind(proc, marker)
    output = log.read_text(errors="replace")
    assert proc.returncode in (0, 130), (command, proc.returncode, took, output[-3000:])
    assert "Traceback" not in output, (command, output[-3000:])
    assert left == [], f"{command}: processes left behind: {left}"

