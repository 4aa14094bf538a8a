"""Compile our triton-lang kernels for real GPUs on a machine that has none.

The interpreter (tests/interpreted_triton.py) checks what a kernel computes, but runs its Python body with
numpy: code the compiler refuses (types that differ between branches, an op a dtype lacks, a layout the
GPU backend cannot lower) passes it. triton's compiler itself needs no device: given the argument types
and a target (``GPUTarget("cuda", 90, 32)``), ``triton.compile`` lowers a kernel to PTX and, with the
``ptxas`` the triton wheel ships, to a cubin. The launch is captured from our own launcher, called with
CPU tensors of the dtypes a GPU would see, so the compiled signature is the one a GPU run would build.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}


class _Launch(Exception):
    """Raised instead of launching: carries the captured arguments out of the launcher."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("launch captured")
        self.args, self.kwargs = args, kwargs


@contextmanager
def _captured(kernel: triton.JITFunction):
    with pytest.MonkeyPatch.context() as patch:

        def run(*args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any) -> None:
            raise _Launch(args, kwargs)

        patch.setattr(kernel, "run", run)
        yield


def capture_launch(
    kernel: triton.JITFunction, launcher: Callable[[], Any], *, skipped: tuple[triton.JITFunction, ...] = ()
) -> dict[str, Any]:
    """Call ``launcher`` (which launches ``kernel`` once, after the ``skipped`` kernels, which do nothing
    here) and return the launch's arguments by name."""
    with _captured(kernel), pytest.MonkeyPatch.context() as patch:
        for other in skipped:
            patch.setattr(other, "run", lambda *args, **kwargs: None)
        try:
            launcher()
        except _Launch as launch:
            named = dict(zip(kernel.arg_names, launch.args, strict=False))
            return {**named, **launch.kwargs}
    raise AssertionError(f"{kernel.fn.__name__} was not launched")


def _type_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {type(value).__name__}")


def compile_for(kernel: triton.JITFunction, arguments: dict[str, Any], capability: int) -> Any:
    """Compile ``kernel`` with ``arguments`` (constexprs by value) for CUDA compute capability ``capability``
    (80: A100, 90: H100/H200); returns the compiled kernel (``.asm['cubin']`` and the stages before it)."""
    signature, constexprs = {}, {}
    for index, parameter in enumerate(kernel.params):
        name, value = parameter.name, arguments[parameter.name]
        if parameter.is_constexpr:
            signature[name], constexprs[(index,)] = "constexpr", value
        else:
            signature[name] = _type_of(value)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))
