"""Decoding steps that read the paged KV cache in place: the kernel, the cache's hand-over, the engine.

The kernels are triton-lang; on CPU they run under triton's interpreter in a child process
(tests/interpreted_triton.py), and so do the engines that use them. References are independent: attention
over keys gathered row by row, an engine that gathers, and the model's own full forward pass. Half precision
is checked in float16: triton 3.7's interpreter multiplies bfloat16 matrices wrongly (``tl.dot`` of two
bfloat16 tiles returns values near 1e10 for inputs near 1), so bfloat16 is left to the compile test
(tests/unit/test_triton_compiles.py) and to the engine's startup check on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftserve.config import ServeConfig
from peftserve.engine import Engine
from peftserve.errors import ConfigError
from peftserve.generation import GenerationRow
from peftserve.kv_cache import LayerShape, PagedKVCache
from peftserve.paged_attention import InPlaceRead, hand_over, packed_tiles, paged_attention
from peftserve.requests import CompletionRequest
from tests.conftest import DEMO_PHRASES, PROMPTS, demo_config
from tests.interpreted_triton import interpreter_process
from tests.unit.test_sliding_window import PROMPTS as LONG_PROMPTS
from tests.unit.test_sliding_window import hybrid_dir, mistral_dir, reference_logits  # noqa: F401 - fixtures

ADAPTERS = ["", *DEMO_PHRASES]

# (query heads, kv heads, head dim, cache block, row lengths, window, splits)
KERNEL_CASES = {
    "one-head-per-group": (4, 4, 16, 4, [1, 4, 5, 70], 0, 1),
    "grouped-query": (6, 2, 12, 4, [3, 37, 64, 65], 0, 1),
    "window-inside-a-block": (6, 2, 12, 4, [1, 9, 37, 70], 3, 1),
    "window-longer-than-rows": (4, 1, 8, 16, [2, 20, 100], 30, 1),
    "groups-of-more-than-16-heads": (40, 2, 16, 8, [5, 130], 0, 1),
    "split-rows-some-splits-empty": (6, 2, 12, 4, [1, 9, 64, 200], 0, 3),
    "split-rows-with-a-window": (8, 2, 16, 4, [2, 77, 300], 100, 4),
}


def interpreted_kernel(*args, **kwargs) -> torch.Tensor:
    """In the interpreter child: the kernel itself."""
    from peftserve.paged_attention_triton import paged_decode_attention

    return paged_decode_attention(*args, **kwargs)


def gathered_attention(query, keys, values, table, lengths, cache_block: int, scale: float, window: int):
    """Row by row: gather the row's keys in order, keep its window, run sdpa (grouped heads repeated)."""
    rows = []
    for row, length in enumerate(lengths.tolist()):
        positions = torch.arange(max(length - window, 0) if window else 0, length)
        slots = table[row].long()[positions // cache_block] * cache_block + positions % cache_block
        group = query.shape[1] // keys.shape[1]
        k = keys[slots].transpose(0, 1).repeat_interleave(group, 0)
        v = values[slots].transpose(0, 1).repeat_interleave(group, 0)
        rows.append(torch.nn.functional.scaled_dot_product_attention(query[row][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(rows)


def scattered_pool(lengths: list[int], cache_block: int, kv_heads: int, head_dim: int, generator: torch.Generator):
    """A block pool of random keys and values and a block table giving each row of ``lengths`` its own blocks
    in a shuffled order (block 0 never handed out; unused table entries point at it, as the cache's do)."""
    blocks_per_row = [-(-length // cache_block) for length in lengths]
    pool_blocks = sum(blocks_per_row) + 3
    keys = torch.randn(pool_blocks * cache_block, kv_heads, head_dim, generator=generator)
    values = torch.randn(pool_blocks * cache_block, kv_heads, head_dim, generator=generator)
    order = (torch.randperm(pool_blocks - 1, generator=generator) + 1).to(torch.int32)
    table = torch.zeros(len(lengths), max(blocks_per_row) + 2, dtype=torch.int32)
    taken = 0
    for row, count in enumerate(blocks_per_row):
        table[row, :count] = order[taken : taken + count]
        taken += count
    return keys, values, table


@pytest.fixture(scope="module")
def interpreter():
    with interpreter_process() as process:
        yield process


HALF = {"rtol": 2e-3, "atol": 2e-3}
EXACT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_interpreted_kernel_equals_attention_over_gathered_keys(interpreter, case, dtype: torch.dtype) -> None:
    query_heads, kv_heads, head_dim, cache_block, lengths, window, splits = case
    generator = torch.Generator().manual_seed(len(lengths) + window)
    keys, values, table = scattered_pool(lengths, cache_block, kv_heads, head_dim, generator)
    query = torch.randn(len(lengths), query_heads, head_dim, generator=generator)
    query, keys, values = (tensor.to(dtype) for tensor in (query, keys, values))
    lengths = torch.tensor(lengths, dtype=torch.int32)
    scale = 0.7 / head_dim**0.5
    got = interpreter.run(
        interpreted_kernel, query, keys, values, table, lengths, cache_block=cache_block, scale=scale, window=window,
        splits=splits,
    )  # fmt: skip
    expected = gathered_attention(
        query.float(), keys.float(), values.float(), table, lengths, cache_block, scale, window
    )
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **(EXACT if dtype == torch.float32 else HALF))


# (query heads, kv heads, head dim, cache block, rows as (new tokens, length after), window)
PACKED_CASES = {
    "decoding-rows-and-chunks": (6, 2, 12, 4, [(1, 9), (20, 20), (5, 40), (1, 1), (37, 70)], 0),
    "sliding-window": (6, 2, 12, 4, [(1, 9), (20, 20), (5, 40), (37, 70)], 3),
    "window-over-a-chunk": (4, 1, 16, 8, [(70, 70), (2, 90)], 30),
}


def interpreted_packed(*args, **kwargs) -> torch.Tensor:
    """In the interpreter child: the packed-pass kernel."""
    from peftserve.paged_attention_triton import paged_packed_attention

    return paged_packed_attention(*args, **kwargs)


@pytest.mark.parametrize(("block_m", "dtype"), [(16, torch.float32), (64, torch.float32), (64, torch.float16)])
@pytest.mark.parametrize("case", PACKED_CASES.values(), ids=PACKED_CASES.keys())
def test_interpreted_packed_kernel_equals_causal_attention_row_by_row(
    interpreter, case, block_m: int, dtype: torch.dtype
) -> None:
    """Every token of a packed pass attends to its own row's keys up to its own position (and within the
    window); reference: per token, the row's keys gathered in order and masked, softmax, values."""
    query_heads, kv_heads, head_dim, cache_block, rows, window = case
    generator = torch.Generator().manual_seed(sum(n for n, _ in rows) + window)
    keys, values, table = scattered_pool([length for _, length in rows], cache_block, kv_heads, head_dim, generator)
    query = torch.randn(sum(n for n, _ in rows), query_heads, head_dim, generator=generator)
    query, keys, values = (tensor.to(dtype).float() for tensor in (query, keys, values))  # the inputs, rounded
    tiles = packed_tiles([(row, n, length - n) for row, (n, length) in enumerate(rows)], block_m, torch.device("cpu"))
    got = interpreter.run(
        interpreted_packed, query.to(dtype), keys.to(dtype), values.to(dtype), table, tiles, cache_block=cache_block,
        block_m=block_m, scale=0.3, window=window,
    )  # fmt: skip
    expected, token = [], 0
    group = query_heads // kv_heads
    for row, (new, length) in enumerate(rows):
        positions = torch.arange(length)
        slots = table[row].long()[positions // cache_block] * cache_block + positions % cache_block
        k, v = keys[slots].repeat_interleave(group, 1), values[slots].repeat_interleave(group, 1)
        for position in range(length - new, length):
            allowed = (positions <= position) & ((positions > position - window) if window else True)
            scores = torch.einsum("hd,lhd->hl", query[token], k).mul(0.3).masked_fill(~allowed, float("-inf"))
            expected.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
            token += 1
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), torch.stack(expected), **(EXACT if dtype == torch.float32 else HALF))


def test_packed_tiles_cut_each_row_into_tiles_of_its_own_tokens() -> None:
    tiles = packed_tiles([(0, 1, 8), (1, 40, 0), (2, 16, 3)], 16, torch.device("cpu"))
    assert tiles.tolist() == [[0, 0, 1, 8], [1, 1, 16, 0], [1, 17, 16, 16], [1, 33, 8, 32], [2, 41, 16, 3]]


def test_kernel_refuses_shapes_that_do_not_fit(interpreter) -> None:
    keys = torch.zeros(8, 2, 16)
    table, lengths = torch.ones(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="does not fit"):
        interpreter.run(interpreted_kernel, torch.zeros(2, 3, 16), keys, keys, table, lengths, cache_block=4, scale=1.0)
    with pytest.raises(ValueError, match="3 rows"):
        interpreter.run(interpreted_kernel, torch.zeros(3, 4, 16), keys, keys, table, lengths, cache_block=4, scale=1.0)


def _cache(in_place: bool) -> PagedKVCache:
    cache = PagedKVCache(
        layer_shapes={0: LayerShape((2, 8), (2, 8))}, num_blocks=64, block_size=4, dtype=torch.float32,
        device=torch.device("cpu"),
    )  # fmt: skip
    cache.reads_in_place = in_place
    for sequence, length in enumerate((30, 90)):
        cache.reserve(sequence, length + 8)
        cache.plan([(sequence, length)], length)
        cache.update(torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8), 0)
    return cache


def test_a_decoding_step_read_in_place_copies_nothing_of_the_cache() -> None:
    """Bytes copied out of the pool per decoding step: the whole of every row's keys and values when
    gathered, nothing in place (the step writes its one new token per row either way)."""
    step = [(0, 1), (1, 1)]
    for in_place, copied in ((False, 2 * 2 * 91 * 2 * 8 * 4), (True, 0)):  # rows x kv_length, k+v, 2x8, fp32
        cache = _cache(in_place)
        gathered, written = cache.bytes_gathered, cache.bytes_written
        cache.plan(step, 1)
        new_keys = torch.randn(2, 2, 1, 8)
        keys, _ = cache.update(new_keys, torch.randn(2, 2, 1, 8), 0)
        assert cache.bytes_gathered - gathered == copied
        assert cache.bytes_written - written == 2 * 2 * 2 * 8 * 4  # two tokens' keys and values
        if in_place:
            assert keys is new_keys
            with pytest.raises(RuntimeError, match="other keys"):  # what the cache handed over names its keys
                paged_attention(torch.nn.Module(), torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), keys, None)
        else:
            assert keys.shape == (2, 2, 91, 8)


def test_attention_without_a_hand_over_is_sdpa() -> None:
    hand_over(None)
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    layer = torch.nn.Module()
    layer.is_causal = False
    ours, _ = paged_attention(layer, query, key, value, None, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(ours, expected)
    hand_over(InPlaceRead(key, key, value, None))  # a stale hand-over for other keys is refused, not used
    with pytest.raises(RuntimeError, match="other keys"):
        paged_attention(torch.nn.Module(), query, torch.randn(2, 4, 5, 8), value, None)


def demo_rows_run(model_dir: Path, kv_reads: str) -> tuple[bool, list[list[int]], list[torch.Tensor], int]:
    """(In the interpreter child for in_place.) One row per demo adapter type and the base model, in one
    batch, 6 tokens each: whether decoding read in place, each row's tokens and step logits, bytes gathered."""
    engine = Engine(demo_config(model_dir, kv_reads=kv_reads))
    rows = []
    for index, adapter_id in enumerate(ADAPTERS):
        row = engine.check_request(
            CompletionRequest(PROMPTS[index % len(PROMPTS)], adapter_id, max_tokens=6, ignore_eos=True)
        )
        if adapter_id:  # read and wrapped without the smoke check, which would only run more interpreted steps
            row.adapter = engine.read_adapter(engine.repository.latest(adapter_id))[1]
            engine.layers.wrap(list(row.adapter.modules))
        row.keep_logits = True
        rows.append(row)
    gathered = engine.kv_cache.bytes_gathered
    results = engine.batcher.run_rows(rows)
    engine.batcher.close()
    logits = [torch.stack(result.step_logits) for result in results]
    in_place = engine.kv_cache.reads_in_place
    return in_place, [result.token_ids for result in results], logits, engine.kv_cache.bytes_gathered - gathered


def test_every_adapter_type_decodes_in_place_as_with_gathered_reads(model_dir: Path, interpreter) -> None:
    in_place, tokens, logits, in_place_bytes = interpreter.run(demo_rows_run, model_dir, "in_place")
    gathered, expected_tokens, expected_logits, gathered_bytes = demo_rows_run(model_dir, "auto")  # CPU: gathered
    assert in_place and not gathered
    assert tokens == expected_tokens
    for adapter_id, ours, expected in zip(ADAPTERS, logits, expected_logits, strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4, msg=adapter_id or "base model")
    # Prompt passes (packed) and decoding steps alike: nothing copied out of the pool when read in place.
    assert in_place_bytes == 0 < gathered_bytes


def window_rows_run(model_path: Path) -> tuple[list[list[int]], list[torch.Tensor], list[list[int]]]:
    """In the interpreter child: rows longer than the sliding window, decoded in place; each row's prompt,
    step logits and tokens."""
    engine = Engine(
        ServeConfig(base_model=str(model_path), adapter_repository=str(model_path / "adapters"), kv_reads="in_place")
    )
    assert engine.kv_cache.reads_in_place
    rows = [
        GenerationRow(engine.tokenizer(p).input_ids, None, 10, ignore_eos=True, keep_logits=True) for p in LONG_PROMPTS
    ]
    results = engine.batcher.run_rows(rows)
    engine.batcher.close()
    logits = [torch.stack(result.step_logits) for result in results]
    return [row.prompt_ids for row in rows], logits, [result.token_ids for result in results]


@pytest.mark.parametrize("model", ["mistral", "hybrid"])
def test_sliding_window_rows_decoded_in_place_match_the_full_forward(
    request: pytest.FixtureRequest, interpreter, model: str
) -> None:
    model_path = request.getfixturevalue(f"{model}_dir")
    prompts, logits, tokens = interpreter.run(window_rows_run, model_path)
    reference = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    for prompt_ids, ours, answer in zip(prompts, logits, tokens, strict=True):
        row = GenerationRow(prompt_ids, None, len(answer))
        torch.testing.assert_close(ours, reference_logits(reference, row, answer), atol=1e-4, rtol=1e-4)


def test_in_place_reads_that_cannot_run_refuse_to_start(model_dir: Path) -> None:
    """On CPU, outside the interpreter, the triton kernel cannot run: asked for, the engine says why and
    does not start; by default it gathers without trying."""
    with pytest.raises(ConfigError, match="kv_reads=in_place: a pass read in place failed"):
        Engine(demo_config(model_dir, kv_reads="in_place"))
    engine = Engine(demo_config(model_dir))
    assert not engine.kv_cache.reads_in_place
    assert engine.model.config._attn_implementation == "sdpa"
    (answer,) = engine.complete([CompletionRequest("a dog", max_tokens=3, ignore_eos=True)])
    assert answer.output_tokens == 3
    engine.batcher.close()


def test_long_rows_are_split_only_when_rows_and_heads_leave_the_gpu_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from peftserve.paged_attention_triton import MIN_SPLIT_POSITIONS, choose_splits

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert choose_splits(1, 8, 100_000, cuda) == 33  # one long row: 8 programs would leave 124 of 132 SMs idle
    assert choose_splits(1, 8, 4 * MIN_SPLIT_POSITIONS, cuda) == 4  # never shorter than MIN_SPLIT_POSITIONS
    assert choose_splits(1, 8, 100, cuda) == 1
    assert choose_splits(64, 8, 8192, cuda) == 1  # 512 programs already keep every SM busy
    assert choose_splits(1, 8, 8192, torch.device("cpu")) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_compiled_decode_kernel_equals_attention_over_gathered_keys_on_cuda(case, dtype: torch.dtype) -> None:
    from peftserve.paged_attention_triton import paged_decode_attention

    query_heads, kv_heads, head_dim, cache_block, lengths, window, splits = case
    generator = torch.Generator().manual_seed(3)
    keys, values, table = scattered_pool(lengths, cache_block, kv_heads, head_dim, generator)
    query = torch.randn(len(lengths), query_heads, head_dim, generator=generator)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    on_device = [t.to("cuda", dtype) for t in (query, keys, values)]
    got = paged_decode_attention(*on_device, table.cuda(), lengths.cuda(), cache_block=cache_block, scale=0.2,
                                 window=window, splits=splits)  # fmt: skip
    rounded = [t.to(dtype).float() for t in (query, keys, values)]
    expected = gathered_attention(*rounded, table, lengths, cache_block, 0.2, window)
    torch.testing.assert_close(
        got.float().cpu(), expected, **(EXACT if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2})
    )
