"""DVC: pin `data/` in data.dvc, push it when a remote is set, reproduce stages."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from mnist_mlops.errors import UserError


@dataclass(frozen=True)
class VersionResult:
    md5: str
    changed: bool
    pushed: bool


def dvc_md5(data_dvc: Path) -> str | None:
    """The md5 that `data.dvc` pins for `data/` (what MLflow runs are tagged with)."""
    try:
        meta = yaml.safe_load(data_dvc.read_text())
        return str(meta["outs"][0]["md5"])
    except (FileNotFoundError, KeyError, IndexError, TypeError):
        return None


@contextmanager
def dvc_repo(root: Path):
    """A DVC repo whose stage commands use this interpreter (they run `python -m ...`)."""
    from dvc.repo import Repo

    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # DVC's "git add dvc.lock" hints repeat once per stage; the flow reports each step itself.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    try:
        repo = Repo(str(root))
    except Exception as exc:  # noqa: BLE001 - dvc raises many kinds for "not a repo"
        raise UserError(f"{root} is not a DVC project ({exc}): run `git init && dvc init`") from None
    try:
        yield repo
    finally:
        repo.close()


def remote_url(root: Path) -> str | None:
    """The URL of the default DVC remote, if the project has one."""
    try:
        with dvc_repo(root) as repo:
            name = repo.config["core"].get("remote")
            return str(repo.config["remote"][name]["url"]) if name else None
    except (UserError, KeyError):
        return None


def has_remote(repo) -> bool:
    return bool(repo.config.get("remote"))


def version_data(root: Path, data_dir: Path, data_dvc: Path) -> VersionResult:
    """`dvc add data` (a no-op hash check when unchanged), then `dvc push` if a remote exists."""
    before = dvc_md5(data_dvc)
    with dvc_repo(root) as repo:
        repo.add(str(data_dir.relative_to(root)))
        md5 = dvc_md5(data_dvc) or "unknown"
        pushed = False
        if has_remote(repo):
            repo.push(targets=[str(data_dvc.relative_to(root))])
            pushed = True
    return VersionResult(md5=md5, changed=md5 != before, pushed=pushed)


def data_matches_pin(root: Path, data_dvc: Path) -> bool:
    """True when `data/` on disk is what data.dvc pins (a hand-edited byte shows up here).

    Only the workspace is compared with the pin: data absent from the DVC cache (a fresh
    clone) is not a mismatch, unlike in `dvc status`.
    """
    with dvc_repo(root) as repo:
        stages = repo.stage.collect(str(data_dvc.resolve()))
        return not any(out.workspace_status() for stage in stages for out in stage.outs)


def data_drift(root: Path, data_dir: Path, data_dvc: Path) -> str | None:
    """How `data/` differs from what data.dvc pins (e.g. a hand-edited byte), else None.

    None also when there is nothing to compare yet: no data.dvc pin, or no data/ fetched.
    """
    import hashlib
    import json

    pinned = dvc_md5(data_dvc)
    if pinned is None or not data_dir.is_dir() or data_matches_pin(root, data_dvc):
        return None
    # Name the files: the pin's per-file md5s are in DVC's .dir manifest when it is cached.
    try:
        with dvc_repo(root) as repo:
            manifest = Path(repo.cache.local.oid_to_path(pinned))
        entries = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
    except Exception:  # noqa: BLE001 - no cache (fresh clone): report without file names
        return f"{data_dir.name}/ does not match {data_dvc.name} (content differs from the pinned md5 {pinned})"
    on_disk = {p.relative_to(data_dir).as_posix(): p for p in data_dir.rglob("*") if p.is_file()}
    changed = sorted(name for name, md5 in entries.items()
                     if name in on_disk and hashlib.md5(on_disk[name].read_bytes()).hexdigest() != md5)
    missing = sorted(set(entries) - set(on_disk))
    extra = sorted(set(on_disk) - set(entries))
    parts = [f"{label} {', '.join(names)}" for label, names in
             (("modified", changed), ("missing", missing), ("unexpected", extra)) if names]
    detail = "; ".join(parts) or "contents differ"
    return f"{data_dir.name}/ does not match {data_dvc.name} ({detail})"


def reproduce(root: Path, stage: str) -> bool:
    """`dvc repro -s STAGE`; returns True if the stage ran, False if DVC skipped it."""
    with dvc_repo(root) as repo:
        try:
            ran = repo.reproduce(stage, single_item=True)
        except Exception as exc:  # noqa: BLE001 - surface DVC's own one-line reason
            raise UserError(f"stage '{stage}' failed: {str(exc).splitlines()[0]}") from None
    return bool(ran)
