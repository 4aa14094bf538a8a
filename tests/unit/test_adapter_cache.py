import threading
import time
from dataclasses import dataclass

import pytest

from peftserve.adapter_cache import AdapterCache
from peftserve.errors import AdapterLoadError


@dataclass
class Blob:
    nbytes: int


def fill(cache: AdapterCache, key: str, size: int = 10) -> Blob:
    value = cache.acquire(key, lambda: Blob(size))
    cache.release(key)
    return value


def test_hits_do_not_reload_and_misses_do() -> None:
    loads = []
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=4, max_bytes=100)
    for _ in range(3):
        cache.acquire("a", lambda: loads.append("a") or Blob(1))
        cache.release("a")
    assert loads == ["a"]
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_least_recently_used_goes_first_when_count_is_full() -> None:
    evicted = []
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=2, max_bytes=1000, on_evict=evicted.append)
    fill(cache, "a")
    fill(cache, "b")
    fill(cache, "a")  # a is now the most recent
    fill(cache, "c")
    assert evicted == ["b"]
    assert "a" in cache and "c" in cache and len(cache) == 2


def test_bytes_bound_evicts_until_the_newcomer_fits() -> None:
    evicted = []
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=10, max_bytes=100, on_evict=evicted.append)
    for key in "abc":
        fill(cache, key, 30)
    fill(cache, "d", 70)  # 90 + 70 > 100: the two oldest go, 30 + 70 fits exactly
    assert evicted == ["a", "b"]
    assert cache.nbytes == 100


def test_pinned_and_leased_entries_survive_eviction() -> None:
    evicted = []
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=2, max_bytes=1000, on_evict=evicted.append)
    fill(cache, "pinned")
    cache.pin("pinned")
    cache.acquire("busy", lambda: Blob(1))  # leased by a batch in flight, not released
    with pytest.raises(AdapterLoadError, match="every entry pinned or in use"):
        fill(cache, "new")
    assert evicted == []
    cache.release("busy")
    fill(cache, "new")
    assert evicted == ["busy"]


def test_an_adapter_larger_than_the_cache_is_refused() -> None:
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=2, max_bytes=10)
    with pytest.raises(AdapterLoadError, match="more than the whole adapter cache"):
        fill(cache, "huge", 11)
    assert len(cache) == 0


class SlowBlob:
    """A value whose size takes a moment to read, so a reader of the cache's bytes yields mid-iteration."""

    @property
    def nbytes(self) -> int:
        time.sleep(0.0005)
        return 1


def test_bytes_can_be_read_while_other_threads_add_and_evict() -> None:
    """Loader threads report the cache's bytes while other loaders add to it (a background load once failed
    with RuntimeError: the entries changed size while they were summed)."""
    cache: AdapterCache[int, SlowBlob] = AdapterCache(max_entries=8, max_bytes=1 << 20)
    errors: list[BaseException] = []
    stop = threading.Event()

    def add() -> None:
        for key in range(400):
            cache.add(key, SlowBlob())
        stop.set()

    def read() -> None:
        try:
            while not stop.is_set():
                assert cache.nbytes <= 8
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=add), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_every_value_that_leaves_is_handed_to_on_drop() -> None:
    dropped: list[Blob] = []
    cache: AdapterCache[str, Blob] = AdapterCache(max_entries=2, max_bytes=1000, on_drop=dropped.append)
    evicted, retired_idle, retired_busy = fill(cache, "a"), fill(cache, "b"), Blob(1)
    fill(cache, "c")  # a is evicted
    cache.retire("b")  # idle: leaves now
    cache.acquire("busy", lambda: retired_busy)
    cache.retire("busy")  # leased: leaves when released
    assert dropped == [evicted, retired_idle]
    cache.release("busy")
    assert dropped == [evicted, retired_idle, retired_busy]
