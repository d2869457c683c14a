"""Generated tokens to text deltas: streaming detokenization and stop strings.

Stop strings are matched on text, not tokens, because a stop string rarely falls on token
boundaries. Text that might be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TextAssembler"]


class TextAssembler:
    """One request's text: `add(token)` returns the newly released text and whether a stop
    string completed; `finish()` flushes what was held back."""

    def __init__(self, detokenizer: Any, stop: list[str]) -> None:
        self._detok = detokenizer
        self._stop = [s for s in stop if s]
        self._released = ""  # text already handed out
        self._pending = ""  # text decoded but held back (a stop string may be starting)
        self.stopped = False

    @property
    def text(self) -> str:
        return self._released

    def add(self, token: int) -> str:
        self._detok.add_token(token)
        self._pending += self._detok.last_segment
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once no more tokens will come (not called after a stop)."""
        if self.stopped:
            return ""
        self._detok.finalize()
        self._pending += self._detok.last_segment
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._pending:
            return ""
        if self._stop:
            cut = self._find_stop()
            if cut is not None:
                delta = self._pending[:cut]
                self._released += delta
                self._pending = ""
                self.stopped = True
                return delta
        keep = 0 if final else self._held_back()
        delta = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(delta) :]
        self._released += delta
        return delta

    def _find_stop(self) -> int | None:
        # Released text never holds a whole stop string, so a match ends inside _pending;
        # it may start in the released tail only if it was held back, which it was not.
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        tail = self._pending
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best
