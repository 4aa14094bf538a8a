"""The serving engine: base model, adapter repository and cache, request checks, and its batcher.

Every answer comes out of one place, the continuous batcher (:mod:`peftserve.continuous`), which owns the
model's forward passes: Triton's models submit to it, and :meth:`Engine.complete` (validation, benchmarks,
tests) is a synchronous client of it, so every test exercises what serves. The engine prepares what the
batcher runs: checked requests, adapters read, converted and smoke-checked on the caller's thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftserve.adapter_cache import AdapterCache
from peftserve.adapter_repository import AdapterRepository, AdapterVersion, read_version
from peftserve.adapter_status import AdapterStates
from peftserve.adapter_types import convert_adapter
from peftserve.adapter_weights import ADAPTER_FILES, AdapterWeights, BaseModelShape, parse_adapter_files
from peftserve.batched_layers import CPU_SLOTS_FROM_ADAPTERS, AdapterLayers
from peftserve.blocked_content import BlockedContent
from peftserve.chat import parse_messages, render_messages
from peftserve.config import ServeConfig
from peftserve.continuous import ContinuousBatcher, Work
from peftserve.cpu_weights import lay_out_for_cpu_matmul
from peftserve.decode_graphs import DecodeGraphs
from peftserve.errors import (
    AdapterLoadError,
    AdapterNotReady,
    CacheFullError,
    ConfigError,
    InvalidRequestError,
    PeftServeError,
)
from peftserve.generation import GenerationRow, ModelRunner, SamplingParams, cache_argument
from peftserve.host_tier import HostAdapterTier
from peftserve.kv_cache import PagedKVCache, probe_layer_shapes
from peftserve.metrics import EngineMetrics
from peftserve.requests import Completion, CompletionRequest
from peftserve.slot_path import SlotPath
from peftserve.smoke_check import smoke_check

logger = logging.getLogger("peftserve.engine")

# Room per request for an adapter's prefix or virtual tokens when the KV cache is sized automatically.
_VIRTUAL_TOKEN_ALLOWANCE = 64
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """One base model serving many adapters through one continuous batcher.

    Thread-safe. The batcher's loop thread runs every forward pass, holding :attr:`lock` only while it
    does; anything that changes the model (wrapping layers for a new adapter) takes the same lock, briefly.
    Reading, converting and smoke-checking adapters happen on the caller's thread (a loader, the watcher).
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        device: str = "cpu",
        metrics: EngineMetrics | None = None,
        base: tuple[PreTrainedTokenizerBase, PreTrainedModel] | None = None,
    ) -> None:
        """``base`` hands over a tokenizer and a model already on ``device`` (benchmarks of random models
        too large to write to disk); otherwise ``config.base_model`` is loaded. On a CPU, either model's float32
        linear weights are then stored column-major in place (peftserve.cpu_weights): same values and shapes."""
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self._reported_cache: dict[str, int] | None = None  # what report_cache published last
        self._lock = threading.RLock()  # the model: forward passes and wrapping layers
        self._serving_lock = threading.Lock()  # which version serves each adapter id
        # Reading and converting hold the GIL most of the time: only loader_threads do it at once, while more
        # threads may wait on their smoke checks (see ensure_loaded).
        self._reads = threading.BoundedSemaphore(config.loader_threads)
        self._loads: dict[str, Future[None]] = {}  # adapter id -> its load in progress
        self._loads_lock = threading.Lock()
        self.device = torch.device(device)
        self.tokenizer, self.model = base or _load_base_model(config, self.device)
        lay_out_for_cpu_matmul(self.model)
        self.base_shape = BaseModelShape.describe(self.model)
        self.layers = AdapterLayers(self.model, probe=partial(_probe_forward, self.model, self.device))
        slots_from = _slot_tables_from(config, self.device)
        if slots_from is not None:
            # Twice the running rows: the last pass's batch (still installed) plus every row joining now.
            path = SlotPath(slots_per_bucket=2 * config.max_running_rows, device=self.device)
            self.layers.use_slot_path(path, from_adapters=slots_from)
        self.repository = AdapterRepository(Path(config.adapter_repository))
        self.cache: AdapterCache[AdapterVersion, AdapterWeights] = AdapterCache(
            max_entries=config.max_loaded_adapters,
            max_bytes=config.max_adapter_memory_bytes,
            on_evict=self._evicted,
            on_drop=self.layers.forget,
        )
        self.host_tier = HostAdapterTier(max_bytes=config.host_adapter_cache_bytes, device=self.device)
        eos = _eos_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos)
        self.kv_cache = _paged_cache(config, self.model, self.base_shape.dtype, self.device)
        self.runner = ModelRunner(self.model, self.layers, self.kv_cache, eos_token_ids=eos, pad_token_id=pad)
        if config.packed_steps:
            self.runner.check_packing()
        self._choose_kv_reads(config)
        self._choose_decode_graphs(config)
        self.batcher = ContinuousBatcher(self, self.kv_cache)
        self.blocked = BlockedContent(config.blocked_patterns)
        self._serving: dict[str, AdapterVersion] = {}  # adapter id -> the version new requests get
        self.adapter_states = AdapterStates()  # what a status request reports (adapter_status.py)
        for adapter_id in config.preload:
            self.start_serving(*self.prepare_version(self.repository.latest(adapter_id)))
        self.report_cache()

    def _choose_kv_reads(self, config: ServeConfig) -> None:
        """In-place KV reads where asked for, or by default on CUDA, once checked on this model."""
        wanted = config.kv_reads
        if wanted == "gathered" or (wanted == "auto" and self.device.type != "cuda"):
            return
        why_not = self.runner.check_reads_in_place()
        if why_not is None:
            logger.info("decoding and packed passes read the KV cache in place (paged attention kernels)")
        elif wanted == "in_place":
            raise ConfigError(f"kv_reads=in_place: {why_not}")
        else:
            logger.warning("forward passes gather the KV cache: %s", why_not)

    def _choose_decode_graphs(self, config: ServeConfig) -> None:
        """Decoding steps through CUDA graphs where asked for, or by default where they can run, once checked."""
        wanted = config.decode_graphs
        if wanted == "off" or (wanted == "auto" and self.device.type != "cuda"):
            return
        why_not = None
        if self.device.type != "cuda":
            why_not = "CUDA graphs need a CUDA device"
        elif not self.kv_cache.reads_in_place:
            why_not = "decoding passes gather the KV cache (kv_reads)"
        elif self.layers.slot_path is None or self.layers.slots_from != 0:
            why_not = "not every batch's adapters are computed through slot tables (adapter_compute)"
        else:
            longest = config.max_prompt_tokens + config.max_tokens_limit + _VIRTUAL_TOKEN_ALLOWANCE
            graphs = DecodeGraphs(
                self.runner,
                max_rows=config.max_running_rows,
                longest_tokens=longest,
                capture=True,
                on_capture=self.metrics.decode_graph_captured,
            )
            why_not = graphs.verify()
            if why_not is None:
                self.runner.graphs = graphs
                logger.info("decoding steps replay CUDA graphs (batch sizes %s)", graphs.sizes)
                return
            graphs.close()
        if wanted == "on":
            raise ConfigError(f"decode_graphs=on: {why_not}")
        logger.warning("decoding steps run eagerly: %s", why_not)

    def read_adapter(self, version: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        """Hash, read, check and convert one version; touches no shared state, so needs no lock.

        Returns the version with its content digest. A version that already has one (it was accepted
        before, then evicted) must still hash to it: files changed in place are refused, never served
        under the name of what was checked.
        """
        with self._reads:
            return self._read_adapter(version)

    def _read_adapter(self, version: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        started = time.perf_counter()
        if self.host_tier.enabled:  # every read from files is a host-tier miss
            self.metrics.host_cache_event("miss", version.adapter_id)
        digest, files = read_version(version.path, keep=ADAPTER_FILES)
        if version.digest and digest != version.digest:
            self.metrics.adapter_event("files_changed", version.adapter_id, version.version)
            raise AdapterLoadError(
                f"the files of adapter {version.label} changed on disk after it was accepted (sha256 "
                f"{version.digest[:12]}... now {digest[:12]}...); versions are immutable: publish the change as "
                "a new version"
            )
        config, tensors = parse_adapter_files(files, version.path)
        weights = self.host_tier.runtime_form(convert_adapter(config, tensors, self.base_shape))
        seconds = time.perf_counter() - started
        self.metrics.adapter_loaded(version.adapter_id, seconds=seconds, nbytes=weights.nbytes)
        logger.info(
            "loaded adapter %s (%s, %d bytes, sha256 %s) in %.1f ms",
            version.label,
            weights.peft_type,
            weights.nbytes,
            digest[:12],
            1000 * seconds,
        )
        return replace(version, digest=digest), weights

    def prepare_version(self, version: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        """Read a version and pass it through the smoke check: ready to serve, not serving yet. A failure is
        recorded as the adapter's rejected version (with its reason) before it is raised."""
        adapter_id, number, path = version.adapter_id, version.version, version.path
        self.adapter_states.loading(adapter_id, number)
        try:
            version, weights = self.read_adapter(version)
            self.layers.wrap(list(weights.modules), lock=self._lock)
            self._smoke_check(version, weights)
        except Exception as exc:
            if path.is_dir():  # a version retired while it was read (the tools' rollback) is gone, not rejected
                # The reason goes to API clients (the status request): no host paths in it.
                self.adapter_states.rejected(adapter_id, number, str(exc).replace(f"{self.repository.root}/", ""))
            raise
        finally:
            self.adapter_states.loading_done(adapter_id, number)
        return version, weights

    def start_serving(self, version: AdapterVersion, weights: AdapterWeights) -> AdapterVersion | None:
        """Make ``version`` the one that new requests for its id get, atomically; returns the version it
        replaces, which batches in flight finish on and which is freed once they have drained."""
        with self._serving_lock:
            self.host_tier.keep(version, weights)
            try:
                self.cache.add(version, weights)
            except CacheFullError:  # it serves all the same: requests hold its weights until a slot frees
                logger.info("adapter %s accepted while the cache is full", version.label)
            if version.adapter_id in self.config.preload:
                self.cache.pin(version)
            previous = self._serving.get(version.adapter_id)
            self._serving[version.adapter_id] = version
            if previous is not None and previous != version:
                self.cache.retire(previous)
                self.host_tier.drop(previous)
        self.adapter_states.serving(version.adapter_id, version.version, version.digest)
        self.metrics.serving_version(version.adapter_id, version.version)
        self._report_host_tier()
        return previous

    def stop_serving(self, adapter_id: str) -> AdapterVersion | None:
        """Forget an adapter whose versions were all removed; its requests then get NOT_FOUND."""
        with self._serving_lock:
            previous = self._serving.pop(adapter_id, None)
            if previous is not None:
                self.cache.retire(previous)
                self.host_tier.drop(previous)
        self.adapter_states.retired(adapter_id)
        self.metrics.serving_version(adapter_id, 0)
        self._report_host_tier()
        return previous

    def serving(self) -> dict[str, AdapterVersion]:
        """The serving version of every adapter used so far (a snapshot)."""
        return dict(self._serving)

    def current_version(self, adapter_id: str) -> AdapterVersion | None:
        """The version new requests for ``adapter_id`` get now; None if it has not served yet or was removed."""
        return self._serving.get(adapter_id)

    def resolve(self, adapter_id: str) -> AdapterVersion:
        """The version that serves ``adapter_id``; the first request for an id accepts its latest version."""
        version = self._serving.get(adapter_id)
        if version is None:
            version, weights = self.prepare_version(self.repository.latest(adapter_id))
            self.start_serving(version, weights)
        return version

    def adapter_loaded(self, adapter_id: str) -> bool | None:
        """True if the adapter's serving version is in memory, False if it must be loaded, None if the id
        does not resolve (its requests get their error without waiting for anything)."""
        version = self._serving.get(adapter_id)
        if version is not None:
            return version in self.cache
        try:
            self.repository.latest(adapter_id)
        except PeftServeError:
            return None
        return False

    def resident_on_host(self, adapter_id: str) -> tuple[AdapterVersion, AdapterWeights] | None:
        """The serving version and its weights when the host tier holds them in the memory batches read
        (CPU), so a request can lease them as they are, without a loader: no copy, no file read; None when
        they must be loaded (a GPU's copy, a host miss, an id that has not served yet)."""
        version = self._serving.get(adapter_id)
        if version is None or not self.host_tier.shares_device_memory:
            return None
        weights = self.host_tier.fetch(version)
        if weights is None:
            return None
        self.metrics.host_cache_event("hit", adapter_id)
        return version, weights

    def ensure_loaded(self, adapter_id: str) -> tuple[AdapterVersion, AdapterWeights] | None:
        """Load an adapter into the cache (on the caller's thread). When every cache entry is in use, the
        loaded version and weights are returned instead, for the request to hold until a slot frees.

        Concurrent calls for one adapter share one load: the first reads, converts and smoke-checks it, the
        others wait for it and then take the loaded adapter, or raise its error. Many first requests for one
        adapter (a hot adapter's, after a restart) would otherwise each read and check it.
        """
        with self._loads_lock:
            load = self._loads.get(adapter_id)
            first = load is None
            if first:
                load = self._loads[adapter_id] = Future()
        if not first:
            load.result()
            return self._ensure_loaded(adapter_id)
        try:
            loaded = self._ensure_loaded(adapter_id)
        except BaseException as exc:
            load.set_exception(exc)
            raise
        else:
            load.set_result(None)
            return loaded
        finally:
            with self._loads_lock:
                del self._loads[adapter_id]

    def _ensure_loaded(self, adapter_id: str) -> tuple[AdapterVersion, AdapterWeights] | None:
        version = self._serving.get(adapter_id)
        if version is None:
            version, weights = self.prepare_version(self.repository.latest(adapter_id))
            self.start_serving(version, weights)
        elif version in self.cache:
            return None
        else:
            weights = self.reload(version)
        if version in self.cache:
            return None
        try:
            self.cache.add(version, weights)
        except CacheFullError:
            return version, weights
        return None

    @property
    def lock(self) -> threading.RLock:
        """Held while the model runs a forward pass or changes (layers wrapped for a new adapter)."""
        return self._lock

    def reload(self, version: AdapterVersion) -> AdapterWeights:
        """An accepted version back after device eviction: copied from the host tier, or else read from its
        files again (their digest must still match) and kept in the host tier while it still serves."""
        weights = self.host_tier.fetch(version)
        if weights is not None:
            self.metrics.host_cache_event("hit", version.adapter_id)
            return weights  # its layers were wrapped when it was accepted
        _, weights = self.read_adapter(version)
        self.layers.wrap(list(weights.modules), lock=self._lock)
        with self._serving_lock:  # a version retired meanwhile must not come back into the host tier
            if self._serving.get(version.adapter_id) == version:
                self.host_tier.keep(version, weights)
        self._report_host_tier()
        return weights

    def _smoke_check(self, version: AdapterVersion, weights: AdapterWeights) -> None:
        def prompt_logits(text: str) -> torch.Tensor:
            row = GenerationRow(self._encode_prompt(text), weights, 1, keep_prompt_logits=True)
            return self.batcher.run_rows([row])[0].prompt_logits

        def greedy_answer(text: str, max_tokens: int) -> str:
            row = GenerationRow(self._encode_prompt(text), weights, max_tokens)
            return self.tokenizer.decode(self.batcher.run_rows([row])[0].token_ids, skip_special_tokens=True)

        try:
            smoke_check(version.label, version.path, prompt_logits, greedy_answer)
        except AdapterLoadError:
            raise
        except PeftServeError as exc:  # e.g. a golden prompt longer than max_prompt_tokens
            raise AdapterLoadError(f"smoke check of {version.label} failed: {exc}") from exc

    def report_cache(self) -> None:
        """Publish what the adapter cache holds (metrics), if it changed since the last report.

        The batching loop asks after every pass, and under Triton each published gauge is a call into the
        server (~30 us, holding the GIL; measured in a stub): republishing a full cache of 16 adapters after
        every pass cost about half a millisecond per pass, while the cache changes only when adapters load or
        leave.
        """
        by_adapter: dict[str, int] = {}
        for version, nbytes in self.cache.sizes().items():
            by_adapter[version.adapter_id] = by_adapter.get(version.adapter_id, 0) + nbytes
        if by_adapter == self._reported_cache:
            return
        self._reported_cache = by_adapter
        self.metrics.cache_state(loaded=len(by_adapter), nbytes=sum(by_adapter.values()), by_adapter=by_adapter)

    def _report_host_tier(self) -> None:
        if self.host_tier.enabled:
            self.metrics.host_cache_bytes(self.host_tier.nbytes)

    def _evicted(self, version: AdapterVersion) -> None:
        self.metrics.cache_event("eviction", version.adapter_id)
        logger.info("evicted adapter %s", version.label)

    def complete(
        self, requests: Sequence[CompletionRequest], timeout: float = 600.0
    ) -> list[Completion | PeftServeError]:
        """Answer requests through the batcher and wait; element ``i`` answers ``requests[i]`` (a Completion,
        or the error that request earned: one bad request never fails the others)."""
        done = threading.Event()
        results: list[Completion | PeftServeError | None] = [None] * len(requests)
        missing = [len(requests)]
        guard = threading.Lock()

        def answer(index: int, result: Completion | PeftServeError) -> None:
            results[index] = result
            with guard:
                missing[0] -= 1
                if not missing[0]:
                    done.set()

        self.batcher.submit(
            *(
                Work(request, on_done=lambda result, i=index: answer(i, result))
                for index, request in enumerate(requests)
            )
        )
        if requests and not done.wait(timeout):
            raise TimeoutError(f"{missing[0]} of {len(requests)} requests unanswered after {timeout} s")
        return results  # type: ignore[return-value]

    def _check_stops(self, stops: tuple[str, ...]) -> None:
        """Stop strings are searched by the batcher's :class:`TextStream`, which also ends the row at one."""
        limit = self.config.max_stop_strings
        if len(stops) > limit:
            raise InvalidRequestError(f"stop has {len(stops)} strings, at most {limit} allowed (max_stop_strings)")
        for stop in stops:
            if not stop or len(stop.encode()) > self.config.max_stop_string_bytes:
                raise InvalidRequestError(
                    f"each stop string must have 1 to {self.config.max_stop_string_bytes} bytes "
                    f"(max_stop_string_bytes), got {len(stop.encode())}"
                )

    def lease(
        self,
        row: GenerationRow,
        adapter_id: str,
        *,
        load: bool = True,
        loaded: tuple[AdapterVersion, AdapterWeights] | None = None,
    ) -> AdapterVersion | None:
        """Attach the serving version of ``adapter_id`` to ``row``, leased from the cache; the caller releases
        the returned version with ``cache.release`` once the row is done. With ``load=False`` (the batching
        loop, which must never read files) an adapter neither in memory nor in ``loaded`` (what
        :meth:`ensure_loaded` returned) raises :class:`AdapterNotReady`."""
        if not adapter_id:
            return None
        version = self.resolve(adapter_id) if load else self._serving.get(adapter_id)
        if version is None:
            raise AdapterNotReady(adapter_id)
        if loaded is not None and loaded[0] == version:
            fetch = lambda: loaded[1]  # noqa: E731
        else:
            fetch = (lambda: self.reload(version)) if load else _not_ready
        row.adapter = self.cache.acquire(version, fetch)
        return version

    def prepare(self, request: CompletionRequest) -> tuple[GenerationRow, AdapterVersion | None]:
        """``check_request`` plus the version that serves its adapter (loaded if needed; not attached)."""
        row = self.check_request(request)
        return row, self.resolve(request.adapter_id) if request.adapter_id else None

    def check_request(self, request: CompletionRequest) -> GenerationRow:
        """Check one request and turn it into a generation row (its adapter is attached by :meth:`lease`, its
        stop strings by the batcher, whose text stream of the row searches them)."""
        prompt_ids = self._prompt_ids(request)
        self._check_stops(tuple(request.stop))
        max_tokens = self.config.default_max_tokens if request.max_tokens is None else request.max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {self.config.max_tokens_limit} (max_tokens_limit), got {max_tokens}"
            )
        sampling = _sampling_params(request)
        return GenerationRow(prompt_ids, None, max_tokens, sampling, ignore_eos=bool(request.ignore_eos))

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        """``text_input`` as sent, or ``messages`` rendered with the chat template (``text_input`` then empty).

        The limits (bytes, tokens, blocked patterns) apply to the rendered prompt, which is what the model reads.
        """
        if not request.messages:
            return self._encode_prompt(request.text)
        if request.text:
            raise InvalidRequestError("text_input must be empty when messages is set: send the prompt in one of them")
        messages = parse_messages(request.messages, max_bytes=self.config.max_prompt_bytes)
        rendered = render_messages(self.tokenizer, messages)
        return self._encode_prompt(rendered, what="the rendered messages", add_special_tokens=False)

    def _encode_prompt(
        self, text: str | bytes, *, what: str = "text_input", add_special_tokens: bool = True
    ) -> list[int]:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from exc
        size = len(text.encode("utf-8"))
        if size > self.config.max_prompt_bytes:
            raise InvalidRequestError(
                f"{what} has {size} bytes, more than max_prompt_bytes ({self.config.max_prompt_bytes})"
            )
        self.blocked.refuse(text, f"{what} refused")
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        if not ids:  # an empty prompt still needs one position to start from
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.runner.pad_token_id]
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequestError(
                f"{what} has {len(ids)} tokens, more than max_prompt_tokens ({self.config.max_prompt_tokens})"
            )
        return ids


def _probe_forward(model: PreTrainedModel, device: torch.device) -> None:
    """One token through the base model, no cache: shows AdapterLayers which wrapped layers are siblings."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)


def _sampling_params(request: CompletionRequest) -> SamplingParams:
    temperature, top_p, top_k = float(request.temperature), float(request.top_p), int(request.top_k)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
        raise InvalidRequestError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    seed = None if request.seed is None else int(request.seed) % (1 << 63)
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


def _not_ready() -> AdapterWeights:
    raise AdapterNotReady("adapter evicted")


def _paged_cache(config: ServeConfig, model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> PagedKVCache:
    """The KV cache sized by ``kv_cache_memory_mb`` (or, when 0, what a full batch can use, within free memory),
    laid out as the model's layers actually cache (probed with one token)."""
    shapes = probe_layer_shapes(model, cache_argument(model))
    per_token = PagedKVCache.token_bytes(shapes, dtype)
    budget = config.kv_cache_memory_mb * 1024 * 1024
    if not budget:  # automatic: what a full batch of the longest requests can use, within the memory there is
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            available = free * config.kv_cache_free_memory_fraction
        else:
            available = 1024 * 1024 * 1024
        longest = config.max_prompt_tokens + config.max_tokens_limit + _VIRTUAL_TOKEN_ALLOWANCE
        budget = min(available, config.max_running_rows * longest * per_token)
    blocks = int(budget // (per_token * config.kv_block_size))
    if blocks < 2:
        raise ConfigError(
            f"kv_cache_memory_mb={config.kv_cache_memory_mb} holds {blocks} KV blocks of {config.kv_block_size} "
            f"tokens ({per_token} bytes per token); at least 2 are needed"
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%.0f MiB)",
        blocks,
        config.kv_block_size,
        blocks * config.kv_block_size * per_token / 2**20,
    )
    return PagedKVCache(
        layer_shapes=shapes, num_blocks=blocks, block_size=config.kv_block_size, dtype=dtype, device=device
    )


def _load_base_model(config: ServeConfig, device: torch.device) -> tuple[AutoTokenizer, PreTrainedModel]:
    # "auto": float32 on CPU (half precision is slow there), the checkpoint's own dtype on a GPU.
    dtype = _DTYPES.get(config.dtype) or (torch.float32 if device.type == "cpu" else "auto")
    try:
        # Never run code from the model repository; read only local files (no hub on serving hosts).
        tokenizer = AutoTokenizer.from_pretrained(config.base_model, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            config.base_model,
            dtype=dtype,
            trust_remote_code=False,
            local_files_only=True,
            # None lets transformers pick what the model supports (sdpa where it can, eager for Gemma2, Bloom).
            attn_implementation=None if config.attn_implementation == "auto" else config.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load base_model {config.base_model!r}: {exc}. Set the base_model parameter to a local model "
            "directory or the id of a model in the local Hugging Face cache (run `make demo` for the demo model)"
        ) from exc
    return tokenizer, model.to(device).eval()


def _eos_token_ids(model: PreTrainedModel, tokenizer: AutoTokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("the base model defines no eos_token_id; generation would never stop early")
    return ids


def _slot_tables_from(config: ServeConfig, device: torch.device) -> int | None:
    """The distinct adapters from which a batch goes through slot tables (0: every batch; None: none)."""
    if config.adapter_compute == "auto":
        return 0 if device.type == "cuda" else CPU_SLOTS_FROM_ADAPTERS
    return 0 if config.adapter_compute == "slot_tables" else None
