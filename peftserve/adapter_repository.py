"""Resolve client-supplied adapter ids to versioned directories inside the adapter repository.

Layout (the Triton way of versioning models): ``<root>/<adapter_id>/<version>/`` with integer versions;
the highest version that holds an ``adapter_config.json`` serves. Clients name adapters, never paths: an
id must match :data:`ADAPTER_ID_PATTERN` and must resolve, symlinks followed, to a directory inside the
root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from peftserve.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ADAPTER_CONFIG_FILE = "adapter_config.json"
# How many known ids a NOT_FOUND message lists before it says "and N more".
_LISTED_IDS = 20


@dataclass(frozen=True)
class AdapterVersion:
    """One servable version of an adapter."""

    adapter_id: str
    version: int
    path: Path

    @property
    def label(self) -> str:
        """The ``<adapter_id>@<version>`` string returned to clients as ``adapter_version``."""
        return f"{self.adapter_id}@{self.version}"


def validate_adapter_id(adapter_id: str) -> None:
    """Reject ids that are not plain names (paths, traversal, control characters, absurd lengths)."""
    if not ADAPTER_ID_PATTERN.fullmatch(adapter_id) or ".." in adapter_id:
        shown = adapter_id if len(adapter_id) <= 80 else adapter_id[:80] + "..."
        raise InvalidRequestError(
            f"invalid adapter_id {shown!r}: use 1-64 characters of letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, without '..'"
        )


class AdapterRepository:
    """Read-only view of the adapter directory; every lookup re-reads the directory (a few stats)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def adapter_ids(self) -> list[str]:
        """Ids that have at least one servable version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if ADAPTER_ID_PATTERN.fullmatch(entry.name) and self._versions(entry)
        )

    def latest(self, adapter_id: str) -> AdapterVersion:
        """The version that serves ``adapter_id`` now, or :class:`AdapterNotFoundError` naming it."""
        validate_adapter_id(adapter_id)
        directory = self._inside_root(self.root / adapter_id, adapter_id)
        versions = self._versions(directory) if directory.is_dir() else []
        if not versions:
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}; {self._available_text()}")
        version = versions[-1]
        path = self._inside_root(directory / str(version), adapter_id)
        return AdapterVersion(adapter_id=adapter_id, version=version, path=path)

    def _versions(self, directory: Path) -> list[int]:
        return sorted(
            int(child.name)
            for child in directory.iterdir()
            if child.name.isdigit() and (child / ADAPTER_CONFIG_FILE).is_file()
        )

    def _inside_root(self, path: Path, adapter_id: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise AdapterLoadError(
                f"adapter {adapter_id!r} resolves outside the adapter repository ({resolved}); "
                "symlinks out of the repository are refused"
            )
        return resolved

    def _available_text(self) -> str:
        ids = self.adapter_ids()
        if not ids:
            return f"the adapter repository {self.root} holds no adapters"
        listed = ", ".join(ids[:_LISTED_IDS])
        more = f" and {len(ids) - _LISTED_IDS} more" if len(ids) > _LISTED_IDS else ""
        return f"available adapters: {listed}{more}"
