"""The `rankstream` console script."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from rankstream_server.config import ConfigError, load_settings
from rankstream_server.errors import ModelLoadError
from rankstream_server.index.lock import IndexLocked


def _serve(args: argparse.Namespace) -> int:
    from rankstream_server.serving.app import serve  # imports torch: only for the commands that need it

    settings = load_settings(args.config, **{"server.port": args.port, "server.host": args.host,
                                               "server.http_port": args.http_port})

    def announce(port: int, http_port: int | None = None) -> None:
        print(f"rankstream listening on {settings.server.host}:{port}", flush=True)
        if http_port is not None:  # a line of its own: readers of the first line get the gRPC port
            print(f"rankstream HTTP on {settings.server.host}:{http_port}", flush=True)

    try:
        asyncio.run(serve(settings, on_bound=announce))
    except ModelLoadError as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2
    return 0


def _index_config(settings, args: argparse.Namespace):
    """The config's index entry for --index NAME, or one whose path is --out."""
    from pathlib import Path

    name = getattr(args, "index", None)
    out = getattr(args, "out", None)
    for index in settings.indexes:
        if index.name == name or (out and index.backend == "local" and Path(index.path).resolve() == Path(out).resolve()):
            return index
    if name:
        raise SystemExit(f"rankstream: --index {name!r} is not in the config (indexes: {[i.name for i in settings.indexes]})")
    return None


def _use_server_threads(settings) -> None:
    """Offline commands run passes as the server does: one per core, server.torch_threads each
    (measured ~20% faster than one pass on every core), and settle dtype auto under that."""
    import torch

    torch.set_num_threads(settings.server.torch_threads or 1)


def _index_build(args: argparse.Namespace) -> int:
    from rankstream_server.config import IndexConfig
    from rankstream_server.index.build import build_index, pick_model

    settings = load_settings(args.config)
    _use_server_threads(settings)
    index = _index_config(settings, args)
    if index is not None and index.backend == "milvus":
        from rankstream_server.index.build import build_into_milvus

        report = build_into_milvus(settings, args.corpus, index)
        print(f"upserted into Milvus collection {report.folder}: {report.count} passages there now, dimension "
              f"{report.dimension}, encoded at {report.passages_per_second:.1f} passages/s, {report.total_seconds:.1f} s in all")
        return 0
    if not args.out and index is None:
        raise SystemExit("rankstream: index build needs --out FOLDER (or --index NAME of an index in the config)")
    if index is None:
        index = IndexConfig(name="built", path=args.out, model=pick_model(settings, args.model), type=args.type or "flat")
    elif args.type:
        index = index.model_copy(update={"type": args.type})
    try:
        report = build_index(settings, args.corpus, args.out or index.path, index=index, force=args.force)
    except IndexLocked as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2
    print(
        f"built {report.folder}: {report.count} passages, dimension {report.dimension}, {report.index_type} index, "
        f"encoded at {report.passages_per_second:.1f} passages/s in {report.dtype}, {report.total_seconds:.1f} s in all"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rankstream_server.cli.evaluate import MODES, evaluate, tables, to_json

    settings = load_settings(args.config)
    _use_server_threads(settings)
    modes = list(MODES) if args.mode == "all" else [args.mode] if args.mode else None
    try:
        reports = evaluate(
            settings, args.data, args.pipeline, index=_index_config(settings, args), model=args.model,
            reranker=args.reranker, top_k=args.top_k, rerank_k=args.rerank_k, split=args.split, modes=modes,
        )
    except IndexLocked as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2
    print(tables(reports))
    if args.json:
        Path(args.json).write_text(to_json(reports))
    else:
        print(to_json(reports))
    return 0


def _index_check(args: argparse.Namespace) -> int:
    from rankstream_server.index.check import check_index

    report = check_index(args.folder)
    print(report.verdict())
    return 0 if report.healthy else 1


def _index_backup(args: argparse.Namespace) -> int:
    from rankstream_server.index.backup import BackupFailed, backup_index

    try:
        report = backup_index(args.folder, args.out)
    except BackupFailed as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.check.healthy else 1


def _models_fetch(args: argparse.Namespace) -> int:
    from rankstream_server.inference.model_fetch import FetchFailed, fetch_models

    settings = load_settings(args.config)
    Path(args.to).mkdir(parents=True, exist_ok=True)
    try:
        lines = fetch_models(settings, args.to)
    except FetchFailed as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from rankstream_server.cli.doctor import diagnose, report

    settings = load_settings(args.config)
    try:
        diagnoses = diagnose(settings, args.model)
    except ModelLoadError as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2
    print(report(diagnoses))
    return 0


def _configure_logging(level: str, style: str) -> None:
    handler = logging.StreamHandler()
    if style == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankstream", description="Retrieve-and-rerank over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per line, for log pipelines (access-log fields as keys)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the gRPC server.")
    serve.add_argument("--config", required=True, help="YAML config file (env RANKSTREAM_* overrides it).")
    serve.add_argument("--port", type=int, help="Port to bind; 0 picks a free one (printed on start).")
    serve.add_argument("--host", help="Address to bind.")
    serve.add_argument("--http-port", type=int,
                       help="Also serve the HTTP front (Cohere, Jina, TEI, OpenAI, JSON) on this port; 0 picks a free one.")
    serve.set_defaults(run=_serve)

    index = commands.add_parser("index", help="Manage index folders.").add_subparsers(dest="index_command", required=True)
    build = index.add_parser("build", help="Encode a corpus and write an index folder atomically.")
    build.add_argument("--config", required=True)
    build.add_argument("--corpus", required=True, help="BEIR folder or corpus.jsonl, or plain JSONL (id, text, title, metadata).")
    build.add_argument("--out", help="Index folder to write (backend local).")
    build.add_argument("--index", help="The config's index to fill: its folder, or its Milvus collection (backend milvus).")
    build.add_argument("--model", help="Bi-encoder name from the config (default: the index's, else the first bi-encoder).")
    build.add_argument("--type", choices=["flat", "hnsw", "ivf"], help="Index type (default: the config's for this folder, else flat).")
    build.add_argument("--force", action="store_true", help="Replace an existing folder.")
    build.set_defaults(run=_index_build)
    check = index.add_parser(
        "check", help="Verify an index folder: manifest, checksums, SQLite integrity, store and vectors agreeing. "
        "Prints one line; exit 0 when healthy, 1 when not. Safe on a live index.",
    )
    check.add_argument("folder", help="The index folder.")
    check.set_defaults(run=_index_check)
    backup = index.add_parser(
        "backup", help="Copy an index folder, live or not, consistently (SQLite's online backup API); the copy is checked.",
    )
    backup.add_argument("folder", help="The index folder.")
    backup.add_argument("out", help="Where the copy goes (must not exist).")
    backup.set_defaults(run=_index_backup)

    fetch_models = commands.add_parser("models", help="Manage model files.").add_subparsers(dest="models_command", required=True)
    fetch = fetch_models.add_parser(
        "fetch", help="Download every configured model and tokenizer from the hub into DIR (a hub cache: serve "
        "with HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1), for an init container or an image build.",
    )
    fetch.add_argument("--config", required=True)
    fetch.add_argument("--to", required=True, help="Cache folder to fill (created if missing).")
    fetch.set_defaults(run=_models_fetch)

    evaluation = commands.add_parser("eval", help="nDCG@10, RR@10, R@100 on a BEIR-layout folder.")
    evaluation.add_argument("--config", required=True)
    evaluation.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    evaluation.add_argument("--pipeline", choices=["retrieve", "retrieve+rerank"], default="retrieve")
    evaluation.add_argument("--index", help="Evaluate this configured index (default: build a temporary one from --data).")
    evaluation.add_argument("--model", help="Bi-encoder for a temporary index (default: the first).")
    evaluation.add_argument("--reranker", help="Cross-encoder for retrieve+rerank (default: default_model).")
    evaluation.add_argument("--top-k", type=int, default=100)
    evaluation.add_argument("--rerank-k", type=int, default=100, help="Candidates per query to rerank.")
    evaluation.add_argument("--split", default="test")
    evaluation.add_argument("--mode", choices=["dense", "sparse", "hybrid", "all"],
                            help="Retrieval mode; all = one row each (default: the index's configured mode).")
    evaluation.add_argument("--json", help="Write the report as JSON here (default: print it).")
    evaluation.set_defaults(run=_eval)

    doctor = commands.add_parser(
        "doctor", help="Load each configured model as `serve` would and print the dtype it would run in on this "
        "machine and why (speeds measured, quality guard, CPU flags), without serving.",
    )
    doctor.add_argument("--config", required=True)
    doctor.add_argument("--model", action="append", help="Only this model (repeatable; default: every model).")
    doctor.set_defaults(run=_doctor)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level.upper(), args.log_format)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked: noise
    if args.run not in (_index_check, _index_backup, _models_fetch):  # those load no model
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bars say what is going on
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
