"""`rankstream models fetch`: every configured model and tokenizer from the Hugging Face hub into
one cache folder, for an init container or an image build. The server then reads that folder
offline (HF_HUB_CACHE=DIR, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rankstream_server.config import Settings
from rankstream_server.inference.embedded import SCHEME

log = logging.getLogger(__name__)

# Formats the server never loads: leaving them out keeps the cache (and the image) small.
SKIPPED = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
           "rust_model*", "coreml/*", "*.tflite"]


class FetchFailed(Exception):
    """One line: which repository, and why (offline, unknown, gated)."""


@dataclass(frozen=True)
class Source:
    repo: str
    revision: str | None
    why: str  # which model needs it


def hub_sources(settings: Settings) -> tuple[list[Source], list[str]]:
    """Hub repositories to fetch, and notes for sources that need no fetching."""
    sources: dict[tuple[str, str | None], Source] = {}
    notes: list[str] = []
    for model in settings.models:
        wanted = [(model.weights, model.revision, f"model {model.name!r}")]
        if model.tokenizer:
            wanted.append((model.tokenizer, None, f"tokenizer of {model.name!r}"))
        for name, revision, why in wanted:
            if name.startswith(SCHEME):
                notes.append(f"{why}: {name} ships in a package, nothing to fetch")
            elif Path(name).exists():
                notes.append(f"{why}: local folder {name}, nothing to fetch")
            else:
                sources.setdefault((name, revision), Source(name, revision, why))
    return list(sources.values()), notes


def fetch_models(settings: Settings, to: str | Path) -> list[str]:
    """Downloads every hub source into `to` (a hub cache folder); returns one line per source."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    sources, lines = hub_sources(settings)
    for source in sources:
        try:
            path = snapshot_download(source.repo, revision=source.revision, cache_dir=str(to), ignore_patterns=SKIPPED)
        except LocalEntryNotFoundError:
            raise FetchFailed(f"{source.why}: cannot download {source.repo} (no network, or HF_HUB_OFFLINE is set) "
                              f"and it is not in {to}") from None
        except RepositoryNotFoundError:
            raise FetchFailed(f"{source.why}: {source.repo} is not on the hub (or is private: set HF_TOKEN)") from None
        except (HfHubHTTPError, OSError) as error:
            raise FetchFailed(f"{source.why}: downloading {source.repo} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
        lines.append(f"{source.why}: {source.repo}{'@' + source.revision if source.revision else ''} -> {path}")
    return lines
