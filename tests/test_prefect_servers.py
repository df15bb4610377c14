"""The Prefect servers the project starts: none outlives its command however the command
ends, every one serves a working UI on its own port, and manual runs stay findable by name."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mnist_mlops.platform.processes import free_port, start_group, stop_group

from helpers import BIN, Project, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the output:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)


def family(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:200])
        except psutil.Error:
            pass
    return out


def kill_run_mid_flow(project: Project, sig: int, log: Path) -> list[str]:
    """Start `mnist-mlops run`, send `sig` once its flow run has begun; what is left 10 s later."""
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "mnist-mlops"), "run", "--no-package"], cwd=project.root,
                                env=project.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_text(log, "Beginning flow run", proc)
        helpers = family(proc.pid)
        assert any("prefect" in " ".join(p.cmdline()) and "server" in p.cmdline() for p in helpers), \
            [p.cmdline() for p in helpers]
        os.kill(proc.pid, sig)
        proc.wait(60)
        deadline = time.monotonic() + 10
        while alive(helpers) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive(helpers)
    finally:
        if proc.poll() is None:
            stop_group(proc)


def flow_runs(api: str) -> list[dict]:
    resp = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 50}, timeout=30)
    resp.raise_for_status()
    return resp.json()


def test_killed_runs_leave_nothing_and_runs_stay_findable(trained_project: Project, tmp_path: Path,
                                                          browser) -> None:
    copy = copy_project(trained_project, tmp_path / "copy")

    left = kill_run_mid_flow(copy, signal.SIGTERM, tmp_path / "term.log")
    assert left == [], f"left behind after SIGTERM: {left}"
    term_out = (tmp_path / "term.log").read_text(errors="replace")
    assert "Traceback" not in term_out, term_out[-3000:]
    # the pipeline lock was released: the next run below gets as far as its flow run

    left = kill_run_mid_flow(copy, signal.SIGKILL, tmp_path / "kill.log")
    assert left == [], f"left behind after SIGKILL: {left}"

    done = copy.cli("run", "--no-package")  # the next run starts and completes
    assert "Prefect UI" in done.stdout and "mnist-mlops prefect-ui" in done.stdout, done.stdout
    assert "127.0.0.1:4200/runs/flow-run/" in done.stdout

    # The project's Prefect database, served by `mnist-mlops prefect-ui` on a free port.
    port = free_port()
    log = tmp_path / "prefect-ui.log"
    ui = start_group([str(BIN / "mnist-mlops"), "prefect-ui", "--port", str(port)], log, copy.env, cwd=copy.root)
    try:
        wait_for_text(log, "Prefect UI", ui, timeout=240)
        api = f"http://127.0.0.1:{port}/api"
        runs = flow_runs(api)
        names = [r["name"] for r in runs]
        manual = [r for r in runs if r["name"].startswith("manual · data ")]
        assert len([r for r in manual if r["state_type"] == "COMPLETED"]) >= 2, names  # the session's + ours
        assert any(r["state_type"] in {"CRASHED", "CANCELLED", "FAILED"} for r in manual), \
            [(r["name"], r["state_type"]) for r in runs]  # the SIGTERMed run says so

        browser.get(f"http://127.0.0.1:{port}/runs")
        deadline = time.monotonic() + 60
        while "manual · data" not in browser.find_element("tag name", "body").text:
            assert time.monotonic() < deadline, browser.find_element("tag name", "body").text[:2000]
            time.sleep(1)
        body = browser.find_element("tag name", "body").text
        assert "Something went wrong" not in body and "Oops" not in body
        browser.save_screenshot(str(tmp_path / "prefect-runs.png"))
    finally:
        stop_group(ui)


def test_a_port_a_stopped_server_just_left_counts_as_free() -> None:
    """Right after `schedule` stopped, `prefect-ui` said port 4200 was in use while nothing
    listened: the stopped server's connections linger in TIME_WAIT. The check binds as the
    server will (SO_REUSEADDR, like uvicorn): free then, still busy while something listens."""
    import socket

    from mnist_mlops.platform.processes import LOOPBACK, port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection((LOOPBACK, port))
    conn, _ = server.accept()
    conn.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
    server.close()
    client.close()
    assert port_free(port), "a port in TIME_WAIT only is free for a server that binds with SO_REUSEADDR"
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind((LOOPBACK, port))
    busy.listen()
    try:
        assert not port_free(port)
    finally:
        busy.close()
