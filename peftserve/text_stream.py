"""A row's growing token ids as text pieces: what streaming sends, equal in sum to the final answer.

Each step decodes only a short window of recent tokens, so a step costs the same early and late in a long
answer (decoding the whole answer every step made streaming quadratic in its length). Decoding a token can
depend on the tokens before it (SentencePiece drops the leading space of the first token it decodes;
byte-level BPE spreads one UTF-8 character over several tokens), so the window starts at a *prefix offset*
one step back: the text of the window minus the text of its prefix is the text of the new tokens. Text that
ends in U+FFFD may be an incomplete character, so it stays unconfirmed (the window grows) until a later
token completes it or follows it (bytes that never form a character keep the window growing until one does,
as in other serving engines).

A piece is sent only when it cannot change any more: confirmed text that could still turn into a stop string
is held back (the longest stop string, minus one character). Stop strings end the answer and are not part of
it; they are searched in the new text and the characters just before it. Blocked-content patterns are checked
before any text is sent (see :mod:`peftserve.blocked_content`). :meth:`TextStream.finish` decodes the whole
answer once, so the final answer is exactly the full decoding cut at the first stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from peftserve.blocked_content import BlockedContent

logger = logging.getLogger(__name__)

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding yields for the first bytes of an incomplete character
WITHHELD = "the answer was withheld"


class TextStream:
    def __init__(self, tokenizer, stops: Sequence[str] = (), blocked: BlockedContent | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.blocked = blocked
        self.stopped = False
        self._hold = max((len(stop) for stop in self.stops), default=1) - 1
        self._fed = 0  # tokens decoded so far
        self._prefix_offset = 0  # the window decoded each step starts here ...
        self._read_offset = 0  # ... and its text from here on is new
        self._prefix_text = ""  # the text of tokens [prefix_offset, read_offset) decoded on their own
        self._confirmed = 0  # characters of text that later tokens cannot change
        self._recent = ""  # the last characters of the confirmed text, where a stop string may have begun
        self._stop_at: int | None = None  # where the first stop string starts
        self._unsent: list[str] = []  # confirmed text not sent yet (joined only by ``update``)
        self._sent = 0  # characters sent
        self._sent_tail = ""  # what blocked-content checks need of the text already sent

    def reached_stop(self, token_ids: Sequence[int]) -> bool:
        """Whether a stop string appeared in the text so far (the row's ``should_stop`` hook)."""
        self._feed(token_ids)
        return self.stopped

    def update(self, token_ids: Sequence[int]) -> str:
        """The new piece of text that is safe to send now (may be empty)."""
        self._feed(token_ids)
        unsent = "".join(self._unsent)
        if self._stop_at is not None:
            unsent = unsent[: self._stop_at - self._sent]
        ready = len(unsent) if self.stopped else len(unsent) - self._hold
        if ready <= 0:
            self._unsent = [unsent]
            return ""
        piece = unsent[:ready]
        self._check_blocked(piece)
        self._unsent = [unsent[ready:]]
        self._sent += len(piece)
        return piece

    def finish(self, token_ids: Sequence[int]) -> tuple[str, str]:
        """(the last piece, the whole answer) once generation ended: one decoding of the whole answer."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cuts = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        self.stopped = bool(cuts)
        text = text[: min(cuts)] if cuts else text
        if self.blocked is not None:
            self.blocked.refuse(text, WITHHELD)
        if len(text) < self._sent:  # cannot happen for tokenizers whose windows decode like the whole
            logger.warning("the final answer is shorter than the %d characters already streamed", self._sent)
        piece = text[self._sent :]
        self._sent = len(text)
        return piece, text

    def _feed(self, token_ids: Sequence[int]) -> None:
        """Decode the tokens not seen yet: confirm their text and look for stop strings in it."""
        if len(token_ids) <= self._fed or self.stopped:
            return
        self._fed = len(token_ids)
        window = self.tokenizer.decode(token_ids[self._prefix_offset :], skip_special_tokens=True)
        new = window[len(self._prefix_text) :]
        if not new.endswith(REPLACEMENT_CHARACTER):
            prefix_text = self.tokenizer.decode(token_ids[self._read_offset :], skip_special_tokens=True)
            if prefix_text:  # else (e.g. special tokens only) the next window would start with no text before it
                self._prefix_offset, self._prefix_text = self._read_offset, prefix_text
            else:
                self._prefix_text = window
            self._read_offset = len(token_ids)
            self._find_stop(new)
            self._confirm(new)
        else:  # its text so far, without what may still be an incomplete character, can already hold a stop
            self._find_stop(new.rstrip(REPLACEMENT_CHARACTER))
            if self.stopped:
                self._confirm(new.rstrip(REPLACEMENT_CHARACTER))

    def _find_stop(self, new: str) -> None:
        """Stop strings that end in ``new``: they start in it or in the last (longest stop - 1) characters."""
        if not self.stops:
            return
        region = self._recent + new
        found = [index for index in (region.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped = True
            self._stop_at = self._confirmed - len(self._recent) + min(found)

    def _confirm(self, new: str) -> None:
        if self._hold:
            self._recent = (self._recent + new)[-self._hold :]
        self._unsent.append(new)
        self._confirmed += len(new)

    def _check_blocked(self, piece: str) -> None:
        """Refuse the answer if the text sent so far plus ``piece`` matches a blocked-content pattern."""
        if self.blocked is None:
            return
        self.blocked.refuse(self._sent_tail + piece, WITHHELD, checked=len(self._sent_tail))
        context = self.blocked.context
        self._sent_tail = self._sent_tail + piece
        if context is not None:
            self._sent_tail = self._sent_tail[-context:] if context else ""
