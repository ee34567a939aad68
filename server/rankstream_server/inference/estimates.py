"""The two estimates admission decides on: how fast a model's queue drains (DrainRate), and how
many tokens a request holds before it is tokenized (TokenSizes).

Both learn from what the server does, not from constants: a refusal is only as right as these
are. DrainRate measures tokens finished per second of wall time while passes run, so passes
side by side on CPU workers, contention with other processes and a machine that slows down or
speeds up are all in the figure (a per-pass time divided by the number of workers counts none
of them). TokenSizes learns characters per token from the requests it has tokenized.
"""

from __future__ import annotations

import collections

DEFAULT_CHARS_PER_TOKEN = 4.0  # English text under WordPiece/BPE, until requests have been measured


class DrainRate:
    """Tokens a model finishes per second of busy wall time (time with at least one pass out).

    Measured over windows of `window_seconds` of busy time and `window_passes` passes at least;
    each window moves the estimate by
    `weight` (an exponential average), so a change of speed is followed within a few windows.
    Small passes (light load: mostly fixed per-pass cost) are left out, their time with their
    tokens: they would understate how fast a long queue, cut into full passes, drains.

    `cautious_tokens_per_second` is the lowest the average has been over the last
    `memory_seconds`: a promise of a deadline is kept at that speed. Measured on a VM under a
    storm, the drain rate fell from ~10k to ~4.5k tokens/s for 13 s at a time with the model's
    thread holding the core throughout; work admitted at the faster figure then missed its
    deadline after part of it had run.

    Not thread-safe: the batcher calls it with its lock held.
    """

    def __init__(self, window_seconds: float = 0.25, window_passes: int = 4, weight: float = 0.4,
                 memory_seconds: float = 30.0):
        self._window_seconds = window_seconds
        self._window_passes = window_passes
        self._memory_seconds = memory_seconds
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (when, average then), rising
        self._passes = 0
        self._weight = weight
        self._running = 0
        self._busy_since = 0.0
        self._busy = 0.0
        self._tokens = 0
        self.tokens_per_second: float | None = None
        self._provisional = False

    def launched(self, now: float) -> None:
        """A pass went out at `now`."""
        if self._running == 0:
            self._busy_since = now
        self._running += 1

    def finished(self, now: float, tokens: int, full: bool) -> None:
        """A pass came back at `now` with `tokens` done (0 for a failed pass); `full`: it was cut
        from a queue that held at least a pass's worth of work."""
        if self._running == 0:
            return
        busy = max(0.0, now - self._busy_since)
        self._busy_since = now
        side_by_side = self._running
        self._running -= 1
        if not full:
            return  # its share of busy time is left out with its tokens
        self._busy += busy
        self._tokens += tokens
        self._passes += 1
        if self._busy >= self._window_seconds and self._passes >= self._window_passes:
            self._fold(now)
        elif self.tokens_per_second is None and self._tokens and self._busy > 0:
            # A first, provisional figure from the first full pass, counting the passes that ran
            # beside it as equally fast (they have not ended yet): replaced, not averaged, by the
            # first whole window.
            self.tokens_per_second = self._tokens * side_by_side / self._busy
            self._provisional = True

    def forget_running(self) -> None:
        """The passes out were abandoned (the batcher loop failed): none is running now."""
        self._running = 0

    def _fold(self, now: float) -> None:
        if self._tokens:
            rate = self._tokens / self._busy
            old = self.tokens_per_second
            fresh = old is None or self._provisional
            self.tokens_per_second = rate if fresh else old + self._weight * (rate - old)
            self._provisional = False
            # A sliding-window minimum: each entry is slower than every later one, so the first
            # is the lowest of the last memory_seconds.
            recent = self._recent
            while recent and recent[0][0] < now - self._memory_seconds:
                recent.popleft()
            while recent and recent[-1][1] >= self.tokens_per_second:
                recent.pop()
            recent.append((now, self.tokens_per_second))
        self._busy, self._tokens, self._passes = 0.0, 0, 0

    @property
    def cautious_tokens_per_second(self) -> float | None:
        """The lowest the average has been over the last `memory_seconds` of windows (the
        average itself until a window has been measured)."""
        return self._recent[0][1] if self._recent else self.tokens_per_second

    def seconds_for(self, tokens: float, cautious: bool = False) -> float | None:
        """Seconds to drain `tokens` at the measured rate, or with `cautious` at the lowest recent
        one (None until measured)."""
        rate = self.cautious_tokens_per_second if cautious else self.tokens_per_second
        if rate is None:
            return None
        return tokens / rate


class TokenSizes:
    """Characters per token of one model's tokenizer, learned from the requests it tokenized,
    to estimate a request's tokens from its size before tokenizing it."""

    def __init__(self, weight: float = 0.1):
        self._weight = weight
        self.chars_per_token = DEFAULT_CHARS_PER_TOKEN

    def learn(self, chars: int, tokens: int) -> None:
        if chars <= 0 or tokens <= 0:
            return
        self.chars_per_token += self._weight * (chars / tokens - self.chars_per_token)

    def tokens(self, chars: float) -> int:
        return int(chars / self.chars_per_token)
