"""A row's growing token ids as text pieces: what streaming sends, equal in sum to the final answer.

A piece is sent only when it cannot change any more: text that could still turn into a stop string is
held back (the longest stop string, minus one character), as is an incomplete UTF-8 character at the end.
Stop strings end the answer and are not part of it; blocked-content patterns are checked on the text so
far before any of it is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding yields for the first bytes of an incomplete character


class TextStream:
    def __init__(
        self, tokenizer, stops: Sequence[str] = (), refuse_blocked: Callable[[str, str], None] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.refuse_blocked = refuse_blocked or (lambda text, what: None)
        self.sent = ""
        self.stopped = False
        self._hold = max((len(stop) for stop in self.stops), default=1) - 1
        self._decoded_tokens = 0

    def update(self, token_ids: Sequence[int]) -> str:
        """The new piece of text that is safe to send now (may be empty)."""
        if len(token_ids) == self._decoded_tokens:
            return ""
        self._decoded_tokens = len(token_ids)
        text, stopped = self._cut(self.tokenizer.decode(token_ids, skip_special_tokens=True))
        if not stopped:
            text = text[: len(text) - self._hold]
        text = text.rstrip(REPLACEMENT_CHARACTER)
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        self.refuse_blocked(text, "the answer was withheld")
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def finish(self, token_ids: Sequence[int]) -> tuple[str, str]:
        """(the last piece, the whole answer) once generation ended."""
        text, self.stopped = self._cut(self.tokenizer.decode(token_ids, skip_special_tokens=True))
        self.refuse_blocked(text, "the answer was withheld")
        piece = text[len(self.sent) :] if text.startswith(self.sent) else text
        self.sent = text
        return piece, text

    def _cut(self, text: str) -> tuple[str, bool]:
        matches = [text.find(stop) for stop in self.stops if stop in text]
        return (text[: min(matches)], True) if matches else (text, False)
