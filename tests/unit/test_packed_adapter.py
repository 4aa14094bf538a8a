"""Adapters packed into one buffer (the host tier's form): the same tensors back, in a few objects."""

from __future__ import annotations

import gc

import pytest
import torch

from peftserve.adapter_weights import AdapterWeights, ModuleDelta
from peftserve.engine import Engine
from peftserve.packed_adapter import ALIGNMENT, PackedAdapter
from peftserve.requests import CompletionRequest
from tests.conftest import DEMO_PHRASES


def assert_same_adapter(unpacked: AdapterWeights, weights: AdapterWeights) -> None:
    """Every field equal, tensor by tensor: values, dtype, shape and strides."""
    assert unpacked.peft_type == weights.peft_type and list(unpacked.modules) == list(weights.modules)
    for ours, theirs in zip(unpacked.modules.values(), weights.modules.values(), strict=True):
        assert ours.scales_bias == theirs.scales_bias
        assert (ours.kronecker is None) == (theirs.kronecker is None)
    assert len(unpacked.tensors()) == len(weights.tensors())
    for ours, theirs in zip(unpacked.tensors(), weights.tensors(), strict=True):
        assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride() and torch.equal(ours, theirs)


@pytest.mark.parametrize("adapter_id", sorted(DEMO_PHRASES))
def test_every_demo_adapter_comes_back_from_its_buffer_as_views_that_answer_the_same(
    engine: Engine, adapter_id: str
) -> None:
    _, weights = engine.prepare_version(engine.repository.latest(adapter_id))  # layers wrapped for it
    packed = PackedAdapter.pack(weights)
    unpacked = packed.unpack()

    assert_same_adapter(unpacked, weights)
    storage = packed.buffer.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in unpacked.tensors()), "views, not copies"
    assert all(t.data_ptr() % ALIGNMENT == packed.buffer.data_ptr() % ALIGNMENT for t in unpacked.tensors())
    assert weights.nbytes <= packed.nbytes < weights.nbytes + ALIGNMENT * len(weights.tensors())
    logits = []
    for adapter in (weights, unpacked):
        row = engine.check_request(CompletionRequest("the cat looks at", max_tokens=1))
        row.adapter, row.keep_prompt_logits = adapter, True
        logits.append(engine.batcher.run_rows([row])[0].prompt_logits)
    assert torch.equal(*logits)


def test_strides_are_kept_where_the_tensor_fills_its_span_and_made_contiguous_elsewhere() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    transposed = base.t()  # (6, 4), strides (1, 6): fills its span
    every_other = base[:, ::2]  # (4, 3), strides (6, 2): gaps
    weights = AdapterWeights(
        "LOKR",
        {
            "a": ModuleDelta(lora_a=transposed, lora_b=every_other, scales_bias=True),
            "b": ModuleDelta(out_scale=torch.ones(3, dtype=torch.float16), kronecker=(base, transposed)),
        },
        virtual_embeddings=torch.zeros(2, 5, dtype=torch.bfloat16),
    )
    unpacked = PackedAdapter.pack(weights).unpack()

    a, b = unpacked.modules["a"], unpacked.modules["b"]
    assert a.lora_a.stride() == (1, 6) and torch.equal(a.lora_a, transposed)
    assert a.lora_b.is_contiguous() and torch.equal(a.lora_b, every_other)
    assert a.scales_bias and not b.scales_bias and a.in_scale is None and b.lora_a is None
    assert b.out_scale.dtype == torch.float16 and torch.equal(b.out_scale, torch.ones(3, dtype=torch.float16))
    assert torch.equal(b.kronecker[0], base) and b.kronecker[1].stride() == (1, 6)
    assert unpacked.virtual_embeddings.dtype == torch.bfloat16 and unpacked.prefix_kv is None


def tracked_objects_made_by(make) -> int:
    """How many objects the garbage collector tracks for what ``make()`` returns (kept alive meanwhile)."""
    gc.collect()
    gc.collect()
    before = len(gc.get_objects())
    made = make()
    gc.collect()  # plain tuples of names and numbers are untracked once the collector has seen them
    gc.collect()
    after = len(gc.get_objects())
    del made
    return after - before


def test_a_packed_adapter_is_a_few_objects_for_the_garbage_collector_whatever_its_modules(engine: Engine) -> None:
    """A full collection walks every tracked object, holding the GIL: a host tier of thousands of adapters
    in runtime form (a tensor or two per module, plus records) made each one stall the streams."""
    _, weights = engine.read_adapter(engine.repository.latest("pirate"))  # LoRA on 7 modules x 8 layers
    count = 200  # other threads may allocate meanwhile: a few dozen objects move the mean little
    runtime = tracked_objects_made_by(lambda: [PackedAdapter.pack(weights).unpack() for _ in range(count)])
    packed = tracked_objects_made_by(lambda: [PackedAdapter.pack(weights) for _ in range(count)])
    assert runtime / count > 2 * len(weights.modules)  # the form the tier no longer keeps
    assert packed / count <= 3, f"{packed / count:.1f} tracked objects per packed adapter"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a page-locked buffer copied in one transfer")
def test_on_cuda_the_buffer_is_pinned_and_comes_back_to_the_device_equal() -> None:
    """No engine: the GPU session runs this among its CUDA tests, in seconds."""
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.bfloat16).cuda()

    modules = {f"layers.{i}.q_proj": ModuleDelta(lora_a=random(64, 8), lora_b=random(8, 64)) for i in range(4)}
    modules["layers.0.mlp"] = ModuleDelta(out_scale=random(96), scales_bias=True)
    on_device = AdapterWeights("LORA", modules)
    packed = PackedAdapter.pack(on_device, pin=True)
    assert packed.buffer.device.type == "cpu" and packed.buffer.is_pinned()
    fetched = packed.unpack(torch.device("cuda"), non_blocking=True)
    torch.cuda.synchronize()
    assert_same_adapter(fetched, on_device)
    assert all(t.device.type == "cuda" and t.data_ptr() % 16 == 0 for t in fetched.tensors())
