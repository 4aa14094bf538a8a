"""The slot path (the engine's compute on CUDA, and on CPU for batches of many adapters) forced on CPU: its
slot policy, the wrapped layers through it on the torch backend, and the demo engine's logits through the
triton kernels under the interpreter against PEFT's own models, every adapter type in one mixed batch."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftserve.batched_layers import PASSES_BEFORE_PER_ROW, AdapterLayers, AdapterLinear, BatchDeltas
from peftserve.errors import CacheFullError
from peftserve.lora_kernels import TorchKernels
from peftserve.slot_path import SlotPath
from tests.conftest import DEMO_PHRASES, PROMPTS, demo_config
from tests.interpreted_triton import interpreter_process
from tests.unit.test_batched_layers import CASES, lora, run_batch, solo


def path(slots: int) -> SlotPath:
    return SlotPath(slots_per_bucket=slots, device=torch.device("cpu"), kernels=TorchKernels())


def wrapped(slot_path: SlotPath) -> AdapterLayers:
    layers = AdapterLayers(torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 40)}))
    layers.wrap(["proj"])
    layers.use_slot_path(slot_path)
    return layers


def test_wrapping_allocates_slot_stacks_before_taking_the_lock_and_swaps_layers_under_it() -> None:
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 40), "out": torch.nn.Linear(40, 8)})
    layers = AdapterLayers(model)
    slot_path = path(2)
    layers.use_slot_path(slot_path)
    seen: list[tuple[set[str], type]] = []

    class Lock:  # the engine's lock: every forward pass holds it
        def __enter__(self) -> None:
            seen.append((set(slot_path.tables.modules), type(model["proj"])))

        def __exit__(self, *_: object) -> None:
            seen.append((set(slot_path.tables.modules), type(model["proj"])))

    layers.wrap(["proj", "out"], lock=Lock())
    assert seen == [({"proj", "out"}, torch.nn.Linear), ({"proj", "out"}, AdapterLinear)]
    layers.wrap(["proj"], lock=Lock())  # nothing new: the lock is not taken
    assert len(seen) == 2


def test_live_batches_keep_their_slots_and_idle_adapters_make_room() -> None:
    slot_path = path(2)
    layers = wrapped(slot_path)
    first, second, third = lora(8, 1), lora(8, 2), lora(8, 3)
    decoding = BatchDeltas(layers, [first, second])  # held across steps, like the batcher's decode batch
    with pytest.raises(CacheFullError, match="rank bucket 8"):
        BatchDeltas(layers, [third])  # both slots leased by the live batch
    held = slot_path.tables.slots_of(first)
    del decoding
    gc.collect()
    BatchDeltas(layers, [third, second])  # first is idle now: it makes room
    assert slot_path.tables.slots_of(first) is None and slot_path.tables.slots_of(third) == held


def test_a_rank_first_seen_later_gets_its_bucket() -> None:
    slot_path = path(2)
    layers = wrapped(slot_path)
    BatchDeltas(layers, [lora(8, 1)])
    BatchDeltas(layers, [lora(20, 2)])
    assert slot_path.tables.rank_capacity == {8: 1, 32: 1}  # buckets start with one slot


def test_a_full_bucket_doubles_up_to_the_cap_and_batches_built_before_still_compute_right() -> None:
    slot_path = path(4)
    layers = wrapped(slot_path)
    adapters = [lora(8, seed) for seed in range(5)]
    x = torch.randn(2, 3, 24)
    proj = layers.wrapped["proj"]

    def check(batch: BatchDeltas, rows: list) -> None:
        batch.install()
        with torch.inference_mode():
            expected = torch.stack([solo(proj.base, x[i], adapter) for i, adapter in enumerate(rows)])
            torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-4)

    held = BatchDeltas(layers, adapters[:2])  # 1 slot, then 2
    check(held, adapters[:2])  # its indices are built for a bucket of 2
    first_slots = slot_path.tables.slots_of(adapters[0])
    later = BatchDeltas(layers, adapters[2:4])  # grows to 4 while `held` lives
    assert slot_path.tables.rank_capacity == {8: 4} and slot_path.tables.slots_of(adapters[0]) == first_slots
    check(held, adapters[:2])
    check(later, adapters[2:4])
    with pytest.raises(CacheFullError, match="all 4 slots"):
        BatchDeltas(layers, [adapters[4]])  # at the cap, every slot leased: no growth past it


@pytest.mark.parametrize("rows", CASES.values(), ids=CASES.keys())
def test_wrapped_layers_through_the_slot_path_equal_each_row_alone(monkeypatch: pytest.MonkeyPatch, rows) -> None:
    original = AdapterLayers.wrap

    def wrap_then_use_slots(self: AdapterLayers, names: list[str]) -> None:
        original(self, names)
        if self.slot_path is None:
            self.use_slot_path(path(len(rows)))

    monkeypatch.setattr(AdapterLayers, "wrap", wrap_then_use_slots)
    batched, expected = run_batch(rows)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-4)


ADAPTERS = ["", *DEMO_PHRASES]


class CountingKernels:
    """The interpreted triton backend, counting its calls (proof that the slot path ran)."""

    def __init__(self) -> None:
        from peftserve.lora_triton import TritonKernels

        self.backend, self.calls = TritonKernels(), 0

    def __getattr__(self, name: str):
        self.calls += 1
        return getattr(self.backend, name)


def engine_prompt_logits(model_dir: Path) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """In the interpreter child: the demo engine with the slot path forced, one row per adapter and the
    base model in one batch; returns each row's prompt ids and logits, and how many kernel calls ran."""
    from peftserve.engine import Engine
    from peftserve.requests import CompletionRequest

    engine = Engine(demo_config(model_dir))
    kernels = CountingKernels()
    engine.layers.use_slot_path(SlotPath(slots_per_bucket=len(ADAPTERS), device=engine.device, kernels=kernels))
    rows = []
    for index, adapter_id in enumerate(ADAPTERS):
        row = engine.check_request(CompletionRequest(PROMPTS[index % len(PROMPTS)], adapter_id, max_tokens=1))
        if adapter_id:  # read and wrapped without the smoke check, which would only run more interpreted steps
            row.adapter = engine.read_adapter(engine.repository.latest(adapter_id))[1]
            engine.layers.wrap(list(row.adapter.modules))
        row.keep_prompt_logits = True
        rows.append(row)
    results = engine.batcher.run_rows(rows)
    return [row.prompt_ids for row in rows], [result.prompt_logits for result in results], kernels.calls


def test_demo_engine_through_interpreted_kernels_equals_peft_in_one_mixed_batch(model_dir: Path) -> None:
    with interpreter_process() as process:
        prompt_ids, logits, kernel_calls = process.run(engine_prompt_logits, model_dir)
    assert kernel_calls > 0
    for adapter_id, ids, ours in zip(ADAPTERS, prompt_ids, logits, strict=True):
        base = AutoModelForCausalLM.from_pretrained(model_dir / "base_model")
        model = PeftModel.from_pretrained(base, model_dir / "adapters" / adapter_id / "1") if adapter_id else base
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            reference = model.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        torch.testing.assert_close(ours, reference[0, -len(ids) :], atol=1e-4, rtol=1e-4, msg=adapter_id)


def test_adapter_compute_setting_puts_a_cpu_engine_on_slot_tables_with_the_same_answers(model_dir: Path) -> None:
    """``adapter_compute=slot_tables`` on CPU (torch kernels over the stacks) answers a mixed batch of every
    adapter type exactly as the per-row path does: the switch operators use to compare or fall back. ``auto``
    on CPU sends only batches of many distinct adapters through slot tables."""
    from peftserve.batched_layers import CPU_SLOTS_FROM_ADAPTERS
    from peftserve.engine import Engine
    from peftserve.requests import CompletionRequest

    engines = {
        compute: Engine(demo_config(model_dir, adapter_compute=compute))
        for compute in ("per_row", "slot_tables", "auto")
    }
    auto = engines["auto"]
    assert engines["per_row"].layers.slot_path is None and engines["slot_tables"].layers.slots_from == 0
    assert auto.layers.slots_from == CPU_SLOTS_FROM_ADAPTERS <= len(ADAPTERS) - 1
    requests = [
        CompletionRequest(PROMPTS[i % len(PROMPTS)], adapter, max_tokens=8) for i, adapter in enumerate(ADAPTERS)
    ]
    for engine in engines.values():  # every adapter loaded first, so that they all join one batch
        engine.complete([CompletionRequest("a", adapter, max_tokens=1) for adapter in ADAPTERS])
    cached = [auto.cache.get(version) for version in auto.cache.sizes()]
    assert len(cached) >= CPU_SLOTS_FROM_ADAPTERS
    assert not auto.layers.through_slots(cached[: CPU_SLOTS_FROM_ADAPTERS - 1]) and auto.layers.through_slots(cached)
    answers = {compute: [a.text for a in engine.complete(requests)] for compute, engine in engines.items()}
    assert answers["slot_tables"] == answers["per_row"] == answers["auto"]
    assert auto.layers.slot_path.tables.rank_capacity, "the batch of every adapter went through slot tables"
    for engine in engines.values():
        engine.batcher.close()


def test_a_batch_of_many_adapters_runs_through_slot_tables_until_it_has_lasted_then_per_row() -> None:
    layers = AdapterLayers(torch.nn.ModuleDict({"proj": torch.nn.Linear(24, 40)}))
    layers.wrap(["proj"])
    layers.use_slot_path(path(4), from_adapters=2)
    many, few = [lora(8, 1), lora(8, 2), None], [lora(8, 3), None]
    x = torch.randn(3, 2, 24)
    proj = layers.wrapped["proj"]
    expected = torch.stack([solo(proj.base, x[i], adapter) for i, adapter in enumerate(many)])
    passes = []
    for _ in range(PASSES_BEFORE_PER_ROW + 2):
        passes.append(layers.deltas(many))
        passes[-1].install()
        with torch.inference_mode():
            torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-4)
    slotted, per_row = passes[0], passes[PASSES_BEFORE_PER_ROW]
    assert slotted.per_module["proj"].through_slots is not None  # nothing to stack while it may not last
    assert passes[1:PASSES_BEFORE_PER_ROW] == [slotted] * (PASSES_BEFORE_PER_ROW - 1)
    assert per_row.per_module["proj"].through_slots is None and passes[-1] is per_row  # it lasted: per row
    assert layers.deltas(few).per_module["proj"].through_slots is None  # too few adapters: per row at once
    layers.slots_from = 0  # every batch through slot tables (CUDA)
    assert layers.deltas([few[0], few[0]]).per_module["proj"].through_slots is not None
