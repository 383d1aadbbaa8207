"""When a generated row ends, and its text: the one place that decides it (EOS, a stop string, the token budget).

A `RowText` takes a row's tokens one at a time and decodes only the few tokens since the last complete
character (as TGI and vLLM detokenize), and looks for the stop strings only where one could have just
appeared (the new text and the longest stop string's length before it), so a token costs the same at the
end of a long row as at its start.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def truncate_at_stop(text: str, stop: str | Sequence[str] | None) -> str:
    """text before the first occurrence of any stop string ("" stops nothing)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return text[: min((text.find(s) for s in stops if s and s in text), default=len(text))]


class RowText:
    """One row's generated text, a token at a time.

    `append(token)` returns whether the row has ended: `finish_reason` is then "stop" (EOS or a stop string;
    `text` is cut before it) or "length" (`max_new` tokens). `end(reason)` ends it from outside (the context
    is full, the client went away). `ready()` is the text that can be shown now: whole characters, and none
    that could still turn out to start a stop string."""

    def __init__(self, tokenizer: Decoder | None, eos: int | None, stop: str | Sequence[str] | None = (),
                 max_new: int | None = None, tokens: list[int] | None = None):
        self.tokenizer, self.eos, self.max_new = tokenizer, eos, max_new
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters that may start a stop string
        self.tokens = [] if tokens is None else tokens  # as generated, EOS included (appended to the list given)
        self.text = ""  # whole characters so far, before any stop string
        self.lengths = [0]  # len(text) after each number of tokens
        self.finish_reason: str | None = None
        self.stopped = False  # by a stop string
        self._text_ids: list[int] = []  # the tokens that make text (not EOS)
        self._prefix = self._read = 0  # _text_ids[_prefix:_read] decoded to the text's end; those after, not yet

    @classmethod
    def of(cls, tokenizer: Decoder | None, eos: int | None, tokens: Sequence[int],
           stop: str | Sequence[str] | None = ()) -> "RowText":
        """The ended row of these generated tokens."""
        row = cls(tokenizer, eos, stop)
        for token in tokens:
            if row.append(token):
                break
        row.end()
        return row

    def append(self, token: int) -> bool:
        if self.finish_reason is not None:
            raise ValueError("this row has ended")
        self.tokens.append(token)
        if token == self.eos:
            self._finish("stop")
        else:
            self._text_ids.append(token)
            self._add(self._decode(final=False))
            if self.finish_reason is None and self.max_new is not None and len(self.tokens) >= self.max_new:
                self._finish("length")
        self.lengths.append(len(self.text))
        return self.finish_reason is not None

    def end(self, reason: str = "length") -> None:
        """End the row here (unless it has ended)."""
        if self.finish_reason is None:
            self._finish(reason)
            self.lengths[-1] = len(self.text)

    def ready(self) -> str:
        """The text that can be shown: all of it once the row has ended, else all but what may start a stop."""
        ended, text = self.finish_reason is not None, self.text  # (each read once: another thread may append)
        return text if ended else text[: max(0, len(text) - self.hold)]

    def kept_tokens(self) -> list[int]:
        """The generated tokens that make `text`: up to the one that completes it when a stop string cut it,
        else all but EOS."""
        if not self.stopped:
            return [t for t in self.tokens if t != self.eos]
        count = bisect.bisect_left(self.lengths, len(self.text))
        return [t for t in self.tokens[:count] if t != self.eos]

    def _finish(self, reason: str) -> None:
        if not self.stopped:
            self._add(self._decode(final=True))  # bytes of an unfinished character, as the full decode shows them
        self.finish_reason = "stop" if self.stopped else reason

    def _decode(self, final: bool) -> str:
        ids = self._text_ids
        if self.tokenizer is None or self._read == len(ids):  # (a model without a tokenizer: tokens only)
            return ""
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        now = self.tokenizer.decode(ids[self._prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""  # no whole character yet
        self._prefix, self._read = self._read, len(ids)
        return now[len(before):]

    def _add(self, new: str) -> None:
        if not new or self.stopped:
            return
        start = max(0, len(self.text) - self.hold)  # a stop string can only end in the new text
        text = self.text + new
        window = truncate_at_stop(text[start:], self.stop)
        self.stopped = start + len(window) < len(text)
        self.text = text[: start + len(window)]  # (one assignment: another thread may read it)
        if self.stopped:
            self.finish_reason = "stop"
