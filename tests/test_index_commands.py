"""Operator commands: `rankstream index check DIR` tells a sound folder from a damaged one in
one line, and `rankstream index backup DIR OUT` copies a live index consistently, even while
writes and saves go on."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from rankstream_server.index.backup import BackupFailed, backup_index
from rankstream_server.index.check import check_index
from rankstream_server.index.store import DocStore

from index_helpers import DIMENSION, documents, fill, open_index, unit_vectors, vector_of


def _cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("rankstream")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


def _index_with_history(folder: Path, kind: str = "flat"):
    """Upserts, a replacement and deletes, saved; then more changes, not saved yet."""
    index = open_index(folder, type=kind)
    fill(index, 60)
    index.close()
    index = open_index(folder, type=kind)  # an IVF is trained at this open
    index.delete(["d1", "d2"])
    index.upsert(documents(["d3"]), unit_vectors(1, 300))
    index.save()
    index.delete(["d4"])
    index.upsert(documents(["late"]), unit_vectors(1, 301))
    return index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_check_finds_a_live_index_healthy(tmp_path, kind):
    index = _index_with_history(tmp_path / "idx", kind)
    report = check_index(tmp_path / "idx")  # while it is open, with changes not saved yet
    assert report.healthy, report.verdict()
    assert report.verdict().startswith(f"healthy: {tmp_path / 'idx'}: 58 passages at version 5; {kind} vectors saved at version 3")
    assert {"manifest", "SQLite integrity", "vectors.faiss checksum", "store and vectors agree"} <= set(report.verified)
    index.close()
    assert check_index(tmp_path / "idx").healthy


def test_check_verifies_the_store_checksum_while_the_manifest_still_applies(tmp_path):
    index = open_index(tmp_path / "idx")
    index.close()  # created empty: the manifest's checksum of docs.sqlite holds
    report = check_index(tmp_path / "idx")
    assert report.healthy and "docs.sqlite checksum" in report.verified, report.verdict()
    db = sqlite3.connect(tmp_path / "idx" / "docs.sqlite")
    db.execute("INSERT INTO removed_keys VALUES (99, 0)")  # a change that moves no version
    db.commit()
    db.close()
    report = check_index(tmp_path / "idx")
    assert not report.healthy and "docs.sqlite does not match the checksum in manifest.json" in report.verdict()


def test_check_finds_each_kind_of_damage(tmp_path):
    folder = tmp_path / "idx"
    _index_with_history(folder).close()
    vectors_file = folder / "vectors.faiss"
    sound = vectors_file.read_bytes()

    vectors_file.write_bytes(sound[:-40] + b"\0" * 40)
    assert "vectors.faiss does not match the checksum in vectors.json" in check_index(folder).verdict()
    vectors_file.write_bytes(sound)

    # Vectors that lack a row, saved under the store's version: what defect 4 left behind.
    store = DocStore(folder / "docs.sqlite", DIMENSION)
    store.upsert(documents(["unsaved"]), unit_vectors(1, 5))
    store.close()
    state = json.loads((folder / "vectors.json").read_text())
    (folder / "vectors.json").write_text(json.dumps({**state, "version": state["version"] + 1}))
    verdict = check_index(folder).verdict()
    assert verdict.startswith("DAMAGED") and "1 passages of the store are missing from the vectors" in verdict
    (folder / "vectors.json").write_text(json.dumps(state))

    # Keys on their neighbours' vectors: what defect 1 left behind.
    index = faiss.read_index(str(vectors_file))
    ids = faiss.vector_to_array(index.id_map)
    faiss.copy_array_to_vector(np.roll(ids, 1), index.id_map)
    shifted = faiss.serialize_index(index)
    vectors_file.write_bytes(shifted.tobytes())
    (folder / "vectors.json").write_text(json.dumps({**state, "sha256": hashlib.sha256(shifted).hexdigest()}))
    verdict = check_index(folder).verdict()
    assert "keys hold another passage's vector" in verdict, verdict


def test_check_reports_a_corrupted_store_and_a_missing_manifest(tmp_path):
    folder = tmp_path / "idx"
    _index_with_history(folder).close()
    docs = folder / "docs.sqlite"
    data = bytearray(docs.read_bytes())
    page = 4096
    data[2 * page + 8 : 3 * page] = os.urandom(page - 8)  # scribble over a b-tree page
    docs.write_bytes(bytes(data))
    verdict = check_index(folder).verdict()
    assert verdict.startswith(f"DAMAGED: {folder}:") and "docs.sqlite" in verdict, verdict
    (folder / "manifest.json").unlink()
    assert check_index(folder).verdict() == f"DAMAGED: {folder}: no manifest.json: not an index folder"


def test_the_check_command_prints_one_line_and_exits_by_health(tmp_path):
    _index_with_history(tmp_path / "idx").close()
    done = _cli("index", "check", str(tmp_path / "idx"))
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and done.stdout.startswith("healthy: "), done
    (tmp_path / "idx" / "vectors.faiss").write_bytes(b"nonsense")
    done = _cli("index", "check", str(tmp_path / "idx"))
    assert done.returncode == 1 and done.stdout.startswith("DAMAGED: ") and done.stdout.count("\n") == 1, done


def _contents(folder: Path) -> dict[str, tuple]:
    store = DocStore(folder / "docs.sqlite", DIMENSION, read_only=True)
    try:
        return {d.id: (d.text, d.metadata) for d in store.iter_documents()}
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_backup_of_a_live_index_under_writes_opens_and_passes_check(tmp_path, kind):
    index = _index_with_history(tmp_path / "idx", kind)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_and_save() -> None:
        n = 0
        try:
            while not stop.is_set():
                index.upsert(documents([f"w{n}"]), unit_vectors(1, 1000 + n))
                if n % 3 == 0:
                    index.delete([f"w{n - 1}"])
                if n % 5 == 0:
                    index.save()
                n += 1
        except BaseException as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    writer = threading.Thread(target=write_and_save)
    writer.start()
    try:
        report = backup_index(tmp_path / "idx", tmp_path / "copy")
    finally:
        stop.set()
        writer.join()
    assert not errors
    assert report.left_behind is None and report.check.healthy, report.summary()
    assert "docs.sqlite checksum" in report.check.verified
    copied = _contents(tmp_path / "copy")
    assert {"d0", "late", "d3"} <= set(copied) and not {"d1", "d2", "d4"} & set(copied)
    index.close()
    reopened = open_index(tmp_path / "copy", type=kind)
    assert reopened.count == len(copied)
    assert reopened.search(vector_of(301), 1)[0].document.id == "late"
    reopened.close()
    assert check_index(tmp_path / "copy").healthy  # opening it replayed and rewrote nothing


def test_a_backup_started_over_when_a_save_lands_during_the_copy(tmp_path, monkeypatch):
    index = _index_with_history(tmp_path / "idx")
    original = DocStore.backup_to
    calls = []

    def copy_while_a_save_lands(store, path):
        calls.append(path)
        if len(calls) == 1:  # the vectors were read; now a save replaces them and drops old removals
            index.delete(["d5"])
            index.save()
        return original(store, path)

    monkeypatch.setattr(DocStore, "backup_to", copy_while_a_save_lands)
    report = backup_index(tmp_path / "idx", tmp_path / "copy")
    assert len(calls) == 2 and report.check.healthy and report.left_behind is None, report.summary()
    assert "d5" not in _contents(tmp_path / "copy")
    index.close()


def test_the_backup_command(tmp_path):
    index = _index_with_history(tmp_path / "idx")
    done = _cli("index", "backup", str(tmp_path / "idx"), str(tmp_path / "copy"))
    assert done.returncode == 0 and "the copy is healthy" in done.stdout, done
    assert _contents(tmp_path / "copy") == _contents(tmp_path / "idx")
    again = _cli("index", "backup", str(tmp_path / "idx"), str(tmp_path / "copy"))
    assert again.returncode == 1 and again.stderr.strip() == f"rankstream: {tmp_path / 'copy'} exists: back up to a new folder"
    with pytest.raises(BackupFailed, match="not a readable index folder"):
        backup_index(tmp_path / "nothing", tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists() and not list(tmp_path.glob("copy2*"))
    index.close()


def test_a_backup_of_an_ivf_in_the_old_id_layout_copies_the_store_only(tmp_path):
    """An IVF saved inside an IndexIDMap2 (before the IVF id fix) may map keys to the wrong
    vectors: check calls it unusable, and a backup leaves it behind; the copy builds afresh."""
    folder = tmp_path / "idx"
    _index_with_history(folder, "ivf").close()
    state = json.loads((folder / "vectors.json").read_text())
    store = DocStore(folder / "docs.sqlite", DIMENSION, read_only=True)
    keys, vectors = store.all_vectors()
    store.close()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIMENSION), DIMENSION, 1, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    old = faiss.IndexIDMap2(ivf)
    old.add_with_ids(vectors, keys)
    data = faiss.serialize_index(old)
    (folder / "vectors.faiss").write_bytes(data.tobytes())
    (folder / "vectors.json").write_text(json.dumps({**state, "sha256": hashlib.sha256(data).hexdigest(), "version": 5}))
    verdict = check_index(folder).verdict()
    assert verdict.startswith("DAMAGED") and "vectors.faiss unusable: IVF saved in the old id-map layout" in verdict
    report = backup_index(folder, tmp_path / "copy")
    assert report.check.healthy and "no saved vectors" in report.check.verdict(), report.summary()
    assert report.left_behind.startswith("vectors.faiss unusable: IVF saved in the old id-map layout")
    copy = open_index(tmp_path / "copy", type="ivf")
    assert copy.count == 58 and copy.search(vector_of(301), 1)[0].document.id == "late"
    copy.close()


def test_a_backup_leaves_damaged_vectors_behind_and_keeps_the_store(tmp_path):
    folder = tmp_path / "idx"
    _index_with_history(folder).close()
    (folder / "vectors.faiss").write_bytes(b"scrambled")
    report = backup_index(folder, tmp_path / "copy")
    assert report.left_behind == "vectors.faiss does not match the checksum in vectors.json"
    assert report.check.healthy and _contents(tmp_path / "copy") == _contents(folder)
    assert "saved vectors left behind" in report.summary() and "the copy is healthy" in report.summary()
    copy = open_index(tmp_path / "copy")
    assert copy.count == 58 and copy.search(vector_of(301), 1)[0].document.id == "late"
    copy.close()
