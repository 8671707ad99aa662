"""Incremental detokenization with stop strings, for streaming.

``TextStream.push(token_id)`` returns the text that may be shown now. Two things hold text back:

- an unfinished character: byte-level BPE splits a UTF-8 character over tokens, and decoding a
  partial one yields U+FFFD; the stream waits for the rest (it decodes a short window
  ``ids[prefix:]`` and compares it with ``ids[prefix:read]``, so each token costs O(1), not a
  decode of the whole completion; vLLM's prefix/read offsets work the same way);
- a possible stop string: the longest tail of the pending text that is a prefix of a stop string
  is kept until the next token decides. When a stop string appears, the text before it is
  released, the stop string itself never is (OpenAI semantics), and ``stopped`` is set.

``finish()`` releases what is held back when generation ends for another reason.

The window before the new token is usually the single previous token, so ``OneTokenMemo`` (one per
engine, shared by its streams) remembers single-token decodes: one real decode per token, not two.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class OneTokenMemo:
    """``decode``, with the text of each single token (and of no token) remembered after its first decode."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.memo: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> str:
        if len(ids) > 1:
            return self.decode(ids)
        key = ids[0] if ids else -1
        text = self.memo.get(key)
        if text is None:
            text = self.memo[key] = self.decode(ids)
        return text


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = 0       # ids[prefix:read] decode to text already accounted for
        self.read = 0
        self.pending = ""     # decoded but not yet released (a possible stop-string start)
        self.text = ""        # everything released so far
        self.stopped = False  # a stop string was found
        self.closed = False   # finish() was called

    def push(self, token_id: int) -> str:
        """Add one generated token; the newly releasable text ('' while held back)."""
        if self.stopped or self.closed:
            return ""
        self.ids.append(int(token_id))
        before = self.decode(self.ids[self.prefix: self.read])
        after = self.decode(self.ids[self.prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an unfinished character (or a token with no text, e.g. a special one)
        self.pending += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """Release what is held back (call when generation ends without a stop string), including an
        unfinished character at the very end (as U+FFFD, what a full decode of the ids gives)."""
        if self.stopped or self.closed:
            return ""
        before = self.decode(self.ids[self.prefix: self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before):
            self.pending += after[len(before):]
        self.prefix = self.read = len(self.ids)
        out = self._release(final=True)
        self.closed = True
        return out

    def _release(self, final: bool = False) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        # No stop string can straddle released and pending text: any tail that could start one is
        # held back (``_held_back``), so searching the pending text is enough. Earliest match wins.
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending, self.stopped = "", True
        else:
            keep = 0 if final else self._held_back()
            out = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of pending that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
