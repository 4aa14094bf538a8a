"""The audit log of adapter versions: every publish, switch, rejection and rollback, one JSON line each.

The log lives in the adapter repository (``.history.jsonl``; a dot name is never an adapter id), so the
operator tools and every server replica that watches the repository write to the same place. Each line is
written with one ``write`` on a file opened for appending, which the kernel keeps whole between writers
on a local file system.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HISTORY_FILE = ".history.jsonl"


@dataclass(frozen=True)
class HistoryEvent:
    event: str  # published, switched, rejected, removed, files_changed, rolled_back, model_loaded, ...
    adapter: str
    version: int | None
    outcome: str  # ok, failed, refused
    sha256: str = ""
    detail: str = ""
    source: str = ""  # who recorded it: "tools" or "server:<pid>"
    time: float = field(default_factory=time.time)


class SwapHistory:
    def __init__(self, repository_root: Path) -> None:
        self.path = Path(repository_root) / HISTORY_FILE

    def record(self, event: HistoryEvent) -> None:
        line = (json.dumps(asdict(event), sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)

    def read(self, *, adapter: str | None = None, limit: int | None = None) -> list[HistoryEvent]:
        """Events oldest first; lines that do not parse (a torn tail after a crash) are skipped."""
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                event = HistoryEvent(**json.loads(line))
            except (ValueError, TypeError):
                continue
            if adapter is None or event.adapter == adapter:
                events.append(event)
        return events[-limit:] if limit else events
