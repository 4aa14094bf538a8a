"""Operators' blocked-content patterns, checked on prompts once and on answers as they grow.

A streamed answer is checked before each piece is sent, so that no blocked text ever leaves. Searching the
whole answer each time would cost O(answer length) per piece. For most patterns it need not: a regular
expression whose match can only examine a bounded number of characters from where it starts (its *reach*:
what it consumes, plus what its look-arounds and its ``\\b``/``$``-like assertions look at) cannot newly
match text that was already searched unless the match examines the new text, so it starts at most
``reach - 1`` characters before the new text. Such patterns are searched over the new text and a window of
about twice their reach before it (the part before the search start is context for look-behinds, ``\\b``
and ``^``). A pattern with no such bound (``.*``, ``+``, ``{n,}``) can match from anywhere, so it is still
searched over the whole answer for every piece: exact, and O(answer length) per piece only for those.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

# The standard library's own regular-expression parser (private modules of Python 3.11, which the image pins).
from re import _constants as sre_constants
from re import _parser as sre_parse

from peftserve.errors import BlockedContentError

UNBOUNDED = sre_constants.MAXREPEAT
BOUNDARY_LOOK = 2  # ``$`` looks at the character after the match and whether the text ends after it


class BlockedContent:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [re.compile(pattern) for pattern in patterns]
        self._reaches = [pattern_reach(pattern) for pattern in self.patterns]
        bounded = [reach for reach in self._reaches if reach is not None]
        # Characters of already-checked text a check of new text needs in front of it (None: all of it).
        self.context: int | None = None if len(bounded) < len(self._reaches) else 2 * max(bounded, default=0)

    def refuse(self, text: str, what: str, checked: int = 0) -> None:
        """Raise :class:`BlockedContentError` if ``text`` matches a pattern; the message gives the pattern's
        index, not the pattern. ``text[:checked]`` was checked before (and matched none); when it is shorter
        than the whole text so far, it must hold at least :attr:`context` characters."""
        for index, (pattern, reach) in enumerate(zip(self.patterns, self._reaches, strict=True)):
            start = 0 if reach is None else max(0, checked - reach + 1)
            if pattern.search(text, start):
                raise BlockedContentError(f"{what}: it matches blocked-content pattern #{index} (blocked_patterns)")


def pattern_reach(pattern: re.Pattern[str]) -> int | None:
    """How many characters from where a match starts the regular-expression engine may look at (a bound
    that may be generous), or None when there is no bound."""
    tree = sre_parse.parse(pattern.pattern, pattern.flags)
    widths = [tree.getwidth()[1], *(body.getwidth()[1] for body in _assertion_bodies(tree))]
    if any(width >= UNBOUNDED for width in widths):
        return None
    return sum(widths) + BOUNDARY_LOOK


def _assertion_bodies(tree) -> Iterator:
    """The bodies of every look-ahead and look-behind in a parsed pattern, nested ones included."""
    for op, argument in tree.data:
        if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            yield argument[1]
        parts = argument if isinstance(argument, (tuple, list)) else (argument,)
        for part in parts:
            for sub in part if isinstance(part, list) else (part,):
                if isinstance(sub, sre_parse.SubPattern):
                    yield from _assertion_bodies(sub)
