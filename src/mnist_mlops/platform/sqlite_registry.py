"""Registry reads straight from the project's sqlite MLflow store, without importing MLflow.

`mnist-mlops serve` must know which champion's Bento to start before anything else can
happen, and asking MLflow for it costs ~4.5 s of the start: importing MLflow (1.7 s), opening
its SQLAlchemy store (1 s), in a child process so that the parent never holds them. On a
sqlite store the same answer is one indexed read. It reads MLflow's own tables, so it
answers only when it is sure and says None otherwise (any other store, a named workspace,
a table or column not there, a locked file): the caller then asks MLflow, as before.
tests/test_library_contracts.py checks it against `MlflowClient` on a real store and fails,
naming this module, the day MLflow's schema moves.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

DEFAULT_WORKSPACE = "default"  # mlflow.utils.workspace_utils.DEFAULT_WORKSPACE_NAME
DELETED_STAGE = "Deleted_Internal"  # a deleted version's row stays, with this stage
_VERSION = ("SELECT v.version, v.run_id FROM model_versions v WHERE v.name = ? AND v.status = 'READY' "
            "AND v.current_stage != ? {scope}")


def store_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI (None for any other store, or one with options)."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _scope(db: sqlite3.Connection, table: str, alias: str) -> str:
    """MLflow 3.x keeps every row in a workspace: ours are in the default one."""
    columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    return f"AND {alias}.workspace = '{DEFAULT_WORKSPACE}'" if "workspace" in columns else ""


def _read(uri: str, query: str, args: tuple) -> tuple[str, str] | None:
    """The (version, run id) row of a read-only query on the store at `uri`; None if there is
    none, or no answer."""
    path = store_path(uri)
    if path is None or not path.is_file() or os.environ.get("MLFLOW_WORKSPACE"):
        return None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            scoped = query.format(scope=_scope(db, "model_versions", "v"),
                                  alias_scope=_scope(db, "registered_model_aliases", "a"))
            row = db.execute(scoped, args).fetchone()
    except sqlite3.Error:
        return None
    return (str(row[0]), str(row[1])) if row else None


def version_run(uri: str, model: str, version: str) -> tuple[str, str] | None:
    """(version, run id) of a registered version, or None (not there, or not readable here)."""
    return _read(uri, _VERSION + " AND v.version = ?", (model, DELETED_STAGE, version))


def alias_run(uri: str, model: str, alias: str) -> tuple[str, str] | None:
    """(version, run id) the alias names, or None (no such alias, or not readable here)."""
    query = (_VERSION + " AND v.version = (SELECT a.version FROM registered_model_aliases a "
             "WHERE a.name = ? AND a.alias = ? {alias_scope})")
    return _read(uri, query, (model, DELETED_STAGE, model, alias))
