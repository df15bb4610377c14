"""A temporary Prefect API for one `mnist-mlops run`, started early so it boots in parallel.

Without PREFECT_API_URL, Prefect starts its own temporary server at the flow's first API
call: it imports the whole Prefect server package into the CLI process, then starts the
same server in a subprocess and waits for it, all after the CLI's own imports. Here the
subprocess starts first and boots on another core while the CLI imports Prefect and the
flow, and the CLI process never imports the server package (measured in
benchmarks/pipeline.py). The server is the one Prefect's temporary mode runs (same app,
same settings, database in $PREFECT_HOME), and is stopped at exit like Prefect's, after
Prefect has flushed its logs and events to it (Prefect's own exit hooks run first).

No Prefect import here, so starting it costs the CLI nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.errors import UserError

LOOPBACK = "127.0.0.1"
# Prefect's own temporary server: no UI, ephemeral-mode services (see prefect.server.api.server).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
STARTUP_TIMEOUT_S = 300  # a busy 2-core machine took 35 s; Prefect's own default gives up at ~20 s


@dataclass
class EarlyServer:
    proc: subprocess.Popen
    api_url: str
    log: Path
    started: float
    ready: bool = False


_server: EarlyServer | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
            return
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue


def start() -> EarlyServer | None:
    """Start the server now, without waiting; None when PREFECT_API_URL names a server."""
    global _server
    if os.environ.get("PREFECT_API_URL"):
        return None
    if _server is not None and _server.proc.poll() is None:
        return _server
    port = _free_port()
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    log = home / "mnist-mlops-run-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
           "--host", LOOPBACK, "--port", str(port), "--log-level", "error"]
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **SERVER_ENV}, start_new_session=True)
    atexit.register(_stop, proc)  # after Prefect's exit hooks have flushed to it
    _server = EarlyServer(proc, f"http://{LOOPBACK}:{port}/api", log, time.perf_counter())
    return _server


def wait_ready(server: EarlyServer) -> str:
    """Block until the server answers; returns its API URL (UserError if it never does)."""
    import httpx

    if server.ready:
        return server.api_url
    waited = time.perf_counter()
    while True:
        if server.proc.poll() is not None:
            raise UserError(f"the Prefect API server exited with code {server.proc.returncode}: "
                            f"see {server.log}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.perf_counter() - waited > STARTUP_TIMEOUT_S:
            raise UserError(f"the Prefect API server did not answer within {STARTUP_TIMEOUT_S} s: "
                            f"see {server.log}")
        time.sleep(0.5)
    server.ready = True
    now = time.perf_counter()
    logging.getLogger("prefect.mnist_mlops").info(
        "Prefect API on %s (temporary server, up %.1f s after start; waited %.1f s for it)",
        server.api_url, now - server.started, now - waited)
    return server.api_url


@contextmanager
def api(server: EarlyServer | None) -> Iterator[None]:
    """Point Prefect at `server` (waiting for it) for the block; a no-op for None."""
    if server is None:
        yield
        return
    url = wait_ready(server)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
