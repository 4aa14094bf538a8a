"""The serving engine: base model, adapter repository and cache, request checks and batched generation.

The serving path is :mod:`peftserve.continuous`, which uses ``prepare``/``resolve`` and the cache here.
``Engine.complete`` answers a whole batch at once (validation, benchmarks, tests): per request either a
:class:`Completion` or the :class:`PeftServeError` that request earned; one bad request never fails the
others, and a batch that fails as a whole is retried row by row so that only the culprit errors.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from peftserve.adapter_cache import AdapterCache
from peftserve.adapter_repository import AdapterRepository, AdapterVersion, content_digest
from peftserve.adapter_types import convert_adapter
from peftserve.adapter_weights import AdapterWeights, BaseModelShape, read_adapter_files
from peftserve.batched_layers import AdapterLayers
from peftserve.chat import parse_messages, render_messages
from peftserve.config import ServeConfig
from peftserve.errors import (
    AdapterLoadError,
    BlockedContentError,
    ConfigError,
    InvalidRequestError,
    PeftServeError,
)
from peftserve.generation import BatchGenerator, GenerationRow, SamplingParams
from peftserve.metrics import BASE_LABEL, UNKNOWN_LABEL, EngineMetrics
from peftserve.requests import Completion, CompletionRequest
from peftserve.smoke_check import smoke_check
from peftserve.text_stream import TextStream

logger = logging.getLogger("peftserve.engine")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """One base model serving many adapters.

    Thread-safe: ``complete`` and every change to the model (wrapping layers, filling the cache) hold one
    re-entrant lock, while reading and converting adapter files (``read_adapter``) needs none, so a
    background thread can prepare an adapter while batches for other adapters keep running.
    """

    def __init__(self, config: ServeConfig, *, device: str = "cpu", metrics: EngineMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self._lock = threading.RLock()
        self.device = torch.device(device)
        self.tokenizer, self.model = _load_base_model(config, self.device)
        self.base_shape = BaseModelShape.describe(self.model)
        self.layers = AdapterLayers(self.model)
        self.repository = AdapterRepository(Path(config.adapter_repository))
        self.cache: AdapterCache[AdapterVersion, AdapterWeights] = AdapterCache(
            max_entries=config.max_loaded_adapters,
            max_bytes=config.max_adapter_memory_bytes,
            on_evict=self._evicted,
        )
        eos = _eos_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos)
        self.generator = BatchGenerator(self.model, self.layers, eos_token_ids=eos, pad_token_id=pad)
        self._blocked = [re.compile(pattern) for pattern in config.blocked_patterns]
        self._serving: dict[str, AdapterVersion] = {}  # adapter id -> the version new requests get
        for adapter_id in config.preload:
            self.start_serving(*self.prepare_version(self.repository.latest(adapter_id)))
        self.report_cache()

    def read_adapter(self, version: AdapterVersion) -> tuple[AdapterVersion, AdapterWeights]:
        """Hash, read, check and convert one version; touches no shared state, so needs no lock.

        Returns the version with its content digest. A version that already has one (it was accepted
        before, then evicted) must still hash to it: files changed in place are refused, never served
        under the name of what was checked.
        """
        started = time.perf_counter()
        digest = content_digest(version.path)
        if version.digest and digest != version.digest:
            self.metrics.adapter_event("files_changed", version.adapter_id, version.version)
            raise AdapterLoadError(
                f"the files of adapter {version.label} changed on disk after it was accepted (sha256 "
                f"{version.digest[:12]}... now {digest[:12]}...); versions are immutable: publish the change as "
                "a new version"
            )
        config, tensors = read_adapter_files(version.path)
        weights = convert_adapter(config, tensors, self.base_shape)
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
        """Read a version and pass it through the smoke check: ready to serve, not serving yet."""
        version, weights = self.read_adapter(version)
        with self._lock:
            self.layers.wrap(list(weights.modules))
            self._smoke_check(version, weights)
        return version, weights

    def start_serving(self, version: AdapterVersion, weights: AdapterWeights) -> AdapterVersion | None:
        """Make ``version`` the one that new requests for its id get, atomically; returns the version it
        replaces, which batches in flight finish on and which is freed once they have drained."""
        with self._lock:
            self.cache.add(version, weights)
            if version.adapter_id in self.config.preload:
                self.cache.pin(version)
            previous = self._serving.get(version.adapter_id)
            self._serving[version.adapter_id] = version
            if previous is not None and previous != version:
                self.cache.retire(previous)
        self.metrics.serving_version(version.adapter_id, version.version)
        return previous

    def stop_serving(self, adapter_id: str) -> AdapterVersion | None:
        """Forget an adapter whose versions were all removed; its requests then get NOT_FOUND."""
        with self._lock:
            previous = self._serving.pop(adapter_id, None)
            if previous is not None:
                self.cache.retire(previous)
        self.metrics.serving_version(adapter_id, 0)
        return previous

    def serving(self) -> dict[str, AdapterVersion]:
        """The serving version of every adapter used so far (a snapshot)."""
        return dict(self._serving)

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

    def ensure_loaded(self, adapter_id: str) -> None:
        """Load an adapter into the cache; the slow part (files, conversion) runs outside the lock."""
        version = self.resolve(adapter_id)
        if version not in self.cache:
            weights = self.reload(version)
            with self._lock:
                self.cache.add(version, weights)

    @property
    def lock(self) -> threading.RLock:
        """Held by whoever runs the model: a batch, a decoding step, a smoke check, a switch."""
        return self._lock

    def reload(self, version: AdapterVersion) -> AdapterWeights:
        """Read an accepted version again after eviction (its digest must still match)."""
        _, weights = self.read_adapter(version)
        with self._lock:
            self.layers.wrap(list(weights.modules))
        return weights

    def _smoke_check(self, version: AdapterVersion, weights: AdapterWeights) -> None:
        def prompt_logits(text: str) -> torch.Tensor:
            return self.generator.prompt_logits([GenerationRow(self._encode_prompt(text), weights, 1)])[0]

        def greedy_answer(text: str, max_tokens: int) -> str:
            row = GenerationRow(self._encode_prompt(text), weights, max_tokens)
            return self.tokenizer.decode(self.generator.generate([row])[0].token_ids, skip_special_tokens=True)

        try:
            smoke_check(version.label, version.path, prompt_logits, greedy_answer)
        except AdapterLoadError:
            raise
        except PeftServeError as exc:  # e.g. a golden prompt longer than max_prompt_tokens
            raise AdapterLoadError(f"smoke check of {version.label} failed: {exc}") from exc

    def report_cache(self) -> None:
        """Publish what the adapter cache holds (metrics)."""
        by_adapter: dict[str, int] = {}
        for version, nbytes in self.cache.sizes().items():
            by_adapter[version.adapter_id] = by_adapter.get(version.adapter_id, 0) + nbytes
        self.metrics.cache_state(loaded=len(by_adapter), nbytes=sum(by_adapter.values()), by_adapter=by_adapter)

    def _evicted(self, version: AdapterVersion) -> None:
        self.metrics.cache_event("eviction", version.adapter_id)
        logger.info("evicted adapter %s", version.label)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion | PeftServeError]:
        """Answer one batch; element ``i`` answers ``requests[i]``."""
        with self._lock:
            return self._complete(requests)

    def _complete(self, requests: Sequence[CompletionRequest]) -> list[Completion | PeftServeError]:
        started = time.perf_counter()
        results: list[Completion | PeftServeError | None] = [None] * len(requests)
        labels = [BASE_LABEL if not request.adapter_id else UNKNOWN_LABEL for request in requests]
        prepared: list[tuple[int, GenerationRow, str]] = []
        leased: list[AdapterVersion] = []
        try:
            for index, request in enumerate(requests):
                try:
                    row, version = self.lease(request)
                    if version is not None:
                        labels[index] = version.adapter_id
                        leased.append(version)
                    prepared.append((index, row, version.label if version else ""))
                except PeftServeError as exc:
                    results[index] = exc
                except Exception as exc:
                    logger.exception("preparing request %d failed", index)
                    results[index] = PeftServeError(f"internal error preparing the request: {type(exc).__name__}")
            outputs = self._generate_isolating_failures([row for _, row, _ in prepared])
            for (index, _, label), output in zip(prepared, outputs, strict=True):
                if isinstance(output, PeftServeError):
                    results[index] = output
                else:
                    results[index] = self._completion(requests[index], output, label)
        finally:
            for version in leased:
                self.cache.release(version)
        seconds = time.perf_counter() - started
        for label, result in zip(labels, results, strict=True):
            failed = isinstance(result, PeftServeError)
            self.metrics.request_done(
                label,
                error_code=result.triton_code if failed else None,
                seconds=seconds,
                tokens=0 if failed else result.output_tokens,
            )
        self.report_cache()
        return results  # type: ignore[return-value]

    def _completion(self, request: CompletionRequest, output, label: str) -> Completion | PeftServeError:
        stream = TextStream(self.tokenizer, request.stop, self.refuse_blocked)
        try:
            _, text = stream.finish(output.token_ids)
        except BlockedContentError as exc:
            return exc
        reason = "stop" if stream.stopped else output.finish_reason
        return Completion(text, label, len(output.token_ids), reason)

    def refuse_blocked(self, text: str, what: str) -> None:
        """Operators' blocked-content patterns; the message gives the pattern's index, not the pattern."""
        for index, pattern in enumerate(self._blocked):
            if pattern.search(text):
                raise BlockedContentError(f"{what}: it matches blocked-content pattern #{index} (blocked_patterns)")

    def _stop_condition(self, stops: tuple[str, ...]):
        limit = self.config.max_stop_strings
        if len(stops) > limit:
            raise InvalidRequestError(f"stop has {len(stops)} strings, at most {limit} allowed (max_stop_strings)")
        for stop in stops:
            if not stop or len(stop.encode()) > self.config.max_stop_string_bytes:
                raise InvalidRequestError(
                    f"each stop string must have 1 to {self.config.max_stop_string_bytes} bytes "
                    f"(max_stop_string_bytes), got {len(stop.encode())}"
                )
        if not stops:
            return None
        return lambda ids: any(stop in self.tokenizer.decode(ids, skip_special_tokens=True) for stop in stops)

    def lease(self, request: CompletionRequest) -> tuple[GenerationRow, AdapterVersion | None]:
        """``prepare`` plus the adapter attached to the row and leased from the cache (reloaded if it was
        evicted); the caller releases the returned version with ``cache.release`` once the row is done."""
        row, version = self.prepare(request)
        if version is not None:
            row.adapter = self.cache.acquire(version, lambda: self.reload(version))
        return row, version

    def prepare(self, request: CompletionRequest) -> tuple[GenerationRow, AdapterVersion | None]:
        """Check one request and turn it into a generation row (adapter not yet attached)."""
        prompt_ids = self._prompt_ids(request)
        should_stop = self._stop_condition(tuple(request.stop))
        max_tokens = self.config.default_max_tokens if request.max_tokens is None else request.max_tokens
        if not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {self.config.max_tokens_limit} (max_tokens_limit), got {max_tokens}"
            )
        sampling = _sampling_params(request)
        version = self.resolve(request.adapter_id) if request.adapter_id else None
        row = GenerationRow(
            prompt_ids, None, max_tokens, sampling, ignore_eos=bool(request.ignore_eos), should_stop=should_stop
        )
        return row, version

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
        self.refuse_blocked(text, f"{what} refused")
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        if not ids:  # an empty prompt still needs one position to start from
            ids = [
                self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.generator.pad_token_id
            ]
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequestError(
                f"{what} has {len(ids)} tokens, more than max_prompt_tokens ({self.config.max_prompt_tokens})"
            )
        return ids

    def _generate_isolating_failures(self, rows: list[GenerationRow]) -> list:
        if not rows:
            return []
        try:
            return self.generator.generate(rows)
        except Exception as exc:
            if len(rows) == 1:
                logger.exception("generation failed")
                return [PeftServeError(f"generation failed: {type(exc).__name__}: {exc}")]
            logger.warning("batch of %d failed (%s); retrying row by row", len(rows), exc)
            return [self._generate_isolating_failures([row])[0] for row in rows]


def _sampling_params(request: CompletionRequest) -> SamplingParams:
    temperature = 0.0 if request.temperature is None else float(request.temperature)
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    top_k = 0 if request.top_k is None else int(request.top_k)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
        raise InvalidRequestError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    seed = None if request.seed is None else int(request.seed) % (1 << 63)
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)


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
            attn_implementation=config.attn_implementation,
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
