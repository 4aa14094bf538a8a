"""LoHa and LoKr become exact low-rank pairs built from their factors: equal to PEFT's delta weight, of the
rank the factors allow, with no SVD, and with wrong factor shapes refused naming the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from peft.tuners.loha.layer import make_weight
from peft.tuners.lokr.layer import make_kron

from peftserve.adapter_types import convert_adapter
from peftserve.adapter_weights import BaseModelShape, ModuleDelta, read_adapter_files
from peftserve.errors import AdapterLoadError

MODULE = "layer.proj"
PREFIX = f"base_model.model.{MODULE}."


@pytest.fixture(autouse=True)
def no_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every conversion here must be exact by construction: a decomposition would fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("LoHa/LoKr conversion called an SVD")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(torch, "svd", refuse)


def base_shape(in_features: int, out_features: int, device: str = "cpu") -> BaseModelShape:
    weight = torch.empty(out_features, in_features, device=device)
    return BaseModelShape(
        linear_shapes={MODULE: (in_features, out_features)},
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        hidden_size=in_features,
        dtype=torch.float32,
        device=torch.device(device),
        linear_weights={MODULE: weight},
    )


def served_delta(delta: ModuleDelta) -> torch.Tensor:
    """The (out, in) weight the engine adds: ``x @ lora_a @ lora_b`` is ``x @ (lora_a @ lora_b)``."""
    return (delta.lora_a.double() @ delta.lora_b.double()).t()


def random_factors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(sum(shape) for shape in shapes.values()))
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def convert(config: dict, factors: dict[str, torch.Tensor], base: BaseModelShape) -> ModuleDelta:
    weights = convert_adapter(config, {PREFIX + name: t for name, t in factors.items()}, base)
    return weights.modules[MODULE]


# (out, in, r, served rank): r² up to min(out, in), above it the dense delta beside an identity of min(out, in).
LOHA_CASES = [(12, 20, 2, 4), (33, 7, 2, 4), (16, 16, 4, 16), (10, 6, 3, 6), (6, 10, 3, 6)]


@pytest.mark.parametrize(("out_features", "in_features", "rank", "served_rank"), LOHA_CASES)
def test_loha_pair_equals_the_hadamard_delta(out_features: int, in_features: int, rank: int, served_rank: int) -> None:
    factors = random_factors(
        {
            "hada_w1_a": (out_features, rank),
            "hada_w1_b": (rank, in_features),
            "hada_w2_a": (out_features, rank),
            "hada_w2_b": (rank, in_features),
        }
    )
    delta = convert({"peft_type": "LOHA", "r": rank, "alpha": 3}, factors, base_shape(in_features, out_features))
    expected = make_weight(*(factors[name].double() for name in sorted(factors)), scale=torch.tensor(3 / rank))
    assert delta.lora_a.shape[1] == served_rank <= min(out_features, in_features)
    torch.testing.assert_close(served_delta(delta), expected, rtol=1e-5, atol=1e-5)


# LoKr factors W1 (a, c) and W2 (b, d), each full or a low-rank split; the served rank is the product of each
# side's smallest exact inner dimension: r for a split below both sides, else min(rows, cols).
LOKR_CASES = {
    "both full": ({"lokr_w1": (3, 5), "lokr_w2": (4, 2)}, 3 * 2),
    "w1 full a<c, w2 low rank": ({"lokr_w1": (3, 5), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 6)}, 3 * 2),
    "w1 full a>c, w2 low rank": ({"lokr_w1": (5, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 6)}, 3 * 2),
    "w1 low rank, w2 full": ({"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 5), "lokr_w2": (3, 4)}, 2 * 3),
    "both low rank": (
        {"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 5), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 7)},
        2 * 1,
    ),
    "split wider than its factor": ({"lokr_w1_a": (2, 3), "lokr_w1_b": (3, 5), "lokr_w2": (4, 3)}, 2 * 3),
    "square full factors": ({"lokr_w1": (4, 4), "lokr_w2": (3, 3)}, 12),
}


@pytest.mark.parametrize(("shapes", "served_rank"), LOKR_CASES.values(), ids=LOKR_CASES.keys())
def test_lokr_pair_equals_the_kronecker_delta(shapes: dict[str, tuple[int, int]], served_rank: int) -> None:
    factors = random_factors(shapes)
    w1, w2 = (
        factors[f"lokr_{side}"].double()
        if f"lokr_{side}" in factors
        else factors[f"lokr_{side}_a"].double() @ factors[f"lokr_{side}_b"].double()
        for side in ("w1", "w2")
    )
    out_features, in_features = w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]
    config = {"peft_type": "LOKR", "r": 4, "alpha": 6}
    delta = convert(config, factors, base_shape(in_features, out_features))
    assert delta.lora_a.shape[1] == served_rank <= min(out_features, in_features)
    expected = make_kron(w1, w2, scale=6 / 4)
    torch.testing.assert_close(served_delta(delta), expected, rtol=1e-5, atol=1e-5)
    factor1, factor2_t = delta.kronecker  # what the CPU path computes through where the pair is large
    kron = torch.kron(factor1.double(), factor2_t.double().t().contiguous())
    torch.testing.assert_close(kron, expected, rtol=1e-5, atol=1e-5)


class Tiny(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.proj = torch.nn.Linear(in_features, out_features)


# PEFT picks LoKr's factor shapes itself (24 = 4·6 in, 40 = 5·8 out): full factors unless r is small enough.
PEFT_CONFIGS = {
    "LoHa r3": (LoHaConfig(r=3, alpha=5, target_modules=["proj"], init_weights=False), 9),
    "LoKr two full factors": (LoKrConfig(r=4, alpha=3, target_modules=["proj"], init_weights=False), 4 * 6),
    "LoKr w2 low rank": (LoKrConfig(r=2, alpha=3, target_modules=["proj"], init_weights=False), 4 * 2),
    "LoKr both low rank": (
        LoKrConfig(r=2, alpha=3, target_modules=["proj"], init_weights=False, decompose_both=True),
        2 * 2,
    ),
}


@pytest.mark.parametrize(("config", "served_rank"), PEFT_CONFIGS.values(), ids=PEFT_CONFIGS.keys())
def test_saved_peft_adapter_serves_peft_delta_weight(tmp_path: Path, config, served_rank: int) -> None:
    torch.manual_seed(0)
    model = get_peft_model(Tiny(24, 40), config)
    model.save_pretrained(tmp_path)
    saved_config, tensors = read_adapter_files(tmp_path)
    weights = convert_adapter(saved_config, tensors, base_shape(24, 40))
    delta = weights.modules[MODULE]
    assert delta.lora_a.shape[1] == served_rank
    expected = model.base_model.model.layer.proj.get_delta_weight("default").double()
    torch.testing.assert_close(served_delta(delta), expected, rtol=1e-5, atol=1e-6)


def test_on_the_meta_device_the_rank_is_decided_without_data() -> None:
    """Validation converts against a ``meta`` base model: the pair is built there, from shapes alone."""
    factors = random_factors({"lokr_w1": (3, 5), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 6)})
    delta = convert({"peft_type": "LOKR", "r": 2, "alpha": 2}, factors, base_shape(30, 12, device="meta"))
    assert delta.lora_a.device.type == "meta" and delta.lora_a.shape == (30, 6) and delta.lora_b.shape == (6, 12)


LOHA_SHAPES = {"hada_w1_a": (12, 2), "hada_w1_b": (2, 10), "hada_w2_a": (12, 2), "hada_w2_b": (2, 10)}
BAD_FACTORS = [
    (
        "LoHa factor of the wrong width",
        "LOHA",
        {**LOHA_SHAPES, "hada_w2_b": (2, 9)},
        rf"tensor {MODULE}.hada_w2_b has shape \(2, 9\), the base model needs \(2, 10\)",
    ),
    (
        "LoHa factors of different ranks",
        "LOHA",
        {**LOHA_SHAPES, "hada_w2_a": (12, 3)},
        rf"tensor {MODULE}.hada_w2_a has shape \(12, 3\), the base model needs \(12, 2\)",
    ),
    (
        "LoHa convolution factor",
        "LOHA",
        {**LOHA_SHAPES, "hada_w1_a": (12, 2, 1)},
        rf"tensor {MODULE}.hada_w1_a has shape \(12, 2, 1\); a factor .* is a matrix",
    ),
    (
        "LoKr product of the wrong shape",
        "LOKR",
        {"lokr_w1": (3, 5), "lokr_w2": (4, 3)},
        r"w1 factor \(3, 5\) and w2 factor \(4, 3\) has shape \(12, 15\), the base model needs \(12, 10\)",
    ),
    (
        "LoKr split of mismatched rank",
        "LOKR",
        {"lokr_w1": (3, 5), "lokr_w2_a": (4, 2), "lokr_w2_b": (3, 2)},
        rf"tensor {MODULE}.lokr_w2_b has shape \(3, 2\); its rows must match the rank 2 of {MODULE}.lokr_w2_a",
    ),
    (
        "LoKr factor both full and split",
        "LOKR",
        {"lokr_w1": (3, 5), "lokr_w1_a": (3, 1), "lokr_w1_b": (1, 5), "lokr_w2": (4, 2)},
        "needs either lokr_w1 or both lokr_w1_a and lokr_w1_b",
    ),
    (
        "LoKr half a split",
        "LOKR",
        {"lokr_w1": (3, 5), "lokr_w2_a": (4, 2)},
        "needs either lokr_w2 or both lokr_w2_a and lokr_w2_b",
    ),
]


@pytest.mark.parametrize(("case", "peft_type", "shapes", "message"), BAD_FACTORS, ids=[c[0] for c in BAD_FACTORS])
def test_wrong_factor_shapes_are_refused_naming_the_tensor(
    case: str, peft_type: str, shapes: dict[str, tuple[int, ...]], message: str
) -> None:
    with pytest.raises(AdapterLoadError, match=message):
        convert({"peft_type": peft_type, "r": 2, "alpha": 2}, random_factors(shapes), base_shape(10, 12))
