"""What a server says about its adapters when asked: the status document and the states it is built from.

The operator tools learn a rollout's outcome from this document (one status request per server, see
docs/shipping.md), not from metrics or the history file: it says, per adapter id the server knows, which
version serves, with which content digest, whether a candidate is loading, and which version was
rejected and why. :class:`AdapterStates` is the engine's record of those facts, written where they happen
(a version is prepared, starts serving, is rejected, is retired); :func:`server_status` reads it together
with what the engine serves and holds in memory. Free of torch: the tools parse the document with
:meth:`ServerStatus.from_json`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftserve.engine import Engine

# The request parameter that asks a server for this document instead of a completion.
STATUS_PARAMETER = "peftserve_status"
# Bumped when a field changes meaning or disappears; new fields may appear without a bump.
SCHEMA_VERSION = 1


class AdapterState(StrEnum):
    SERVING = "serving"  # serving_version answers requests; nothing newer is being checked
    LOADING = "loading"  # loading_version is being read and smoke-checked (serving_version, if any, serves)
    REJECTED = "rejected"  # the last candidate failed; serving_version (if any) keeps serving
    RETIRED = "retired"  # every version left the repository; requests for the id get NOT_FOUND


@dataclass(frozen=True)
class AdapterStatus:
    adapter: str
    state: AdapterState
    serving_version: int | None = None
    sha256: str = ""  # content digest of the serving version
    loading_version: int | None = None
    rejected_version: int | None = None  # the last version that failed its load or smoke check (kept after)
    rejection_reason: str = ""
    changed_at: str = ""  # ISO-8601 UTC time of the last change of this entry
    loaded_bytes: int = 0  # bytes of this adapter in the device cache (0: evicted, reloads on demand)


@dataclass(frozen=True)
class ServerStatus:
    model: str
    model_version: int
    adapters: tuple[AdapterStatus, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def adapter(self, adapter_id: str) -> AdapterStatus | None:
        return next((entry for entry in self.adapters if entry.adapter == adapter_id), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ServerStatus:
        """Parse a status document; unknown fields (from a newer server) are ignored."""
        document = json.loads(text)
        if document.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"status schema_version {document.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        known = AdapterStatus.__dataclass_fields__
        adapters = tuple(
            AdapterStatus(**{**{k: v for k, v in entry.items() if k in known}, "state": AdapterState(entry["state"])})
            for entry in document["adapters"]
        )
        return cls(document["model"], int(document["model_version"]), adapters)


@dataclass
class _Record:
    serving_version: int | None = None
    sha256: str = ""
    loading: Counter[int] = field(default_factory=Counter)  # version -> preparations in flight
    rejected_version: int | None = None
    rejection_reason: str = ""
    last: AdapterState = AdapterState.SERVING
    changed_at: float = field(default_factory=time.time)


class AdapterStates:
    """Thread-safe record of each adapter id's serving, loading, rejected and retired versions.

    Only ids that resolved to a version on disk are recorded (the engine calls in after resolving), so
    requests naming invented ids cannot grow it.
    """

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def loading(self, adapter_id: str, version: int) -> None:
        with self._lock:
            record = self._touch(adapter_id)
            record.loading[version] += 1

    def loading_done(self, adapter_id: str, version: int) -> None:
        with self._lock:
            record = self._records.get(adapter_id)
            if record is not None:
                record.loading[version] -= 1
                record.loading += Counter()  # drops the versions no longer loading

    def rejected(self, adapter_id: str, version: int, reason: str) -> None:
        with self._lock:
            record = self._touch(adapter_id)
            record.rejected_version, record.rejection_reason, record.last = version, reason, AdapterState.REJECTED

    def serving(self, adapter_id: str, version: int, sha256: str) -> None:
        with self._lock:
            record = self._touch(adapter_id)
            record.serving_version, record.sha256, record.last = version, sha256, AdapterState.SERVING

    def retired(self, adapter_id: str) -> None:
        with self._lock:
            record = self._touch(adapter_id)
            record.serving_version, record.sha256, record.last = None, "", AdapterState.RETIRED

    def snapshot(self, loaded_bytes: dict[str, int] | None = None) -> tuple[AdapterStatus, ...]:
        """Every recorded adapter, sorted by id; ``loaded_bytes`` maps ids to their bytes in memory."""
        loaded_bytes = loaded_bytes or {}
        with self._lock:
            return tuple(
                AdapterStatus(
                    adapter=adapter_id,
                    state=AdapterState.LOADING if record.loading else record.last,
                    serving_version=record.serving_version,
                    sha256=record.sha256,
                    loading_version=max(record.loading) if record.loading else None,
                    rejected_version=record.rejected_version,
                    rejection_reason=record.rejection_reason,
                    changed_at=datetime.fromtimestamp(record.changed_at, UTC).isoformat(timespec="seconds"),
                    loaded_bytes=loaded_bytes.get(adapter_id, 0),
                )
                for adapter_id, record in sorted(self._records.items())
            )

    def _touch(self, adapter_id: str) -> _Record:
        record = self._records.setdefault(adapter_id, _Record())
        record.changed_at = time.time()
        return record


def server_status(engine: Engine, *, model: str, model_version: int) -> ServerStatus:
    """The status document of ``engine``, served under ``model`` at ``model_version``. Reads snapshots only
    (no lock the batching loop holds), so it answers while a swap or a forward pass is in flight."""
    loaded: dict[str, int] = {}
    for version, nbytes in engine.cache.sizes().items():
        loaded[version.adapter_id] = loaded.get(version.adapter_id, 0) + nbytes
    return ServerStatus(model, model_version, engine.adapter_states.snapshot(loaded))
