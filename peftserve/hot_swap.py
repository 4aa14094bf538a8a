"""Adapter hot-swap: notice new, changed and removed versions in the repository and switch safely.

Like Triton's repository polling, but per adapter and without reloading the base model: every ``interval``
seconds the watcher reads a fingerprint of each adapter the engine serves (its version directories' names
and times, the serving version's files, a few ``stat`` calls) and looks closer only at adapters whose
fingerprint changed, so a poll over thousands of served adapters stays short (measured with 1,000: 532 ms of
Python holding the GIL per poll when every adapter was listed and resolved in full, which slowed decoding by
a fifth). When the highest version differs from the serving one — a new version was published, or the
serving one was retired by a rollback — the candidate is loaded and smoke-checked in the background and then
switched in atomically (:meth:`Engine.start_serving`); batches in flight finish on the old version.
A candidate that fails keeps the previous version serving and is remembered as rejected (until its files
change), with a log line, a metric and a history record; the engine records it with its reason in the
adapter status (:mod:`peftserve.adapter_status`), which the operator tools ask for.
"""

from __future__ import annotations

import logging
import os
import threading

from peftserve.adapter_repository import AdapterVersion, recorded_digest, stat_signature
from peftserve.continuous import run_torch_single_threaded
from peftserve.engine import Engine
from peftserve.swap_history import HistoryEvent, SwapHistory

logger = logging.getLogger("peftserve.hot_swap")


class AdapterWatcher:
    def __init__(self, engine: Engine, *, interval: float, history: SwapHistory | None = None) -> None:
        self.engine = engine
        self.interval = interval
        self.history = history or SwapHistory(engine.repository.root)
        self.source = f"server:{os.getpid()}"
        self._rejected: dict[tuple[str, int], tuple] = {}  # (id, version) -> file signature when rejected
        self._checked: dict[AdapterVersion, tuple] = {}  # serving version -> file signature verified last
        self._seen: dict[str, tuple] = {}  # adapter id -> fingerprint when last checked in full
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="adapter-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        run_torch_single_threaded()  # new versions are read, converted and smoke-checked from here
        while not self._stop.wait(self.interval):
            self.poll_once()

    def poll_once(self) -> None:
        for adapter_id, serving in self.engine.serving().items():
            try:
                self._check(adapter_id, serving)
            except Exception:  # one adapter's trouble must not stop the watch of the others
                logger.exception("checking adapter %r for new versions failed", adapter_id)

    def _fingerprint(self, adapter_id: str, serving: AdapterVersion) -> tuple:
        """What can change for one adapter, read cheaply: each version directory's name and modification time
        (a version added, removed, or completed by writing its files, changes them), the serving version's
        files (changed in place) and the files of its rejected versions (fixed in place, they are tried
        again)."""
        directory = self.engine.repository.root / adapter_id
        try:
            with os.scandir(directory) as entries:
                versions = tuple(sorted((entry.name, entry.stat().st_mtime_ns) for entry in entries))
        except OSError:
            versions = ()
        rejected = tuple(
            stat_signature(directory / str(version))
            for (rejected_id, version) in self._rejected
            if rejected_id == adapter_id
        )
        return serving, versions, stat_signature(serving.path), rejected

    def _check(self, adapter_id: str, serving: AdapterVersion) -> None:
        fingerprint = self._fingerprint(adapter_id, serving)
        if self._seen.get(adapter_id) != fingerprint:
            self._check_in_full(adapter_id, serving)
            self._seen[adapter_id] = fingerprint  # only once checked: a check that failed runs again

    def _check_in_full(self, adapter_id: str, serving: AdapterVersion) -> None:
        on_disk = self.engine.repository.versions(adapter_id)
        if not on_disk:
            self.engine.stop_serving(adapter_id)
            self._event("removed", serving, "ok", f"no version of {adapter_id} left in the repository")
            return
        candidates = [v for v in on_disk if self._rejected.get((adapter_id, v.version)) != stat_signature(v.path)]
        if not candidates:
            return
        target = candidates[-1]
        if target.version != serving.version:
            self._switch(serving, target)
        else:
            self._verify_unchanged(serving)

    def _switch(self, serving: AdapterVersion, target: AdapterVersion) -> None:
        try:
            version, weights = self.engine.prepare_version(target)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a candidate rejects it
            if not target.path.is_dir():  # retired while it was read (the tools roll back a rejected version)
                logger.info(
                    "adapter %s was retired while it was checked; %s keeps serving", target.label, serving.label
                )
                return
            self._rejected[(target.adapter_id, target.version)] = stat_signature(target.path)
            logger.error("adapter %s rejected, %s keeps serving: %s", target.label, serving.label, exc)
            self._event(
                "rejected", target, "failed", f"{exc}; {serving.label} keeps serving", recorded_digest(target.path)
            )
            return
        self.engine.start_serving(version, weights)
        self._checked[version] = stat_signature(version.path)
        logger.info("adapter %s now serves (was %s)", version.label, serving.label)
        self._event("switched", version, "ok", f"replaced {serving.label}", version.digest)

    def _verify_unchanged(self, serving: AdapterVersion) -> None:
        """Hash the serving version's files again whenever their size or time changes."""
        signature = stat_signature(serving.path)
        if self._checked.get(serving) == signature:
            return
        self._checked[serving] = signature
        digest = recorded_digest(serving.path)
        if digest and digest != serving.digest:
            logger.warning(
                "files of adapter %s changed in place (sha256 %s... now %s...); the copy checked at load keeps "
                "serving, and it will not be reloaded from these files: publish a new version instead",
                serving.label,
                serving.digest[:12],
                digest[:12],
            )
            self._event("files_changed", serving, "refused", "files changed without a new version", digest)

    def _event(self, event: str, version: AdapterVersion, outcome: str, detail: str, digest: str = "") -> None:
        self.engine.metrics.adapter_event(event, version.adapter_id, version.version)
        self.history.record(
            HistoryEvent(event, version.adapter_id, version.version, outcome, digest, detail, self.source)
        )
