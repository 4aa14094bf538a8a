"""Resolve client-supplied adapter ids to versioned directories inside the adapter repository.

Layout (the Triton way of versioning models): ``<root>/<adapter_id>/<version>/`` with integer versions;
the highest version that holds an ``adapter_config.json`` serves. Clients name adapters, never paths: an
id must match :data:`ADAPTER_ID_PATTERN` and must resolve, symlinks followed, to a directory inside the
root.

A version's identity is its content: :func:`content_digest` hashes its files, and the engine keys loaded
adapters by that digest, so a version is never served under another's name. Directories whose names are
not integers (``.staging-*``, ``.retired``) are invisible to serving; tools stage and retire there.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection
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
    digest: str = ""  # SHA-256 of the files (content_digest), set once the engine has read them

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
        """The highest version of ``adapter_id`` on disk, or :class:`AdapterNotFoundError` naming it."""
        versions = self.versions(adapter_id)
        if not versions:
            raise AdapterNotFoundError(f"unknown adapter {adapter_id!r}; {self._available_text()}")
        return versions[-1]

    def versions(self, adapter_id: str) -> list[AdapterVersion]:
        """Every servable version of ``adapter_id``, oldest first (empty if the id is unknown)."""
        validate_adapter_id(adapter_id)
        directory = self._inside_root(self.root / adapter_id, adapter_id)
        numbers = self._versions(directory) if directory.is_dir() else []
        return [
            AdapterVersion(adapter_id, number, self._inside_root(directory / str(number), adapter_id))
            for number in numbers
        ]

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


def content_digest(directory: Path) -> str:
    """SHA-256 over the names and bytes of every regular file in a version directory (sorted, recursive)."""
    return read_version(directory, keep=())[0]


def read_version(directory: Path, keep: Collection[str]) -> tuple[str, dict[str, bytes]]:
    """:func:`content_digest` of a version, and the bytes of its files named in ``keep`` (relative names),
    read once: what is hashed is what gets parsed, even if the files change while being read. Every other
    file is hashed as it streams and listed with empty bytes (its presence can matter, its size is not
    bounded)."""
    digest = hashlib.sha256()
    files: dict[str, bytes] = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_symlink():
            raise AdapterLoadError(f"{path} is a symlink; adapter files must be regular files inside the repository")
        if not path.is_file():
            continue
        name = path.relative_to(directory).as_posix()
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            if name in keep:
                files[name] = handle.read()
                digest.update(files[name])
            else:
                files[name] = b""
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest(), files


def recorded_digest(directory: Path) -> str:
    """``content_digest`` for logs and history: empty when the files cannot be hashed (gone, unreadable, a
    symlink), since what is being recorded is often exactly such a failure."""
    try:
        return content_digest(directory)
    except (OSError, AdapterLoadError):
        return ""


def stat_signature(directory: Path) -> tuple:
    """Names, sizes and modification times of a version's files: a cheap test for "changed since"."""
    try:
        with os.scandir(directory) as entries:
            stats = [(entry.name, entry.stat()) for entry in entries if entry.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))
