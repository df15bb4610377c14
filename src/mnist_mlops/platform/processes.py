"""Helper processes (Prefect, MLflow, BentoML servers): started in their own process group,
stopped as a group, and never outliving the process that started them.

Every helper runs under `mnist_mlops.platform.supervise`, a tiny process that leads the
helper's group and ends the whole group as soon as its parent is gone, whether the parent
exited, was interrupted, was sent SIGTERM or was SIGKILLed (Linux parent-death signal, plus
a parent-pid check as a fallback). No heavy imports here: starting a helper costs nothing.

The other way round, a flow run started by a `prefect worker` outlives a killed worker:
`ancestors` and `alive` let it notice (a sweep candidate then stops and says so), and
`detach_output` keeps it from dying on the dead worker's output pipe before it can.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.errors import UserError

LOOPBACK = "127.0.0.1"


@dataclass
class ServerProcess:
    """A helper server in its own process group; `stop()` ends the whole group."""

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
    """Whether a server could listen on `port` now: bound as servers bind (uvicorn, Prefect's,
    with SO_REUSEADDR), so the TIME_WAIT connections a server just stopped leaves behind do not
    count as in use; a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def supervised(cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """`cmd` wrapped so that it dies with `parent_pid` (default: this process)."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "mnist_mlops.platform.supervise", str(parent), "--", *cmd]


def start_group(cmd: list[str], log: Path, env: Mapping[str, str] | None = None,
                cwd: Path | None = None, die_with_parent: bool = True) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), output appended to `log`.

    With `die_with_parent` (the default) the group ends when this process ends, however it
    ends; `proc.pid` is then the supervisor's, which leads the group.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full = supervised(cmd) if die_with_parent else cmd
    with log.open("ab") as fh:
        return subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
    return _exists(os.killpg, pgid)


def _exists(send: Callable[[int, int], None], target: int) -> bool:
    """Signal 0 through `send` (os.kill, os.killpg): whether `target` exists (ours or not)."""
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120,
              ok: Callable[[int], bool] = lambda status: status < 500) -> None:
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


class _Stop:
    requested = False


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C or SIGTERM: interrupt whatever runs now (KeyboardInterrupt, also inside an asyncio
    loop, where asyncio's own first-Ctrl-C handler only cancels a task that may ignore it), and
    remember it, so an error that wraps the interrupt (pydantic turns one raised mid-import into
    its own serialization error) still ends as a stop, never as a traceback."""
    _Stop.requested = True
    raise KeyboardInterrupt


def handle_stop_signals() -> None:
    """SIGINT and SIGTERM take `on_stop_signal`'s path (even if started with SIGINT ignored)."""
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)


def stop_requested() -> bool:
    return _Stop.requested


def run_in_foreground(cmd: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run a server (`bentoml serve`, `mlflow ui`) with this terminal's output until it ends.

    It runs supervised in its own group, so it dies with this process even when this process
    is SIGKILLed; Ctrl-C or SIGTERM here stops the whole group cleanly. Returns the exit code
    (0 when stopped by Ctrl-C/SIGTERM).
    """
    proc = subprocess.Popen(supervised(cmd), cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(env) if env is not None else None)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        return 0
    finally:
        if proc.poll() is None:
            stop_group(proc)


# --------------------------------------------------------------------------- a worker's flow runs


def ancestors() -> list[int]:
    """The processes between this one and the `prefect worker` that started it, the worker
    last (from /proc); just the parent when no worker is found among the ancestors."""
    chain, pid = [], os.getppid()
    while pid > 1:
        chain.append(pid)
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"worker" in args and any(a.endswith(b"prefect") for a in args):
                return chain
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain[:1]


def detach_output() -> None:
    """The worker that read this process's output is gone: the next write to its pipe would
    end the flow run with "aborted by system exit" before it could say why. Output goes to
    /dev/null from here; Prefect still sends the run's logs and final state to its API."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def alive(pid: int) -> bool:
    return _exists(os.kill, pid)
