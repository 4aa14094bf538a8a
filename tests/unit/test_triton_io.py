"""peftserve.triton.io parses and answers every tensor of the contract table, with a stand-in for Triton's
pb_utils (which exists only inside the server); the real server is tests/integration/test_server.py."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest

from peftserve.contract import INPUTS, OUTPUTS, STREAM, TensorSpec
from peftserve.errors import InvalidRequestError
from peftserve.requests import Completion


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors: list, error=None) -> None:
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture
def io(monkeypatch: pytest.MonkeyPatch):
    stand_in = types.ModuleType("triton_python_backend_utils")
    stand_in.Tensor = _Tensor
    stand_in.InferenceResponse = _Response
    stand_in.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    monkeypatch.delitem(sys.modules, "peftserve.triton.io", raising=False)
    yield importlib.import_module("peftserve.triton.io")
    sys.modules.pop("peftserve.triton.io", None)


def _sample(spec: TensorSpec, row: int):
    """A value of the tensor's type for one row, other than its default."""
    python = spec.type.python
    if python is str:
        return f"{spec.name}-{row}"
    return {bool: True, int: 7 + row, float: 0.25 + row}[python]


def _request(rows: int, specs: list[TensorSpec]) -> dict[str, _Tensor]:
    tensors = {}
    for spec in specs:
        values = [_sample(spec, row) for row in range(rows)]
        if spec.type.python is str:
            values = [value.encode() for value in values]
        array = np.array(values, dtype=spec.type.numpy).reshape(rows, 1)
        if spec.is_list:  # two entries per row, the second empty: padding the parser drops
            array = np.concatenate([array, np.array([[b""]] * rows, dtype=np.object_)], axis=1)
        tensors[spec.name] = _Tensor(spec.name, array)
    return tensors


def test_every_input_of_the_table_reaches_its_request_field(io) -> None:
    rows = io.parse_request(_request(3, list(INPUTS)))
    assert len(rows) == 3
    for index, row in enumerate(rows):
        for spec in INPUTS:
            value = getattr(row, spec.attribute)
            expected = _sample(spec, index)
            if not spec.decode:
                expected = expected.encode()  # handed on as sent; the engine decodes it
            if spec.is_list:
                assert value == (expected,)
            else:
                assert value == pytest.approx(expected) and type(value) is type(expected)


def test_absent_optional_inputs_take_the_tables_defaults(io) -> None:
    (row,) = io.parse_request(_request(1, [spec for spec in INPUTS if not spec.optional]))
    for spec in INPUTS:
        if spec.optional:
            assert getattr(row, spec.attribute) == spec.default
    assert io.wants_stream({}) is STREAM.default
    assert io.wants_stream(_request(1, [STREAM])) is True


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "missing required input text_input"),
        (
            {"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_), "max_tokens": np.array([[3]], dtype=np.int32)},
            "input max_tokens has 1 elements, text_input has 2",
        ),
        (
            {"text_input": np.array([[b"a"]], dtype=np.object_), "adapter_id": np.array([[b"\xff"]], dtype=np.object_)},
            "input adapter_id is not valid UTF-8",
        ),
        (
            {
                "text_input": np.array([[b"a"], [b"b"]], dtype=np.object_),
                "stop": np.array([[b"x", b"y", b"z"]], dtype=np.object_),
            },
            "input stop has 3 elements, not a list per row of 2",
        ),
    ],
)
def test_malformed_requests_are_refused_by_name(io, tensors: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        io.parse_request({name: _Tensor(name, array) for name, array in tensors.items()})


def test_answers_carry_every_output_of_the_table(io) -> None:
    answers = [Completion("é1", "pirate@1", 3, "stop"), Completion("two", "", 5, "length")]
    response = io.success_response(answers)
    assert [t.name() for t in response.output_tensors] == [spec.name for spec in OUTPUTS]
    for tensor, spec in zip(response.output_tensors, OUTPUTS, strict=True):
        assert tensor.as_numpy().shape == (2, 1) and tensor.as_numpy().dtype == np.dtype(spec.type.numpy)
    outputs = {t.name(): t.as_numpy()[:, 0].tolist() for t in response.output_tensors}
    assert outputs == {
        "text_output": ["é1".encode(), b"two"],
        "adapter_version": [b"pirate@1", b""],
        "output_tokens": [3, 5],
    }
    piece = io.piece_response("ab", "pirate@1")
    assert {t.name(): t.as_numpy()[0, 0] for t in piece.output_tensors} == {
        "text_output": b"ab",
        "adapter_version": b"pirate@1",
    }
