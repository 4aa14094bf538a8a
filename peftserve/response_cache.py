"""Answers of fully determined requests, kept so that their repeats are answered without running the model.

Off unless ``response_cache_mb`` is set. The rules, and why each one exists:

- **Only determined requests.** A request is served from the cache, or stored in it, only if its answer is
  a function of its inputs: greedy (temperature 0) or sampled with an explicit ``seed`` (a sampled row
  draws from its own seeded generator, whatever else shares its batch). Sampling without a seed asks for a
  fresh draw each time, which a stored answer would take away.
- **No streams.** A streaming client asked for pieces as they are generated; a stored answer would come as
  one piece, and a stream's timing is what its client measures. Streams are neither served nor stored.
- **No per-call outputs.** Rows that record logits (the engine's smoke checks, tests) are never touched:
  the cache holds text, not logits.
- **Keyed by content.** The key is the SHA-256 content digest of the adapter version that serves the request
  *now* (:data:`BASE_MODEL_MARKER` for the base model) and a SHA-256 of the prompt's token ids (after
  chat-template rendering: exactly what the model reads) with every setting that can change the answer
  (:func:`request_digest`). So a hot-swap can never return an answer of the old version, a rollback to the
  same files finds its answers again, and two spellings of one prompt that tokenize alike share an answer.
  The base model, tokenizer and engine settings are fixed for an engine's life; a model swap starts a new
  engine, with an empty cache.
- **Label of now.** The stored answer is text, token count and finish reason. The ``adapter_version`` label is
  the version serving when the repeat arrives: identical files can be republished under a new number.
- **Errors are never stored:** they depend on the server's state (over limit, cancelled, cache full), not
  only on the request.
- **Bounded by bytes, least recently used first.** An entry counts its answer's UTF-8 bytes, its key and
  :data:`ENTRY_OVERHEAD_BYTES` for the Python objects that hold them; an answer larger than the whole
  cache is not stored.
- **Stores never wait.** Lookups run on the threads that submit requests, stores on the batching loop. One
  lock guards the entries and is held for a few dictionary operations; a store that finds it taken skips
  the answer (one later miss) instead of waiting, because a waiting loop stalls every running stream, and
  a submitting thread can be preempted while it holds the lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftserve.adapter_repository import AdapterVersion
    from peftserve.generation import GenerationRow, SamplingParams

BASE_MODEL_MARKER = "(base model)"  # the adapter part of the key for requests without an adapter
# Python objects per entry beyond the answer's and the key's bytes (OrderedDict node, key tuple, answer
# object, string and bytes headers): about 360 bytes measured with tracemalloc on CPython 3.11, rounded up.
ENTRY_OVERHEAD_BYTES = 400


@dataclasses.dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    output_tokens: int
    finish_reason: str


def is_determined(sampling: SamplingParams) -> bool:
    """True if the answer depends on the inputs alone: greedy, or sampled from an explicit seed."""
    return sampling.greedy or sampling.seed is not None


def serves(row: GenerationRow, *, streaming: bool) -> bool:
    """Whether a request may be answered from, and stored in, the cache (see the module's rules)."""
    return not streaming and not row.keep_logits and not row.keep_prompt_logits and is_determined(row.sampling)


def adapter_key(adapter_id: str, version: AdapterVersion | None) -> str:
    """The adapter part of a key: the content digest of ``version`` (the one serving, or the one that
    computed the answer), :data:`BASE_MODEL_MARKER` without an adapter, or "" when there is nothing to key by
    (an adapter that has not served yet): such requests neither hit nor store."""
    if not adapter_id:
        return BASE_MODEL_MARKER
    return version.digest if version is not None else ""


def request_digest(row: GenerationRow, stop: Sequence[str]) -> bytes:
    """SHA-256 of everything besides the adapter that decides a row's answer.

    The prompt's token ids, ``max_tokens`` after defaults, ``ignore_eos``, the stop strings as sent and the
    sampling settings. A greedy row takes the argmax and draws nothing, so its top_p, top_k and seed cannot
    change its answer and are left out. A new generation setting must join this key.
    """
    sampling = [] if row.sampling.greedy else list(dataclasses.astuple(row.sampling))
    canonical = [row.prompt_ids, row.max_new_tokens, row.ignore_eos, list(stop), sampling]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).digest()


class ResponseCache:
    """A least-recently-used map from (adapter digest, request digest) to answers, bounded by bytes."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, bytes], tuple[CachedAnswer, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the entries count (answers, keys and their per-entry overhead)."""
        return self._nbytes

    def get(self, adapter_digest: str, request: bytes) -> CachedAnswer | None:
        """The stored answer, now the most recently used; None if absent."""
        key = (adapter_digest, request)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, adapter_digest: str, request: bytes, answer: CachedAnswer) -> bool:
        """Store an answer, evicting the least recently used ones to stay within ``max_bytes``. Returns False
        without waiting when the lock is taken, or when the answer alone is larger than the cache."""
        size = len(answer.text.encode()) + len(adapter_digest) + len(request) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes or not self._lock.acquire(blocking=False):
            return False
        try:
            key = (adapter_digest, request)
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._nbytes -= previous[1]
            while self._entries and self._nbytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._nbytes -= evicted
            self._entries[key] = (answer, size)
            self._nbytes += size
            return True
        finally:
            self._lock.release()
