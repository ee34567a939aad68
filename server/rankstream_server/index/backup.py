"""`rankstream index backup DIR OUT`: a consistent copy of an index folder, live or not.

The store is copied with SQLite's online backup API (one read transaction: a server keeps
writing meanwhile), together with the saved vectors that belong with it (index/check.py's
`read_consistently`). The copy's vectors are then caught up to the copied store and saved at
its version, and the manifest is rewritten with the copy's checksums: the copy opens without
replaying anything and passes `rankstream index check`. It is made in OUT.partial-PID and
renamed to OUT only when complete.

The store is the source of truth: saved vectors that are damaged, unusable, or that kept
changing while they were read are left behind, and the copy builds them from its store when
it is first opened.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rankstream_server.index.check import CheckReport, check_index, read_consistently
from rankstream_server.index.local import DOCS, MANIFEST, VECTORS, _write_json, fsync_dir, save_vectors, sha256_of
from rankstream_server.index.store import DocStore


class BackupFailed(RuntimeError):
    """The copy could not be made; nothing was left at OUT."""


@dataclass
class BackupReport:
    check: CheckReport  # of the copy
    left_behind: str | None = None  # why the saved vectors were not copied, if they were not

    def summary(self) -> str:
        note = f" (saved vectors left behind: {self.left_behind}; the copy builds them at its first open)" if self.left_behind else ""
        return f"backed up to {self.check.folder}{note}; the copy is {self.check.verdict()}"


def backup_index(folder: str | Path, out: str | Path) -> BackupReport:
    """Copies `folder` to `out` (which must not exist)."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    if out.exists():
        raise BackupFailed(f"{out} exists: back up to a new folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        dimension = int(manifest["dimension"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BackupFailed(f"{folder} is not a readable index folder ({MANIFEST}: {error})") from None
    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        left_behind = _copy(folder, staging, manifest, dimension)
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BackupReport(check_index(out), left_behind)


def _copy(folder: Path, staging: Path, manifest: dict, dimension: int) -> str | None:
    """Makes the copy in `staging`; returns why the saved vectors were left behind, if they were."""
    try:
        source = DocStore(folder / DOCS, dimension, read_only=True)
        try:
            saved, _, left_behind = read_consistently(folder, lambda: source.backup_to(staging / DOCS))
        finally:
            source.close()
    except Exception as error:  # noqa: BLE001 - sqlite3 or file errors: no copy
        raise BackupFailed(f"{folder / DOCS} cannot be copied: {error}") from None
    vectors = None
    if saved is not None:
        try:
            vectors = saved.load(folder)
        except (ValueError, RuntimeError) as error:  # an IVF in the layout before the id fix, say
            left_behind = f"{VECTORS} unusable: {error}"
    copy = DocStore(staging / DOCS, dimension)
    try:
        version = copy.version
        if vectors is not None:
            changes = copy.changes(saved.version)
            vectors.remove(changes.removed_keys)
            vectors.add(changes.added_keys, changes.added_vectors)
            save_vectors(staging, *vectors.snapshot(), saved.state["type"], saved.state.get("params") or {}, changes.version)
            version = changes.version
        copy.forget_removed_through(version)  # the copy's vectors have every removal
        count = copy.count()
    finally:
        copy.close()
    checksums = {name: sha256_of(staging / name) for name in (DOCS, VECTORS) if (staging / name).exists()}
    _write_json(
        staging / MANIFEST,
        {**manifest, "count": count, "version": version, "checksums": checksums,
         "backup_of": str(folder), "backed_up": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    fsync_dir(staging)
    return left_behind
