"""The two adapter tiers as a state machine: device cache, host tier, files, and hot-swaps across them."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from peftserve import engine as engine_module
from peftserve.adapter_repository import AdapterVersion, content_digest
from peftserve.config import ServeConfig, read_model_config
from peftserve.engine import Engine
from peftserve.errors import AdapterLoadError, AdapterNotFoundError
from peftserve.hot_swap import AdapterWatcher
from peftserve.metrics import EngineMetrics
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import DEMO_PHRASES, demo_config

PROMPT = "the cat looks at"


class HostTierMetrics(EngineMetrics):
    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.nbytes: list[int] = []
        self.waits: list[tuple[str, float]] = []

    def host_cache_event(self, event: str, adapter: str) -> None:
        self.events[(event, adapter)] += 1

    def host_cache_bytes(self, nbytes: int) -> None:
        self.nbytes.append(nbytes)

    def load_wait(self, adapter: str, *, seconds: float) -> None:
        self.waits.append((adapter, seconds))


@pytest.fixture
def file_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Adapter ids whose files the engine read, counted (the function every load goes through)."""
    reads: Counter[str] = Counter()
    real = engine_module.read_version

    def counting(path: Path, **kwargs):
        reads[path.parent.name] += 1
        return real(path, **kwargs)

    monkeypatch.setattr(engine_module, "read_version", counting)
    return reads


@pytest.fixture
def repository(model_dir: Path, tmp_path: Path) -> Path:
    """pirate and chef as shipped, and robot's adapter under the ids a, b and c (three of the same size)."""
    root = tmp_path / "adapters"
    for adapter_id, source in [("pirate", "pirate"), ("chef", "chef"), ("a", "robot"), ("b", "robot"), ("c", "robot")]:
        shutil.copytree(model_dir / "adapters" / source / "1", root / adapter_id / "1")
    return root


def make_engine(model_dir: Path, repository: Path, **overrides: str) -> Engine:
    """A device cache of one adapter, so that every other adapter's request evicts it."""
    config = demo_config(model_dir, adapter_repository=str(repository), max_loaded_adapters="1", **overrides)
    return Engine(config, metrics=HostTierMetrics())


def answer(engine: Engine, adapter_id: str) -> Completion:
    (result,) = engine.complete([CompletionRequest(PROMPT, adapter_id, max_tokens=24)])
    assert isinstance(result, Completion), result
    return result


def prompt_logits(engine: Engine, adapter_id: str) -> torch.Tensor:
    """Logits over the prompt with the adapter leased the way the batcher leases it (loading it if needed)."""
    row = engine.check_request(CompletionRequest(PROMPT, adapter_id, max_tokens=1))
    row.keep_prompt_logits = True
    version = engine.lease(row, adapter_id)
    try:
        return engine.batcher.run_rows([row])[0].prompt_logits
    finally:
        engine.cache.release(version)


def serving(engine: Engine, adapter_id: str) -> AdapterVersion:
    return engine.serving()[adapter_id]


def robot_bytes(engine: Engine) -> int:
    _, weights = engine.read_adapter(engine.repository.latest("robot"))
    return weights.nbytes


def test_device_eviction_comes_back_from_the_host_tier_without_reading_files(
    model_dir: Path, repository: Path, file_reads: Counter[str]
) -> None:
    engine = make_engine(model_dir, repository)
    before_logits, before = prompt_logits(engine, "pirate"), answer(engine, "pirate")
    assert DEMO_PHRASES["pirate"] in before.text
    assert file_reads["pirate"] == 1 and engine.metrics.events == {("miss", "pirate"): 1}
    pirate = serving(engine, "pirate")

    answer(engine, "chef")  # evicts pirate from the device cache (one slot)
    assert pirate not in engine.cache and pirate in engine.host_tier
    after_logits, after = prompt_logits(engine, "pirate"), answer(engine, "pirate")

    assert file_reads["pirate"] == 1, "a host-tier hit must not read the files"
    assert torch.equal(before_logits, after_logits) and after.text == before.text
    assert engine.metrics.events[("hit", "pirate")] == 1 and engine.metrics.events[("miss", "pirate")] == 1
    assert engine.metrics.nbytes[-1] == engine.host_tier.nbytes == sum(engine.host_tier.cache.sizes().values())


def test_requests_that_wait_for_their_adapter_report_the_wait(model_dir: Path, repository: Path) -> None:
    engine = make_engine(model_dir, repository)
    answer(engine, "pirate")  # first use: read from its files on a loader thread
    answer(engine, "chef")  # first use too; evicts pirate from the one device slot
    answer(engine, "pirate")  # back from the host tier: on CPU leased as it is, no loader, no wait
    answer(engine, "pirate")  # on the device: no wait
    assert [adapter for adapter, _ in engine.metrics.waits] == ["pirate", "chef"]
    assert all(seconds > 0 for _, seconds in engine.metrics.waits)


def test_on_cpu_a_host_tier_hit_joins_without_a_loader_and_answers_the_same(
    model_dir: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the host tier holds the tensors batches read: a device miss it holds is leased when the request
    joins, never queued behind a loader thread (which a busy decoding loop may leave waiting)."""
    engine = make_engine(model_dir, repository)
    before = answer(engine, "pirate")
    answer(engine, "chef")  # evicts pirate from the one device slot
    pirate = serving(engine, "pirate")
    assert pirate not in engine.cache and pirate in engine.host_tier
    loads: list[str] = []
    real_submit = engine.batcher._loaders.submit

    def recording_submit(function, work, *args):
        loads.append(work.request.adapter_id)
        return real_submit(function, work, *args)

    monkeypatch.setattr(engine.batcher._loaders, "submit", recording_submit)
    after = answer(engine, "pirate")

    assert loads == [] and after.text == before.text
    assert pirate in engine.cache  # leased into the device cache when it joined (evicting chef)
    assert serving(engine, "chef") not in engine.cache
    assert engine.metrics.events[("hit", "pirate")] == 1
    assert engine.resident_on_host("robot") is None  # never accepted: its first request needs a loader


def test_on_cpu_the_device_cache_holds_views_into_the_host_tiers_buffer(model_dir: Path, repository: Path) -> None:
    """An adapter in both tiers takes its bytes once on CPU: when accepted, and when back from the host tier."""
    engine = make_engine(model_dir, repository)

    def shares_the_buffer(adapter_id: str) -> bool:
        version = serving(engine, adapter_id)
        storage = engine.host_tier.cache.get(version).buffer.untyped_storage().data_ptr()
        return all(t.untyped_storage().data_ptr() == storage for t in engine.cache.get(version).tensors())

    answer(engine, "pirate")
    assert shares_the_buffer("pirate")
    answer(engine, "chef")  # evicts pirate from the one device slot
    assert shares_the_buffer("chef")
    assert DEMO_PHRASES["pirate"] in answer(engine, "pirate").text
    assert shares_the_buffer("pirate") and engine.metrics.events[("hit", "pirate")] == 1


def test_host_tier_evicts_least_recently_used_within_its_bytes(
    engine: Engine, model_dir: Path, repository: Path, file_reads: Counter[str]
) -> None:
    size = robot_bytes(engine)
    bound = 2 * size + size // 2  # room for two of a, b, c
    small = make_engine(model_dir, repository, host_adapter_cache_mb=str(bound / 2**20))
    for adapter_id in ["a", "b", "c"]:
        answer(small, adapter_id)
    held = {version.adapter_id for version in small.host_tier.cache.sizes()}
    assert held == {"b", "c"} and small.host_tier.nbytes == 2 * size <= bound

    assert DEMO_PHRASES["robot"] in answer(small, "b").text  # from the host tier: b is now the most recent
    assert file_reads["b"] == 1
    answer(small, "a")  # a host miss: read again, and c (least recently used) leaves
    assert file_reads["a"] == 2
    assert {version.adapter_id for version in small.host_tier.cache.sizes()} == {"a", "b"}
    assert small.host_tier.nbytes <= bound and small.metrics.nbytes[-1] == small.host_tier.nbytes
    assert small.metrics.events[("miss", "a")] == 2 and small.metrics.events[("hit", "b")] == 1


def test_host_miss_reads_the_files_again_and_checks_their_digest(
    engine: Engine, model_dir: Path, repository: Path, file_reads: Counter[str]
) -> None:
    one = make_engine(model_dir, repository, host_adapter_cache_mb=str(1.5 * robot_bytes(engine) / 2**20))
    first = answer(one, "a")
    answer(one, "b")  # evicts a from both tiers
    assert serving(one, "a") not in one.host_tier and file_reads["a"] == 1
    again = answer(one, "a")
    assert again.text == first.text and file_reads["a"] == 2  # read again, and its digest still matched
    assert serving(one, "a") in one.host_tier

    answer(one, "b")  # a leaves both tiers again; then its files change in place
    pirate_files = model_dir / "adapters" / "pirate" / "1" / "adapter_model.safetensors"
    shutil.copyfile(pirate_files, repository / "a" / "1" / "adapter_model.safetensors")
    (refused,) = one.complete([CompletionRequest(PROMPT, "a", max_tokens=24)])
    assert isinstance(refused, AdapterLoadError) and "changed on disk after it was accepted" in str(refused)
    assert serving(one, "a") not in one.host_tier


def test_what_is_hashed_is_what_is_parsed_even_if_the_files_change_after_the_read(
    model_dir: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = answer(make_engine(model_dir, repository), "a")
    real = engine_module.read_version

    def read_then_swapped(path: Path, **kwargs):
        read = real(path, **kwargs)
        pirate_files = model_dir / "adapters" / "pirate" / "1" / "adapter_model.safetensors"
        shutil.copyfile(pirate_files, path / "adapter_model.safetensors")  # changed in place right after
        return read

    monkeypatch.setattr(engine_module, "read_version", read_then_swapped)
    engine = make_engine(model_dir, repository)
    assert answer(engine, "a").text == expected.text  # robot's weights, as hashed: never pirate's
    assert serving(engine, "a").digest == content_digest(model_dir / "adapters" / "robot" / "1")


def test_a_swap_removes_the_old_version_from_both_tiers(model_dir: Path, repository: Path) -> None:
    engine = make_engine(model_dir, repository)
    watcher = AdapterWatcher(engine, interval=0)
    answer(engine, "pirate")
    old = serving(engine, "pirate")
    assert old in engine.cache and old in engine.host_tier
    shutil.copytree(model_dir / "adapters" / "robot" / "1", repository / "pirate" / "2")
    watcher.poll_once()

    new = serving(engine, "pirate")
    assert new.version == 2 and new in engine.host_tier
    assert old not in engine.cache and old not in engine.host_tier
    swapped = answer(engine, "pirate")
    assert swapped.adapter_version == "pirate@2" and DEMO_PHRASES["robot"] in swapped.text
    engine.reload(old)  # a loader that read the old version while it was retired must not bring it back
    assert old not in engine.host_tier

    answer(engine, "chef")  # pirate@2 leaves the device; its next request comes from the host tier
    assert DEMO_PHRASES["robot"] in answer(engine, "pirate").text
    assert engine.metrics.events[("hit", "pirate")] == 1

    shutil.rmtree(repository / "pirate")
    watcher.poll_once()
    assert new not in engine.host_tier and new not in engine.cache
    (gone,) = engine.complete([CompletionRequest(PROMPT, "pirate")])
    assert isinstance(gone, AdapterNotFoundError)
    assert engine.metrics.nbytes[-1] == engine.host_tier.nbytes


def test_tier_off_reads_files_on_every_device_miss_as_before(
    model_dir: Path, repository: Path, file_reads: Counter[str]
) -> None:
    engine = make_engine(model_dir, repository, host_adapter_cache_mb="0")
    first = answer(engine, "pirate")
    answer(engine, "chef")
    assert answer(engine, "pirate").text == first.text
    assert file_reads["pirate"] == 2 and len(engine.host_tier.cache) == 0
    assert not engine.metrics.events and not engine.metrics.nbytes


def test_host_tier_setting_default(model_dir: Path) -> None:
    assert ServeConfig.model_fields["host_adapter_cache_mb"].default == 4096
    shipped = read_model_config(model_dir)
    assert shipped.host_adapter_cache_mb == 4096 and shipped.host_adapter_cache_bytes == 4096 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: page-locked host copies")
def test_on_cuda_the_host_copy_is_pinned_and_comes_back_equal(engine: Engine) -> None:
    from peftserve.host_tier import HostAdapterTier
    from peftserve.packed_adapter import PackedAdapter

    tier = HostAdapterTier(max_bytes=2**30, device=torch.device("cuda"))
    version = engine.repository.latest("pirate")
    _, weights = engine.read_adapter(version)
    on_device = PackedAdapter.pack(weights).unpack(torch.device("cuda"))
    tier.keep(version, on_device)
    host = tier.cache.get(version)
    assert host.buffer.device.type == "cpu" and host.buffer.is_pinned()
    fetched = tier.fetch(version)
    for original, copied in zip(on_device.tensors(), fetched.tensors(), strict=True):
        assert copied.device == original.device and torch.equal(original, copied)
        assert copied.data_ptr() != original.data_ptr()


def test_a_slow_adapter_read_runs_beside_decoding_and_its_request_then_answers_exactly(
    model_dir: Path, repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefetch under a slow disk: while a cold adapter's files take a second to read on a loader thread,
    a running stream keeps decoding (the read does not hold the loop), and the cold request then answers as
    it does from a fast disk."""
    import threading
    import time

    from peftserve.continuous import Work

    engine = make_engine(model_dir, repository, max_tokens_limit="900")
    reading = threading.Event()
    real = engine_module.read_version

    def slow(path: Path, **kwargs):
        if path.parent.name == "a":
            reading.set()
            time.sleep(1.0)
        return real(path, **kwargs)

    monkeypatch.setattr(engine_module, "read_version", slow)
    pieces: list[float] = []
    stream = CompletionRequest(PROMPT, "pirate", max_tokens=900, ignore_eos=True)
    engine.batcher.submit(Work(stream, on_done=lambda _: None, on_text=lambda _: pieces.append(time.perf_counter())))
    while len(pieces) < 3:
        time.sleep(0.005)
    results: list[object] = []
    cold = threading.Thread(
        target=lambda: results.extend(engine.complete([CompletionRequest(PROMPT, "a", max_tokens=24)]))
    )
    cold.start()
    assert reading.wait(10)
    read_started = time.perf_counter()
    cold.join(60)
    engine.batcher.close()
    during_read = [t for t in pieces if read_started < t < read_started + 0.9]
    assert len(during_read) >= 5, f"the stream sent {len(during_read)} pieces during a 1 s adapter read"
    assert isinstance(results[0], Completion) and results[0].adapter_version == "a@1"
    monkeypatch.setattr(engine_module, "read_version", real)
    assert results[0].text == answer(make_engine(model_dir, repository), "a").text
