"""`rankstream index build`: encode a corpus with a bi-encoder and write an index folder
atomically (built in a staging folder, renamed into place only when complete). Replacing a
folder (--force) takes its writer lock first, so a live server's folder is never replaced."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rankstream_server.config import IndexConfig, Settings
from rankstream_server.index.corpus import passage_text, read_corpus
from rankstream_server.index.local import DOCS, _index_params, fsync_dir, save_vectors, write_manifest
from rankstream_server.index.lock import IndexLock
from rankstream_server.index.sparse import BM25Tokenizer
from rankstream_server.index.store import DocStore, Document
from rankstream_server.index.vectors import VectorIndex
from rankstream_server.inference.model_loading import dtype_name, load_model
from rankstream_server.inference.offline import dimension_of, encode_texts
from rankstream_server.inference.precision import settle_precision

log = logging.getLogger(__name__)

STORE_CHUNK = 1000  # documents per store transaction


@dataclass
class BuildReport:
    folder: Path
    count: int
    dimension: int
    index_type: str
    encode_seconds: float
    total_seconds: float
    dtype: str = ""  # what the bi-encoder ran in (dtype auto on CPU: measured at load)

    @property
    def passages_per_second(self) -> float:
        return self.count / self.encode_seconds if self.encode_seconds else 0.0


def pick_model(settings: Settings, name: str | None) -> str:
    bi = [m.name for m in settings.models if m.kind == "bi"]
    if name:
        if name not in bi:
            raise ValueError(f"--model {name!r} is not a bi-encoder in the config (bi-encoders: {bi})")
        return name
    if not bi:
        raise ValueError("the config has no bi-encoder (a model with kind: bi)")
    return bi[0]


def build_index(
    settings: Settings,
    corpus: str | Path,
    out: str | Path,
    model: str | None = None,
    index: IndexConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    started = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    # Held from now until the new folder is in place: refused while a server has the folder.
    lock = IndexLock.acquire(out, "index build --force") if out.exists() else None
    try:
        return _build(settings, corpus, out, model, index, progress, started)
    finally:
        if lock is not None:
            lock.release()


def _build(settings: Settings, corpus: str | Path, out: Path, model: str | None, index: IndexConfig | None,
           progress: bool, started: float) -> BuildReport:
    model_name = index.model if index else pick_model(settings, model)
    index = index or IndexConfig(name=out.name, path=str(out), model=model_name)
    documents: dict[str, Document] = {}
    for document in read_corpus(corpus):
        documents[document.id] = document  # a repeated id: the last one wins
    docs = list(documents.values())
    loaded = settle_precision(load_model(settings.model(model_name)))
    encode_started = time.perf_counter()
    embeddings = encode_texts(loaded, [passage_text(d.text, d.title) for d in docs], "passage", progress=progress)
    encode_seconds = time.perf_counter() - encode_started
    dimension = embeddings.shape[1] if len(docs) else dimension_of(loaded)

    for stale in out.parent.glob(f"{out.name}.partial-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        store = DocStore(staging / DOCS, dimension)
        for start in range(0, len(docs), STORE_CHUNK):
            store.upsert(docs[start : start + STORE_CHUNK], embeddings[start : start + STORE_CHUNK])
        keywords = BM25Tokenizer.for_index(index)
        if keywords is not None:
            store.rebuild_sparse(keywords, bump_version=False)
        keys, vectors, version = store.snapshot_vectors()
        store.close()
        built = VectorIndex.build(dimension, keys, vectors, index, place=False)
        save_vectors(staging, *built.snapshot(), built.built_type, _index_params(index), version)
        write_manifest(staging, loaded.identity(), dimension, len(docs), built.built_type, _index_params(index), version)
        fsync_dir(staging)
        if out.exists():
            retired = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, retired)
            os.rename(staging, out)
            shutil.rmtree(retired)
        else:
            os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildReport(out, len(docs), dimension, built.built_type, encode_seconds, time.perf_counter() - started,
                       dtype_name(loaded.dtype))


def build_into_milvus(settings: Settings, corpus: str | Path, index: IndexConfig, progress: bool = True) -> BuildReport:
    """`index build --index NAME` for a `backend: milvus` index: encode the corpus and upsert it
    into the collection (created when missing); passages already there with other ids stay."""
    from rankstream_server.index.milvus import MilvusIndex

    started = time.perf_counter()
    documents: dict[str, Document] = {}
    for document in read_corpus(corpus):
        documents[document.id] = document
    docs = list(documents.values())
    loaded = settle_precision(load_model(settings.model(index.model)))
    encode_started = time.perf_counter()
    embeddings = encode_texts(loaded, [passage_text(d.text, d.title) for d in docs], "passage", progress=progress)
    encode_seconds = time.perf_counter() - encode_started
    dimension = embeddings.shape[1] if len(docs) else dimension_of(loaded)
    target = MilvusIndex.open(index, loaded.identity(), dimension)
    try:
        for start in range(0, len(docs), STORE_CHUNK):
            target.upsert(docs[start:start + STORE_CHUNK], embeddings[start:start + STORE_CHUNK])
        count = target.count
    finally:
        target.close()
    return BuildReport(Path(index.milvus.collection), count, dimension, target.index_type, encode_seconds,
                       time.perf_counter() - started, dtype_name(loaded.dtype))
