"""Static decoding steps (peftserve.decode_graphs): what a CUDA graph of a step would replay, run on CPU.

A CUDA graph replays the kernels its capture recorded, on the tensors and with the scalars the capture
saw. So a static step is sound when (1) it computes what an eager step does, and (2) every step of a
bucket issues the very same operations on the very same tensors with the same scalars, whatever the rows,
their lengths and adapters: then replaying the first is running each again. Both are shown here with the
engine in triton's interpreter (in-place KV reads and the triton LoRA kernels, as on a GPU), recording
every aten operation and triton launch of each step's forward pass. The capture itself needs a GPU; the
engine's start-up check compares captured steps with eager ones there (``verify``).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peftserve.decode_graphs import CaptureFailed, DecodeGraphs, graph_batch_sizes
from peftserve.engine import Engine
from peftserve.errors import ConfigError
from peftserve.requests import CompletionRequest
from tests.conftest import PROMPTS, demo_config
from tests.interpreted_triton import interpreter_process
from tests.unit.test_paged_attention import ADAPTERS

# Operations that read a device tensor back to the host: a capture refuses them.
HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.equal", "aten.is_nonzero")


def test_batch_sizes_are_powers_of_two_then_multiples_of_eight_up_to_the_running_rows() -> None:
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]


class _Recorder(TorchDispatchMode):
    """Every aten operation of a pass with its arguments described replay-wise: a tensor made earlier in
    the pass by the operation that made it (its address may differ from step to step, a replay reuses
    the capture's), any other tensor by its address; views by shape, strides and offset; scalars by value."""

    def __init__(self, launches: list) -> None:
        super().__init__()
        self.ops: list[tuple] = launches
        self._made: dict[int, tuple[int, int]] = {}

    def describe(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            address = value.untyped_storage().data_ptr()
            origin = self._made.get(address, ("outside", address))
            return (origin, value.dtype, tuple(value.shape), value.stride(), value.storage_offset())
        if isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
            return ("storage", self._made.get(value.data_ptr(), ("outside", value.data_ptr())))
        if isinstance(value, (list, tuple)):
            return tuple(self.describe(item) for item in value)
        if isinstance(value, dict):
            return tuple((key, self.describe(item)) for key, item in sorted(value.items()))
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        described = (str(func), self.describe(args), self.describe(kwargs))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        index = len(self.ops)
        self.ops.append(described)
        for position, tensor in enumerate(tree_flatten(out)[0]):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._made[tensor.untyped_storage().data_ptr()] = (index, position)  # newly allocated
        return out


def static_rows_run(model_dir: Path) -> dict[str, Any]:
    """In the interpreter child: one row per demo adapter type and the base model in one batch, leaving at
    different steps, decoded by static steps; each row's tokens and step logits, the steps served per
    bucket, and per bucket whether every step's recorded operations equal the first's."""
    from triton.runtime.interpreter import InterpretedFunction

    from peftserve.lora_kernels import triton_kernels

    engine = Engine(demo_config(model_dir, kv_reads="in_place", adapter_compute="slot_tables"))
    engine.layers.slot_path.kernels = triton_kernels()  # the GPU's backend, interpreted
    config = engine.config
    longest = config.max_prompt_tokens + config.max_tokens_limit
    verified = {}  # the start-up check's own steps, static (what it compares with the captured ones on a GPU)
    for max_rows in (1, config.max_running_rows):
        graphs = DecodeGraphs(engine.runner, max_rows=max_rows, longest_tokens=longest, capture=False)
        verified[max_rows] = graphs.verify()
        graphs.close()
    graphs = DecodeGraphs(engine.runner, max_rows=config.max_running_rows, longest_tokens=longest, capture=False)
    traces: dict[int, list[list]] = defaultdict(list)
    run = InterpretedFunction.run

    @contextmanager
    def recorded(size: int):
        ops: list = []
        recorder = _Recorder(ops)

        def launch(kernel, *args, grid, warmup, **kwargs):
            ops.append(("triton", kernel.fn.__name__, grid, recorder.describe(args), recorder.describe(kwargs)))
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = launch
        try:
            with recorder:
                yield
        finally:
            InterpretedFunction.run = run
        traces[size].append(ops)

    graphs.around_forward = recorded
    engine.runner.graphs = graphs
    rows = static_rows(engine)
    results = engine.batcher.run_rows(rows)
    engine.batcher.close()
    replayable = {}
    for size, steps in traces.items():
        first = steps[0]
        differing = [
            next((i, a, b) for i, (a, b) in enumerate(zip(first, step, strict=False)) if a != b)
            if step != first and len(step) == len(first)
            else ("lengths", len(first), len(step))
            for step in steps[1:]
            if step != first
        ]
        replayable[size] = (len(steps), differing[:1])
    host_reads = sorted(
        {op[0] for steps in traces.values() for step in steps for op in step if op[0].rsplit(".", 1)[0] in HOST_READS}
    )
    return {
        "verified": verified,
        "tokens": [result.token_ids for result in results],
        "logits": [torch.stack(result.step_logits) for result in results],
        "steps": dict(graphs.steps),
        "replayable": replayable,
        "host_reads": host_reads,
        "launches": sum(op[0] == "triton" for op in traces[max(traces)][0]),
    }


def static_rows(engine: Engine) -> list:
    """Every demo adapter type and the base model. Two rows ask for 7 tokens, one for 3, one for 4, the
    others for 5: the batch decodes at 11, 11, 10 and 9 rows (one bucket, other rows, lengths and padding
    at each step), then at 2 rows twice (another bucket)."""
    rows = []
    for index, adapter_id in enumerate(ADAPTERS):
        max_tokens = 7 if index < 2 else {len(ADAPTERS) - 1: 3, len(ADAPTERS) - 2: 4}.get(index, 5)
        request = CompletionRequest(PROMPTS[index % len(PROMPTS)], adapter_id, max_tokens=max_tokens, ignore_eos=True)
        row = engine.check_request(request)
        if adapter_id:  # read and wrapped without the smoke check, which would only run more interpreted steps
            row.adapter = engine.read_adapter(engine.repository.latest(adapter_id))[1]
            engine.layers.wrap(list(row.adapter.modules))
        row.keep_logits = True
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def static_run(model_dir: Path) -> dict[str, Any]:
    with interpreter_process() as process:
        return process.run(static_rows_run, model_dir)


def test_static_steps_of_every_adapter_type_equal_eager_steps(model_dir: Path, static_run: dict[str, Any]) -> None:
    engine = Engine(demo_config(model_dir))  # CPU: gathered reads, per-row adapters, no static steps
    results = engine.batcher.run_rows(static_rows(engine))
    engine.batcher.close()
    assert static_run["tokens"] == [result.token_ids for result in results]
    for adapter_id, ours, result in zip(ADAPTERS, static_run["logits"], results, strict=True):
        torch.testing.assert_close(
            ours, torch.stack(result.step_logits), atol=1e-4, rtol=1e-4, msg=adapter_id or "base model"
        )
    # Every decoding step was static, through more than one bucket: padding rows changed nothing.
    decoding_steps = max(len(tokens) for tokens in static_run["tokens"]) - 1
    assert sum(static_run["steps"].values()) == decoding_steps
    assert len(static_run["steps"]) >= 2


def test_the_start_up_check_passes_static_steps_that_equal_eager_ones(static_run: dict[str, Any]) -> None:
    assert list(static_run["verified"].values()) == [None, None]  # one running row at most, and the default


def test_every_step_of_a_bucket_issues_the_operations_of_the_first(static_run: dict[str, Any]) -> None:
    """What makes replaying a captured step equal to running it again: same operations, tensors, scalars."""
    assert static_run["host_reads"] == []
    assert static_run["launches"] > 0  # the LoRA and attention kernels were recorded, not only aten ops
    for size, (steps, differing) in static_run["replayable"].items():
        assert differing == [], f"bucket {size}: a step differs from the first of {steps}: {differing}"
    assert sorted(steps for steps, _ in static_run["replayable"].values()) == [2, 4]


def test_decode_graphs_that_cannot_run_refuse_to_start(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="decode_graphs=on: CUDA graphs need a CUDA device"):
        Engine(demo_config(model_dir, decode_graphs="on"))
    engine = Engine(demo_config(model_dir))
    assert engine.runner.graphs is None
    engine.batcher.close()


def test_graphs_are_captured_again_when_the_ops_they_run_or_the_stacks_they_read_change(model_dir: Path) -> None:
    """A graph replays the ops and stack addresses of its capture: its signature must change whenever those
    would, and only then (each change costs a capture of every bucket in use)."""
    engine = Engine(demo_config(model_dir, adapter_compute="slot_tables"))
    engine.kv_cache.reads_in_place = True  # what graphs need; no pass runs here, only signatures are read
    graphs = DecodeGraphs(engine.runner, max_rows=4, longest_tokens=64, capture=False)
    adapters = {}
    for adapter_id in ("pirate", "robot", "chef"):  # LoRA on every module, LoRA on 3 of them, IA3
        adapters[adapter_id] = engine.read_adapter(engine.repository.latest(adapter_id))[1]
        engine.layers.wrap(list(adapters[adapter_id].modules))
    path, tables = engine.layers.slot_path, engine.layers.slot_path.tables
    changes = []

    def then(step) -> None:
        before = graphs.signature()
        step()
        changes.append(graphs.signature() != before)

    then(lambda: path.batch([adapters["pirate"]]))  # first low-rank ops in every module: a new rank bucket
    then(lambda: path.batch([adapters["robot"]]))  # the bucket's one slot is taken: it grows
    then(lambda: tables.release(adapters["robot"]))  # pirate still uses those ops
    then(lambda: path.batch([adapters["robot"]]))  # a free slot, ops in use: nothing a graph reads changes
    then(lambda: path.batch([adapters["chef"]]))  # the first scaling ops
    then(lambda: tables.release(adapters["chef"]))  # the last ones
    engine.batcher.close()
    assert changes == [True, True, False, False, True, True]


class _CaptureFailing:
    """Graphs whose capture fails (out of memory, say): what the runner does then."""

    def __init__(self) -> None:
        self.calls, self.closed = 0, False

    def serves(self, rows) -> bool:
        return True

    def decode(self, rows):
        self.calls += 1
        raise CaptureFailed("capturing the decoding graph of batch size 2 failed: CUDA out of memory")

    def close(self) -> None:
        self.closed = True


def test_a_failed_capture_runs_the_step_eagerly_and_later_steps_too(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(demo_config(model_dir))
    requests = [CompletionRequest(prompt, max_tokens=5, ignore_eos=True) for prompt in PROMPTS[:2]]
    expected = engine.complete(requests)
    failing = engine.runner.graphs = _CaptureFailing()
    answers = engine.complete(requests)
    engine.batcher.close()
    assert [a.text for a in answers] == [e.text for e in expected]
    assert all(a.output_tokens == 5 for a in answers)
    assert failing.calls == 1 and failing.closed and engine.runner.graphs is None
    assert "decoding steps run eagerly from now on: capturing the decoding graph" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_steps_equal_eager_steps_on_cuda(model_dir: Path) -> None:
    engine = Engine(demo_config(model_dir), device="cuda")
    assert engine.runner.graphs is not None and engine.runner.graphs.captures >= 2
    rows = static_rows(engine)
    results = engine.batcher.run_rows(rows)
    engine.batcher.close()
    reference = Engine(demo_config(model_dir, decode_graphs="off"), device="cuda")
    expected = reference.batcher.run_rows(static_rows(reference))
    reference.batcher.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    for ours, theirs in zip(results, expected, strict=True):
        torch.testing.assert_close(torch.stack(ours.step_logits), torch.stack(theirs.step_logits), atol=1e-3, rtol=1e-3)
