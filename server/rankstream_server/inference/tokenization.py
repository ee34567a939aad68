"""Turning text into token arrays: (query, passage) pairs for cross-encoders, where truncation cuts
the passage and never the query, and single texts for bi-encoders.

The hot path talks to the Rust `tokenizers` library directly, never through per-pair Python:
- the query is tokenized once per request, not once per passage;
- passages are tokenized as one batch (`encode_batch_fast` releases the GIL, uses every core and
  skips the character offsets nothing here reads);
- with BERT's normalizer, ASCII text skips it (`_PlainAscii`): the same ids, far less work;
- a long passage is cut to a word boundary well past what can fit before it is tokenized, so a
  20,000-character passage does not cost 20,000 characters of tokenizing;
- special tokens come from the tokenizer's own post-processor template, read once at load, and
  are laid out around the tokens with numpy into one padded array per request.

The result equals what the Hugging Face tokenizer gives for the same pair with
`truncation="only_second"` (single texts: `truncation=True`); the parity tests hold it to that.
Tokenizers without a Rust backend take the Hugging Face call instead, with the same result type.
Runs on a thread pool, never on the event loop.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import threading
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from rankstream_server.errors import InvalidArgument

# A passage is cut to (room in tokens x this many characters) at a word boundary before it is
# tokenized. Tokens of English text average 4-5 characters; a cut text that still yields too
# few tokens is tokenized again in full, so this only sets how often that happens.
CHARACTERS_PER_TOKEN_CUT = 10


class TooLong(Exception):
    """An input longer than the model takes, where the request refuses to cut one (long_passages
    REFUSE): the input's position and its tokens with the query (if any) and the special tokens.
    Not a request error by itself: the caller names its field."""

    def __init__(self, index: int, tokens: int):
        super().__init__(f"input {index}: {tokens} tokens")
        self.index = index
        self.tokens = tokens


@dataclass
class Tokens:
    """One request's tokenized inputs, as arrays. Row i is the request's input i.

    `input_ids` is padded (with the pad id) to the request's longest row; `lengths` gives each
    row's real length."""

    input_ids: np.ndarray  # int64 (rows, width)
    token_type_ids: np.ndarray | None  # int64 (rows, width), for models that take them
    lengths: np.ndarray  # int32 (rows,)
    truncated: int  # rows whose text was cut to fit max_length
    # Chunked passages (long_passages CHUNK): the input each row is a window of, when rows are windows.
    owners: np.ndarray | None = None
    chunked: int = 0  # inputs scored in more than one window

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def token_count(self) -> int:
        return int(self.lengths.sum())


class PassageTokenCache:
    """Token ids (no special tokens, cut to the longest any pair can hold) of recently seen
    passages, least recently used out. RetrieveAndRerank scores the same corpus passages again
    and again: they are tokenized once. Thread-safe; ~4 bytes a token."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(self, texts: list[str]) -> list[np.ndarray | None]:
        with self._lock:
            found = []
            for text in texts:
                ids = self._entries.get(text)
                if ids is not None:
                    self._entries.move_to_end(text)
                found.append(ids)
        hits = sum(ids is not None for ids in found)
        self.hits += hits
        self.misses += len(texts) - hits
        return found

    def put_many(self, texts: list[str], token_ids: list[np.ndarray]) -> None:
        with self._lock:
            for text, ids in zip(texts, token_ids):
                self._entries[text] = ids
                self._entries.move_to_end(text)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


@dataclass(frozen=True)
class _Template:
    """Where special tokens go around one or two sequences, read from the post-processor:
    `parts` in order, each either a sequence slot (0 or 1) or a special token (id, type id)."""

    parts: tuple[tuple[str, int, int], ...]  # ("seq", sequence, type id) or ("special", id, type id)

    @property
    def specials(self) -> int:
        return sum(kind == "special" for kind, _, _ in self.parts)

    @staticmethod
    def read(backend, pair: bool) -> _Template:
        first = backend.encode("a", add_special_tokens=False)
        second = backend.encode("b", add_special_tokens=False) if pair else None
        done = backend.post_process(first, second, add_special_tokens=True)
        parts: list[tuple[str, int, int]] = []
        sequences = 0  # runs of ordinary tokens: the first is sequence 0, the next sequence 1
        for token, special, type_id in zip(done.ids, done.special_tokens_mask, done.type_ids):
            if special:
                parts.append(("special", token, type_id))
            elif not parts or parts[-1][0] != "seq":
                parts.append(("seq", sequences, type_id))
                sequences += 1
        if sequences != (2 if pair else 1):
            raise ValueError(f"unexpected special-token template: {done.ids}")
        return _Template(tuple(parts))


def _cut(text: str, room: int) -> tuple[str, bool]:
    """The text cut at a word boundary past `room` tokens' worth of characters; (text, was cut)."""
    limit = room * CHARACTERS_PER_TOKEN_CUT
    if len(text) <= limit:
        return text, False
    boundary = text.rfind(" ", limit // 2, limit)
    if boundary <= 0:
        return text, False  # no boundary to cut at safely: tokenize it all
    return text[:boundary], True


def windows(ids, room: int, most: int) -> tuple[list, bool]:
    """A passage's tokens as overlapping windows of `room` tokens (a quarter of each shared with the
    next), at most `most`; and whether tokens were left past the last window."""
    if len(ids) <= room:
        return [ids], False
    if most <= 1:
        return [ids[:room]], True
    stride = max(1, room - room // 4)
    starts = list(range(0, len(ids) - room + stride, stride))[:most]
    return [ids[start:start + room] for start in starts], len(ids) > starts[-1] + room


def expand_windows(rows: list, room: int, most: int) -> tuple[list, np.ndarray, int, int]:
    """Every row's windows in one list; the row each window belongs to; how many rows took more
    than one window; how many still lost tokens (past `most` windows)."""
    expanded, owners = [], []
    chunked = cut = 0
    for index, ids in enumerate(rows):
        parts, lost = windows(ids, room, most)
        expanded += parts
        owners += [index] * len(parts)
        chunked += len(parts) > 1
        cut += lost
    return expanded, np.asarray(owners, dtype=np.int64), chunked, cut


# ASCII control characters other than tab, newline and carriage return: BERT's normalizer drops
# them or turns them into spaces, so a text holding one goes through the normalizer. NUL is left
# out here: it separates texts joined for one check (a NUL inside a text is caught by the count).
_ASCII_CONTROL_BUT_NUL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _PlainAscii:
    """A shortcut for tokenizers whose normalizer is BERT's (clean text, Chinese characters, strip
    accents, lowercase). On ASCII text free of control characters that normalizer changes nothing
    but the case, yet it tracks alignments character by character. Such texts are lowercased by
    `str.lower` and tokenized by a copy with no normalizer: the same ids, and on a 2-core EPYC
    1.6x the passages a second. Other texts, and other normalizers, take the tokenizer as it is.
    A request's texts are checked and lowercased as one joined string, at C speed."""

    def __init__(self, backend):
        from tokenizers import Tokenizer

        saved = backend.to_str()
        normalizer = json.loads(saved).get("normalizer") or {}
        self.active = normalizer.get("type") == "BertNormalizer"
        self._lowercase = bool(normalizer.get("lowercase", True))
        self._tokenizer = None
        if self.active:
            self._tokenizer = Tokenizer.from_str(saved)
            self._tokenizer.normalizer = None

    def _clean(self, joined: str, count: int) -> bool:
        return (self.active and joined.isascii() and joined.count("\0") == count - 1
                and _ASCII_CONTROL_BUT_NUL.search(joined) is None)

    def takes(self, text: str) -> bool:
        return self._clean(text, 1)

    def encode_all(self, texts: list[str]):
        """Encodings (no special tokens) of every text, or None unless `takes` accepts them all."""
        joined = "\0".join(texts)
        if not texts or not self._clean(joined, len(texts)):
            return None
        return self._encode(joined.lower().split("\0") if self._lowercase else texts)

    def encode_batch(self, texts: list[str]):
        """Texts that `takes` accepts, tokenized without special tokens."""
        return self._encode([text.lower() for text in texts] if self._lowercase else texts)

    def _encode(self, texts: list[str]):
        return self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)


class _RustTokenizer:
    """Pieces shared by pair and single-text tokenizers: the Rust tokenizer, set to neither truncate
    nor pad (a private copy: settings on a shared one would race between threads)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self._max_length = max_length
        self._pad_id = tokenizer.pad_token_id or 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        self._plain: _PlainAscii | None = None
        if backend is not None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
            self._plain = _PlainAscii(self._backend)
        self._hf = tokenizer

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, no special tokens."""
        plain = self._plain
        if plain is None or not plain.active:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        every = plain.encode_all(texts)
        if every is not None:
            return [e.ids for e in every]
        takes = [plain.takes(text) for text in texts]
        ids: list[list[int] | None] = [None] * len(texts)
        easy = [i for i, ok in enumerate(takes) if ok]
        hard = [i for i, ok in enumerate(takes) if not ok]
        for i, e in zip(easy, plain.encode_batch([texts[i] for i in easy]) if easy else ()):
            ids[i] = e.ids
        for i, e in zip(hard, self._backend.encode_batch_fast([texts[i] for i in hard], add_special_tokens=False)):
            ids[i] = e.ids
        return ids

    @property
    def fast(self) -> bool:
        return self._backend is not None

    def _read_template(self, pair: bool) -> _Template | None:
        """The special-token layout; a tokenizer whose layout this cannot read takes the slow path."""
        if self._backend is None:
            return None
        try:
            return _Template.read(self._backend, pair)
        except ValueError:
            self._backend = None
            return None

    def _token_lists(self, texts: list[str], room: int) -> tuple[list[list[int]], int]:
        """Each text's tokens (no specials) cut to `room`; and how many were cut."""
        limit = room * CHARACTERS_PER_TOKEN_CUT
        cut = [(text, False) if len(text) <= limit else _cut(text, room) for text in texts]
        ids = self._ids([text for text, _ in cut])
        short = [i for i, (_, was_cut) in enumerate(cut) if was_cut and len(ids[i]) < room]
        if short:  # the cut fell short of the room: tokenize those in full
            for i, full in zip(short, self._ids([texts[i] for i in short])):
                ids[i] = full
        truncated = sum(len(tokens) > room or was_cut for tokens, (_, was_cut) in zip(ids, cut))
        return ids, truncated

    def _refuse_long(self, texts: list[str], rows: list, room: int, fixed: int) -> None:
        """Raises TooLong for the first text past `room` tokens. A row of `room` tokens or more may
        be a text cut by characters before tokenizing (`_token_lists`): that one is counted whole."""
        for i, ids in enumerate(rows):
            if len(ids) >= room:
                whole = len(self._ids([texts[i]])[0])
                if whole > room:
                    raise TooLong(i, fixed + whole)

    def _uncut_hf(self, with_types: bool, *texts) -> Tokens:
        """The Hugging Face path with nothing cut: TooLong for the first row past max_length."""
        batch = self._hf(*texts, truncation=False, padding=False, return_attention_mask=False,
                         return_token_type_ids=with_types)
        for i, ids in enumerate(batch["input_ids"]):
            if len(ids) > self._max_length:
                raise TooLong(i, len(ids))
        tokens = self._from_hf(batch, with_types)
        tokens.truncated = 0  # a row of exactly max_length was not cut
        return tokens

    def _lay_out(self, template: _Template, sequences: dict[int, list[int]], rows: list[list[int]], room: int,
                 truncated: int, with_types: bool) -> Tokens:
        """Arrays of `template` filled with the shared sequences (the query, slot 0 for pairs) and
        one row sequence per input (the last slot), cut to `room`."""
        row_slot = max(seq for kind, seq, _ in template.parts if kind == "seq")
        row_lengths = np.fromiter((min(len(r), room) for r in rows), dtype=np.int64, count=len(rows))
        count = len(rows)
        head_ids: list[int] = []
        head_types: list[int] = []
        tail: list[tuple[int, int]] = []
        row_type = 0
        seen_row = False
        for kind, value, type_id in template.parts:
            if kind == "seq" and value == row_slot:
                seen_row, row_type = True, type_id
            elif kind == "seq":
                head_ids += sequences[value]
                head_types += [type_id] * len(sequences[value])
            elif seen_row:
                tail.append((value, type_id))
            else:
                head_ids.append(value)
                head_types.append(type_id)
        fixed = len(head_ids)  # tokens before the row sequence (the same in every row)
        lengths = fixed + row_lengths + len(tail)
        width = int(lengths.max()) if count else 0
        input_ids = np.full((count, width), self._pad_id, dtype=np.int64)
        types = np.zeros((count, width), dtype=np.int64) if with_types else None
        input_ids[:, :fixed] = head_ids
        if types is not None:
            types[:, :fixed] = head_types
        columns = np.arange(width)
        body = (columns >= fixed) & (columns < (fixed + row_lengths)[:, None])
        if rows and isinstance(rows[0], np.ndarray):
            input_ids[body] = np.concatenate([r[:room] for r in rows])
        else:
            input_ids[body] = np.fromiter(
                itertools.chain.from_iterable(r[:room] for r in rows), dtype=np.int64, count=int(row_lengths.sum())
            )
        every_row = np.arange(count)
        for offset, (token, type_id) in enumerate(tail):
            input_ids[every_row, fixed + row_lengths + offset] = token
            if types is not None:
                types[every_row, fixed + row_lengths + offset] = type_id
        if types is not None:
            types[body] = row_type
        if count and int(lengths.max()) > self._max_length:  # would break the model (or a CUDA device)
            raise RuntimeError(f"tokenizer produced {int(lengths.max())} tokens, over max_length {self._max_length}")
        return Tokens(input_ids, types, lengths.astype(np.int32), truncated)

    def _from_hf(self, batch, with_types: bool) -> Tokens:
        """Arrays from a Hugging Face tokenizer's lists (tokenizers without a Rust backend)."""
        ids = batch["input_ids"]
        lengths = np.array([len(row) for row in ids], dtype=np.int32)
        width = int(lengths.max()) if len(ids) else 0
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        types = np.zeros((len(ids), width), dtype=np.int64) if with_types else None
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            if types is not None:
                types[i, : len(row)] = batch["token_type_ids"][i]
        if len(ids) and int(lengths.max()) > self._max_length:
            raise RuntimeError(f"tokenizer produced {int(lengths.max())} tokens, over max_length {self._max_length}")
        truncated = int((lengths >= self._max_length).sum())  # slow tokenizers do not report overflow
        return Tokens(input_ids, types, lengths, truncated)


class PairTokenizer(_RustTokenizer):
    """Tokenizes a query against many passages for one cross-encoder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, model_name: str, uses_token_type_ids: bool,
                 cache_passages: int = 0):
        super().__init__(tokenizer, max_length)
        self.cache = PassageTokenCache(cache_passages) if cache_passages > 0 else None
        self._model_name = model_name
        self._uses_token_type_ids = uses_token_type_ids
        self._template = self._read_template(pair=True)
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)

    def _query_tokens(self, query: str) -> list[int]:
        if self.fast:
            tokens = self._ids([query])[0]
        else:
            tokens = self._hf(query, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise InvalidArgument("query: has no tokens for this model (only spaces or control characters?)")
        room = self._max_length - self._pair_specials - 1
        if len(tokens) > room:
            raise InvalidArgument(
                f"query is {len(tokens)} tokens; model {self._model_name!r} takes at most {room} query tokens "
                f"(max_length {self._max_length}, queries are never truncated)"
            )
        return tokens

    def encode(self, query: str, passages: list[str], reuse: bool = False, instruction: str | None = None,
               chunks: int = 1, passage_tokens: int = 0, refuse: bool = False) -> Tokens:
        """`reuse`: the passages come from a corpus and recur (RetrieveAndRerank): keep their
        tokens in the passage cache, and take what it has. `instruction`: sentence-transformers'
        prompt, put before the query. `chunks` > 1: a long passage becomes up to that many windows.
        `passage_tokens`: a passage (or window) keeps at most that many tokens. `refuse`: a passage
        that would be cut raises TooLong instead (with chunks 1 and no passage_tokens)."""
        if instruction:
            query = instruction + query
        query_tokens = self._query_tokens(query)
        if not self.fast:
            if chunks > 1 or passage_tokens:
                raise InvalidArgument(f"long_passages: CHUNK and max_passage_tokens need a fast tokenizer; "
                                      f"model {self._model_name!r} has none")
            if refuse:
                return self._uncut_hf(self._uses_token_type_ids, [query] * len(passages), passages)
            batch = self._hf(
                [query] * len(passages), passages, truncation="only_second", max_length=self._max_length,
                padding=False, return_token_type_ids=self._uses_token_type_ids, return_attention_mask=False,
            )
            return self._from_hf(batch, self._uses_token_type_ids)
        room = self._max_length - self._pair_specials - len(query_tokens)
        if passage_tokens:
            room = min(room, passage_tokens)
        if chunks > 1:
            rows, _ = self._token_lists(passages, room * chunks)
            rows, owners, chunked, truncated = expand_windows(rows, room, chunks)
            tokens = self._lay_out(self._template, {0: query_tokens}, rows, room, truncated, self._uses_token_type_ids)
            tokens.owners, tokens.chunked = owners, chunked
            return tokens
        if reuse and self.cache is not None:
            rows, truncated = self._cached_token_lists(passages, room)
        else:
            rows, truncated = self._token_lists(passages, room)
        if refuse:
            self._refuse_long(passages, rows, room, self._pair_specials + len(query_tokens))
        return self._lay_out(self._template, {0: query_tokens}, rows, room, truncated, self._uses_token_type_ids)

    def _cached_token_lists(self, passages: list[str], room: int) -> tuple[list[np.ndarray], int]:
        """Token arrays cut to the largest room any query leaves (so one entry serves every query),
        from the cache where it has them; then cut to this query's room."""
        found = self.cache.get_many(passages)
        missing = [i for i, ids in enumerate(found) if ids is None]
        if missing:
            widest = self._max_length - self._pair_specials - 1
            lists, _ = self._token_lists([passages[i] for i in missing], widest + 1)  # +1: tells "was cut"
            fresh = [np.array(ids[: widest + 1], dtype=np.int32) for ids in lists]
            self.cache.put_many([passages[i] for i in missing], fresh)
            for i, ids in zip(missing, fresh):
                found[i] = ids
        truncated = sum(len(ids) > room for ids in found)
        return found, truncated


class ChatPairTokenizer(_RustTokenizer):
    """Tokenizes pairs rendered by a chat template (LLM rerankers). Each pair's text is tokenized
    whole, as sentence-transformers does, and the document's tokens are found by their offsets: a
    pair past max_length loses document tokens, never the query or the template (its suffix,
    which the score is read after, stays whole)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, model_name: str, template):
        super().__init__(tokenizer, max_length)
        if self._backend is None:
            raise ValueError(f"model {model_name!r}: a chat-template reranker needs a fast (Rust) tokenizer")
        self._model_name = model_name
        self.template = template

    def encode(self, query: str, passages: list[str], reuse: bool = False, instruction: str | None = None,
               chunks: int = 1, passage_tokens: int = 0, refuse: bool = False) -> Tokens:
        """As PairTokenizer.encode (the passage cache is not used: each pair is tokenized whole)."""
        if not query.strip():
            raise InvalidArgument("query: has no tokens for this model (only spaces or control characters?)")
        most = self._max_length * chunks  # document tokens that can be used at the most
        limit = most * CHARACTERS_PER_TOKEN_CUT
        documents, cut = zip(*(_cut(p, most) if len(p) > limit else (p, False) for p in passages)) if passages else ((), ())
        documents = list(documents)
        heads, rows, tails = self._split(query, documents, instruction)
        short = [i for i, was_cut in enumerate(cut) if was_cut and len(rows[i]) <= most]
        if short:  # the cut fell short: those in full
            for i, head, row, tail in zip(short, *self._split(query, [passages[i] for i in short], instruction)):
                heads[i], rows[i], tails[i] = head, row, tail
        room = self._max_length - max(len(h) + len(t) for h, t in zip(heads, tails)) if rows else self._max_length
        if room < 1:
            raise InvalidArgument(
                f"query is too long: with model {self._model_name!r}'s template it leaves no room for a passage "
                f"within max_length {self._max_length} (queries are never truncated)")
        if passage_tokens:
            room = min(room, passage_tokens)
        owners = None
        chunked = 0
        if chunks > 1:
            rows, owners, chunked, truncated = expand_windows(rows, room, chunks)
        else:
            truncated = sum(len(r) > room for r in rows)
        if refuse and truncated:
            i = next(i for i, r in enumerate(rows) if len(r) > room)
            head, row, tail = (part[0] for part in self._split(query, [passages[i]], instruction))  # the whole document
            raise TooLong(i, len(head) + len(row) + len(tail))
        row_heads = heads if owners is None else [heads[o] for o in owners]
        row_tails = tails if owners is None else [tails[o] for o in owners]
        full = [h + list(r[:room]) + tl for h, r, tl in zip(row_heads, rows, row_tails)]
        lengths = np.fromiter((len(r) for r in full), dtype=np.int32, count=len(full))
        input_ids = np.full((len(full), int(lengths.max()) if len(full) else 0), self._pad_id, dtype=np.int64)
        for i, ids in enumerate(full):
            input_ids[i, : len(ids)] = ids
        return Tokens(input_ids, None, lengths, truncated, owners, chunked)

    def _split(self, query: str, documents: list[str], instruction: str | None) -> tuple[list, list, list]:
        """Each pair tokenized whole, split by offsets into (tokens before the document, the
        document's tokens, tokens after it)."""
        texts, starts = self.template.render_all(query, documents, instruction)
        heads, rows, tails = [], [], []
        for encoding, start, document in zip(self._backend.encode_batch(texts, add_special_tokens=False), starts, documents):
            end = start + len(document)
            ids, offsets = encoding.ids, encoding.offsets
            first = next((i for i, (_, stop) in enumerate(offsets) if stop > start), len(ids))  # first reaching the document
            after = next((i for i in range(len(ids) - 1, -1, -1) if offsets[i][0] < end), -1) + 1  # past its last
            first = min(first, after)
            heads.append(ids[:first])
            rows.append(ids[first:after])
            tails.append(ids[after:])
        return heads, rows, tails


class TextTokenizer(_RustTokenizer):
    """Tokenizes single texts for one bi-encoder, with its query or passage prefix."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, query_prefix: str, passage_prefix: str):
        super().__init__(tokenizer, max_length)
        self._prefixes = {"query": query_prefix, "passage": passage_prefix}
        self._template = self._read_template(pair=False)
        self._room = max_length - tokenizer.num_special_tokens_to_add(pair=False)

    def encode(self, texts: list[str], role: str, refuse: bool = False) -> Tokens:
        """role: "query" or "passage". `refuse`: a text that would be cut raises TooLong instead."""
        prefix = self._prefixes[role]
        texts = [prefix + text for text in texts] if prefix else texts
        if not self.fast:
            if refuse:
                return self._uncut_hf(False, texts)
            batch = self._hf(texts, truncation=True, max_length=self._max_length, padding=False,
                             return_token_type_ids=False, return_attention_mask=False)
            return self._from_hf(batch, False)
        rows, truncated = self._token_lists(texts, self._room)
        if refuse:
            self._refuse_long(texts, rows, self._room, self._max_length - self._room)
        return self._lay_out(self._template, {}, rows, self._room, truncated, False)
