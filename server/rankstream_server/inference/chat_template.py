"""A (query, document) pair through a model's chat template, as sentence-transformers renders it:
messages `[system: instruction]?, query: q, document: d`, rendered with the folder's template kwargs.

Rendering Jinja once per pair is slow, so the template is rendered once per instruction with
sentinel texts and split into (prefix, middle, suffix): a pair is then `prefix + q + middle + d +
suffix`. That split is checked at load against real renders of tricky probe pairs; a template that
transforms its content (trims, escapes, branches on it) fails the check and every pair is rendered
by Jinja instead. A template that cannot carry the pair is refused, as sentence-transformers does."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from rankstream_server.errors import ModelLoadError

log = logging.getLogger(__name__)

_QUERY = "\u2063RSQUERY\u2063"
_DOCUMENT = "\u2063RSDOCUMENT\u2063"
_PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"),
           ("  spaced query ", " doc with {{ braces }} and <tags>\n"), ("x", ""))
_LAYOUTS_KEPT = 64  # distinct instructions whose split layout is cached


class ChatPairTemplate:
    def __init__(self, tokenizer, template: str, kwargs: dict[str, Any], model_name: str):
        self._tokenizer = tokenizer
        self._template = template
        self._kwargs = kwargs
        self._name = model_name
        self._layouts: collections.OrderedDict[str | None, tuple[str, str, str] | None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._check_pair_roles()
        # The instruction reaches the prompt only if a system message changes the render.
        self.takes_instruction = self._jinja("q", "d", "first instruction") != self._jinja("q", "d", "second instruction")
        self.split = True  # until the probes below say otherwise
        self.split = all(self.render(q, d, i) == self._jinja(q, d, i)
                         for q, d in _PROBES for i in (None, "an instruction"))
        if not self.split:
            self._layouts.clear()
            log.info("model %s: its chat template transforms its content; pairs are rendered one by one", model_name)

    def _jinja(self, query: str, document: str, instruction: str | None) -> str:
        messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
        if instruction is not None:
            messages.insert(0, {"role": "system", "content": instruction})
        return str(self._tokenizer.apply_chat_template(messages, chat_template=self._template, tokenize=False, **self._kwargs))

    def _check_pair_roles(self) -> None:
        try:
            base, *varied = (self._jinja(q, d, None) for q, d in _PROBES[:3])
        except Exception as error:  # noqa: BLE001 - any failure to render is a refusal, with its reason
            raise ModelLoadError(
                f"model {self._name!r}: its chat template cannot be rendered for a query/document pair "
                f"({type(error).__name__}: {error}); set `chat_template: none` to tokenize pairs without it"
            ) from None
        dropped = [role for role, render in zip(("query", "document"), varied) if render == base]
        if dropped:
            raise ModelLoadError(
                f"model {self._name!r}: its chat template drops the {' and '.join(dropped)} of a pair (it knows no "
                "'query' / 'document' roles), so sentence-transformers cannot score it either; ship a reranker "
                "template, or set `chat_template: none` to tokenize pairs without it"
            )

    def layout(self, instruction: str | None) -> tuple[str, str, str] | None:
        """(prefix, middle, suffix) of the render with this instruction; None if it cannot be split."""
        with self._lock:
            if instruction in self._layouts:
                self._layouts.move_to_end(instruction)
                return self._layouts[instruction]
        rendered = self._jinja(_QUERY, _DOCUMENT, instruction)
        found = None
        if rendered.count(_QUERY) == 1 and rendered.count(_DOCUMENT) == 1 and rendered.index(_QUERY) < rendered.index(_DOCUMENT):
            prefix, rest = rendered.split(_QUERY)
            middle, suffix = rest.split(_DOCUMENT)
            found = (prefix, middle, suffix)
        with self._lock:
            self._layouts[instruction] = found
            while len(self._layouts) > _LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return found

    def render(self, query: str, document: str, instruction: str | None) -> str:
        texts, _ = self.render_all(query, [document], instruction)
        return texts[0]

    def render_all(self, query: str, documents: list[str], instruction: str | None) -> tuple[list[str], list[int]]:
        """Each pair's text, and where its document starts in it."""
        parts = self.layout(instruction) if self.split else None
        if parts is not None:
            head = parts[0] + query + parts[1]
            return [head + d + parts[2] for d in documents], [len(head)] * len(documents)
        texts, starts = [], []
        for document in documents:
            text = self._jinja(query, document, instruction)
            texts.append(text)
            starts.append(text.rfind(document) if document else len(text))
        return texts, starts
