"""Column-major base weights on a CPU: same shapes, values and answers; tied weights stay tied."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftserve.cpu_weights import is_column_major, lay_out_for_cpu_matmul
from peftserve.engine import Engine


def _tiny_llama(*, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(vocab_size=97, num_hidden_layers=2, tie_word_embeddings=tied, **shape)
    return LlamaForCausalLM(config).eval()


def _linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_every_float32_linear_weight_moves_and_keeps_its_shape_values_and_logits() -> None:
    model = _tiny_llama(tied=False)
    ids = torch.randint(0, 97, (3, 11))
    before_logits = model(ids).logits
    before = [w.detach().clone() for w in _linear_weights(model)]
    assert not any(is_column_major(w) for w in _linear_weights(model))

    moved = lay_out_for_cpu_matmul(model)

    weights = _linear_weights(model)
    assert moved == len(weights) == 2 * 7 + 1  # seven per layer and the head
    assert all(is_column_major(w) and not w.is_contiguous() for w in weights)
    assert all(torch.equal(w, b) and w.shape == b.shape for w, b in zip(weights, before, strict=True))
    assert all(isinstance(w, torch.nn.Parameter) for w in weights)
    torch.testing.assert_close(model(ids).logits, before_logits, rtol=1e-5, atol=1e-5)
    assert lay_out_for_cpu_matmul(model) == 0  # already laid out: nothing copied again


def test_a_head_tied_to_the_embeddings_stays_tied_and_lookups_still_read_the_right_rows() -> None:
    model = _tiny_llama(tied=True)
    table = model.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[5, 96, 0, 41]])

    lay_out_for_cpu_matmul(model)

    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert is_column_major(model.lm_head.weight)
    assert torch.equal(model.get_input_embeddings()(ids)[0], table[ids[0]])


def test_half_precision_weights_are_left_as_they_are() -> None:
    model = _tiny_llama(tied=False).to(torch.bfloat16)
    assert lay_out_for_cpu_matmul(model) == 0
    assert all(w.is_contiguous() for w in _linear_weights(model))


def test_a_cpu_engine_serves_with_its_weights_laid_out(engine: Engine) -> None:
    assert all(is_column_major(w) for w in _linear_weights(engine.model))
