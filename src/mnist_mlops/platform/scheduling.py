"""Local servers for scheduled runs: start a `prefect server` on loopback, stop it cleanly.

No Prefect imports here: the server is a child process (its own session, so a terminal's
Ctrl-C reaches the command, which then stops the server after the runner has paused its
schedule). The same helpers start and stop any server process (MLflow, moto) in tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.errors import UserError

LOOPBACK = "127.0.0.1"


@dataclass
class ServerProcess:
    """A server started in its own process group; `stop()` ends the whole group."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        stop_group(self.proc, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def executable(name: str) -> str:
    """A console script of this environment (beside sys.executable), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise UserError(f"'{name}' not found: install the project's environment (make install)")
    return found


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_group(cmd: list[str], log: Path, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd,
                                start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children of the group may linger a moment
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120,
              ok=lambda status: status < 500) -> None:
    """Poll `url` until it answers (and `proc`, if given, is still running)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"server process exited with code {proc.returncode} before {url} answered")
        try:
            resp = httpx.get(url, timeout=5)
            if ok(resp.status_code):
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise UserError(f"{url} did not answer within {timeout:.0f}s ({last})")


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def start_prefect_server(port: int = 4200, timeout: float = 180) -> ServerProcess:
    """`prefect server start` on 127.0.0.1:PORT (database in $PREFECT_HOME), healthy or an error."""
    if not port_free(port):
        raise UserError(
            f"port {port} on {LOOPBACK} is in use: if a Prefect server runs there, "
            f"`export PREFECT_API_URL=http://{LOOPBACK}:{port}/api`; otherwise pick another --port"
        )
    home = prefect_home()
    log = home / "mnist-mlops-server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [executable("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    proc = start_group(cmd, log, env)
    server = ServerProcess("prefect", proc, f"http://{LOOPBACK}:{port}", log)
    try:
        wait_http(f"{server.url}/api/health", proc, timeout, ok=lambda status: status == 200)
    except (UserError, KeyboardInterrupt) as exc:
        tail = server.log_tail(1500)
        server.stop()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UserError(f"Prefect server did not start: {exc}\n{tail}") from None
    return server


@contextmanager
def prefect_api(port: int = 4200) -> Iterator[tuple[str, ServerProcess | None]]:
    """The Prefect API to use: $PREFECT_API_URL, else a local server started (and stopped) here."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url.rstrip("/"), None
        return
    server = start_prefect_server(port)
    try:
        yield f"{server.url}/api", server
    finally:
        server.stop()
