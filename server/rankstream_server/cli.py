"""The `rankstream` console script."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .config import load_settings
from .errors import ModelLoadError


def _serve(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .app import serve  # imports torch: only for the commands that need it

    hf_logging.disable_progress_bar()

    settings = load_settings(args.config, **{"server.port": args.port, "server.host": args.host})

    def announce(port: int) -> None:
        print(f"rankstream listening on {settings.server.host}:{port}", flush=True)

    try:
        asyncio.run(serve(settings, on_bound=announce))
    except ModelLoadError as exc:
        print(f"rankstream: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankstream", description="Retrieve-and-rerank over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the gRPC server.")
    serve.add_argument("--config", required=True, help="YAML config file (env RANKSTREAM_* overrides it).")
    serve.add_argument("--port", type=int, help="Port to bind; 0 picks a free one (printed on start).")
    serve.add_argument("--host", help="Address to bind.")
    serve.set_defaults(run=_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
