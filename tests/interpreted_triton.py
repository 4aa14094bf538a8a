"""Run code under triton's CPU interpreter in a child process, isolated from the test session.

``TRITON_INTERPRET=1`` must be set before triton itself is imported, not only before our kernels are
decorated: triton's own library functions (``tl.cdiv``, the reductions) are ``@triton.jit`` too and are
fixed as compiled when ``triton.language`` is first imported. The test session imports triton early
(conftest imports peft, which imports ``torch._dynamo``, which imports triton), so an in-process switch
cannot work; a spawned child started with the variable set can, and nothing leaks back into the session.
Arguments and results travel as ``torch.save`` bytes (plain copies, no shared memory).
"""

from __future__ import annotations

import importlib
import io
import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from peftserve.lora_kernels import TRITON_MODULE, TokenSlots


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)  # our own test data, from our own child


def _run_in_child(function: Callable[..., Any], payload: bytes) -> bytes:
    args, kwargs = _loads(payload)
    return _dumps(function(*args, **kwargs))


class InterpreterProcess:
    """One spawned Python with ``TRITON_INTERPRET=1`` in its environment from its first instruction."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a module-level ``function`` in the child and return its result (exceptions re-raised)."""
        return _loads(self._pool.apply(_run_in_child, (function, _dumps((args, kwargs)))))


@contextmanager
def interpreter_process() -> Iterator[InterpreterProcess]:
    with pytest.MonkeyPatch.context() as patch:  # the child copies the environment when it starts
        patch.setenv("TRITON_INTERPRET", "1")
        pool = multiprocessing.get_context("spawn").Pool(1)
        pool.apply(int)  # started (and the variable read) before the parent's environment is restored
    try:
        yield InterpreterProcess(pool)
    finally:
        pool.terminate()
        pool.join()


def _kernel_call(name: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """In the child: one op of the triton backend; returns its arguments too, for the ops that write them."""
    kernels = importlib.import_module(TRITON_MODULE).TritonKernels()
    result = getattr(kernels, name)(*args, **kwargs)
    if kwargs.get("out") is not None and result is not kwargs["out"]:
        raise AssertionError("scale(out=...) returned a tensor other than out")
    return result, args, kwargs


class InterpretedKernels:
    """The triton backend as run by the interpreter child, with the signatures of :class:`LoraKernels`;
    tensors the op writes in place are copied back into the caller's tensors."""

    def __init__(self, process: InterpreterProcess) -> None:
        self._process = process

    def shrink(self, x: torch.Tensor, a: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        return self._process.run(_kernel_call, "shrink", x, a, slots)[0]

    def expand(self, out: torch.Tensor, y: torch.Tensor, b: torch.Tensor, slots: TokenSlots) -> None:
        _, args, _ = self._process.run(_kernel_call, "expand", out, y, b, slots)
        out.copy_(args[0])

    def scale(
        self,
        x: torch.Tensor,
        table: torch.Tensor,
        slots: TokenSlots,
        *,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        bias_scaled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        result, _, _ = self._process.run(
            _kernel_call, "scale", x, table, slots, out=out, bias=bias, bias_scaled=bias_scaled
        )
        return result if out is None else out.copy_(result)
