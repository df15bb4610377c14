"""The Prefect servers the project starts: one way to start one, for every command.

- `mnist-mlops run` / `sweep` start a server early (`start`), so it boots on another core
  while the CLI imports Prefect and the flow, and point Prefect at it (`api`). Without it,
  Prefect would import its whole server package into the CLI and start its own temporary
  server only at the flow's first API call (measured in benchmarks/pipeline.py).
- `mnist-mlops schedule` and `prefect-ui` use `prefect_api`: `$PREFECT_API_URL` when it
  names a server, else a local server on the given port, stopped on the way out.

Every server is `prefect server start` on 127.0.0.1 (public CLI and settings only), with
its database in `$PREFECT_HOME` (so runs stay findable after the command ends), its UI
told where its own API is (`PREFECT_UI_API_URL`: the UI works on any port), and it runs
under the supervisor of `processes`, so it ends with the command however that ends.
No Prefect import here: starting a server costs the CLI nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mnist_mlops.errors import UserError
from mnist_mlops.platform.processes import (
    LOOPBACK,
    ServerProcess,
    executable,
    free_port,
    port_free,
    start_group,
    wait_http,
)

STARTUP_TIMEOUT_S = 300  # a busy 2-core machine took 35 s; Prefect's own default gives up at ~20 s
DEFAULT_UI_PORT = 4200
MIGRATION_RACE = "alembic"  # in the log of a server that lost a race to migrate a fresh database
RELAUNCHES = 3


@dataclass
class PrefectServer(ServerProcess):
    started: float = field(default_factory=time.perf_counter)
    ready: bool = False
    one_run: bool = False

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


_early: PrefectServer | None = None


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def launch(port: int, *, one_run: bool = False) -> PrefectServer:
    """Start `prefect server start` on 127.0.0.1:PORT without waiting for it.

    `one_run`: the server of a single `mnist-mlops run`: no scheduler, and no UI (nobody
    browses it; its runs are shown later by `mnist-mlops prefect-ui`), so it starts sooner.
    """
    if not port_free(port):
        raise UserError(
            f"port {port} on {LOOPBACK} is in use: if a Prefect server runs there, "
            f"`export PREFECT_API_URL=http://{LOOPBACK}:{port}/api`; otherwise pick another --port"
        )
    home = prefect_home()
    url = f"http://{LOOPBACK}:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    cmd = [executable("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    if one_run:
        cmd += ["--no-scheduler", "--no-late-runs", "--no-ui"]
    log = home / f"mnist-mlops-server-{port}.log"
    proc = start_group(cmd, log, env)
    return PrefectServer("prefect", proc, url, log, one_run=one_run)


def _lost_migration_race(server: PrefectServer) -> bool:
    """Two servers started at once on a fresh database both migrate it; one of them fails
    (alembic: "expected to match one row ... 0 found") and exits. Started again, it finds
    the database migrated."""
    return not server.alive() and MIGRATION_RACE in server.log_tail(6000)


def _relaunch(server: PrefectServer) -> None:
    """Start `server` again on its port, in place (the caller holds this object)."""
    time.sleep(2)  # let the winner finish migrating
    again = launch(int(server.url.rsplit(":", 1)[1]), one_run=server.one_run)
    server.proc, server.log = again.proc, again.log


def wait_ready(server: PrefectServer, timeout: float = STARTUP_TIMEOUT_S) -> str:
    """Block until the server answers; returns its API URL (UserError, server stopped, if never)."""
    if server.ready:
        return server.api_url
    waited = time.perf_counter()
    try:
        for attempt in range(RELAUNCHES + 1):
            try:
                wait_http(f"{server.api_url}/health", server.proc, timeout, ok=lambda status: status == 200)
                break
            except UserError:
                if attempt == RELAUNCHES or not _lost_migration_race(server):
                    raise
                _relaunch(server)
    except (UserError, KeyboardInterrupt) as exc:
        tail = server.log_tail(1500)
        server.stop()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UserError(f"the Prefect server did not start ({exc}): see {server.log}\n{tail}") from None
    server.ready = True
    now = time.perf_counter()
    logging.getLogger("prefect.mnist_mlops").info(
        "Prefect API on %s (up %.1f s after start; waited %.1f s for it)",
        server.api_url, now - server.started, now - waited)
    return server.api_url


def start() -> PrefectServer | None:
    """For one run: start a server now, without waiting; None when PREFECT_API_URL names one.

    Stopped when this process exits (atexit, after Prefect's own exit hooks have flushed
    logs and events to it) or, if it is killed, by its supervisor.
    """
    import atexit

    global _early
    if os.environ.get("PREFECT_API_URL"):
        return None
    if _early is not None and _early.alive():
        return _early
    _early = launch(free_port(), one_run=True)
    atexit.register(_early.stop)
    return _early


@contextmanager
def api(server: PrefectServer | None) -> Iterator[None]:
    """Point Prefect at `server` (waiting for it) for the block; a no-op for None.

    No UI URL: this one-run server serves no UI, and nothing listens on `mnist-mlops
    prefect-ui`'s port during the run, so Prefect's own "View at …" line would be a dead link.
    The run's summary gives the link that works (to open after `mnist-mlops prefect-ui`).
    """
    if server is None:
        yield
        return
    url = wait_ready(server)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""}):
        yield


@contextmanager
def prefect_api(port: int = DEFAULT_UI_PORT) -> Iterator[tuple[str, PrefectServer | None]]:
    """The Prefect API to use: $PREFECT_API_URL, else a local server started (and stopped) here."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url.rstrip("/"), None
        return
    server = launch(port)
    try:
        yield wait_ready(server), server
    finally:
        server.stop()


# A process worker tells each flow run its name through this variable. Prefect has no public
# API for it; tests/test_library_contracts.py fails when Prefect renames it.
WORKER_NAME_ENV = "PREFECT__WORKER_NAME"


def worker_name(default: str = "local") -> str:
    """The name of the Prefect worker running this flow run (`default` outside a worker)."""
    return os.environ.get(WORKER_NAME_ENV, default)
