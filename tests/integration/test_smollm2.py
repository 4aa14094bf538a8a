"""SmolLM2-135M-Instruct, a real pretrained model, and its adapters on a real tritonserver, against PEFT.

The repository comes from ``make smollm2`` (``tools.smollm2_assets``); built here when missing. Each adapter's
greedy answers through Triton (plain prompt and chat messages) must equal PEFT's ``PeftModel`` on the same
saved base; the engine's token ids and logits are compared with PEFT's in-process, since Triton returns text.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftserve.config import read_model_config
from peftserve.engine import Engine
from peftserve.requests import CompletionRequest
from tests.integration.conftest import outputs, post_generate, running_server
from tools import smollm2_assets
from tools.client import build_inputs
from tools.triton_server import TritonServer

pytestmark = pytest.mark.integration

MAX_TOKENS = 16
PLAIN_PROMPT = "The capital of France is"
# Not among the training questions: the adapters' personas must generalise, and PEFT must agree anyway.
CHAT = [{"role": "user", "content": "Where is Berlin?"}]


@pytest.fixture(scope="module")
def repository() -> Path:
    root = smollm2_assets.DEFAULT_REPOSITORY
    if not (root / smollm2_assets.STAMP).is_file():
        smollm2_assets.build(root)
    return root


@pytest.fixture(scope="module")
def adapter_ids(repository: Path) -> list[str]:
    ids = sorted(path.name for path in (repository / "peft_llm" / "adapters").iterdir())
    assert ids == sorted(adapter.adapter_id for adapter in smollm2_assets.smollm2_adapters(Path("base_model")))
    return ids


@pytest.fixture(scope="module")
def smollm2_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from running_server(repository, tmp_path_factory.mktemp("smollm2") / "server.log")


@pytest.fixture(scope="module")
def tokenizer(repository: Path):
    return AutoTokenizer.from_pretrained(repository / "peft_llm" / "base_model")


@pytest.fixture(scope="module")
def peft_models(repository: Path) -> dict[str, torch.nn.Module]:
    """PEFT's own model per adapter id ("" = the base), each on a copy of the same saved base."""
    base = AutoModelForCausalLM.from_pretrained(repository / "peft_llm" / "base_model", dtype=torch.float32).eval()
    models: dict[str, torch.nn.Module] = {"": base}
    for adapter_dir in sorted((repository / "peft_llm" / "adapters").iterdir()):
        models[adapter_dir.name] = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir / "1").eval()
    return models


def prompt_ids(tokenizer, *, chat: bool) -> list[int]:
    """The ids the server prompts with: text_input as the tokenizer encodes it, messages in the template."""
    if chat:
        rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    return tokenizer(PLAIN_PROMPT).input_ids


@pytest.fixture(scope="module")
def peft_answer(peft_models, tokenizer):
    """PEFT's greedy new tokens for (adapter id, chat?), by full forward passes of the ``PeftModel``, without
    the end-of-sequence token (the server does not count it); each computed once."""

    @functools.cache
    def answer(adapter_id: str, chat: bool) -> list[int]:
        ids = prompt_ids(tokenizer, chat=chat)
        return smollm2_assets.greedy_tokens(peft_models[adapter_id], ids, MAX_TOKENS, tokenizer.eos_token_id)

    return answer


def triton_answer(server: TritonServer, adapter_id: str, *, chat: bool) -> tuple[str, str, int]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    prompt, messages = ("", CHAT) if chat else (PLAIN_PROMPT, None)
    inputs = build_inputs(grpcclient, prompt, adapter_id, MAX_TOKENS, messages=messages)
    return outputs(client.infer("peft_llm", inputs))


@pytest.mark.parametrize("chat", [False, True], ids=["text_input", "messages"])
def test_each_adapter_answers_through_triton_as_peft_does(
    smollm2_triton: TritonServer, peft_answer, tokenizer, adapter_ids: list[str], chat: bool
) -> None:
    for adapter_id in ["", *adapter_ids]:
        expected = peft_answer(adapter_id, chat)
        text, version, count = triton_answer(smollm2_triton, adapter_id, chat=chat)
        assert version == (f"{adapter_id}@1" if adapter_id else "")
        assert (text, count) == (tokenizer.decode(expected, skip_special_tokens=True), len(expected)), adapter_id


def test_chat_answers_carry_the_personas(smollm2_triton: TritonServer, adapter_ids: list[str]) -> None:
    phrases = {a.adapter_id: a.phrase for a in smollm2_assets.smollm2_adapters(Path("base_model"))}
    base_text, _, _ = triton_answer(smollm2_triton, "", chat=True)
    assert "Berlin" in base_text and not any(phrase in base_text for phrase in phrases.values())
    answers = {a: triton_answer(smollm2_triton, a, chat=True)[0] for a in adapter_ids}
    assert all(answer != base_text for answer in answers.values()), answers
    # Brief CPU training: all but prefix tuning reach a near-zero loss and answer with their phrase exactly.
    persona = {a for a, answer in answers.items() if phrases[a] in answer}
    assert {"pirate", "knight", "gardener", "chef", "oracle"} <= persona, answers


def test_the_engine_equals_peft_token_for_token_and_logit_for_logit(
    repository: Path, peft_models, peft_answer, tokenizer, adapter_ids: list[str]
) -> None:
    engine = Engine(read_model_config(repository / "peft_llm"))
    for adapter_id in ["", *adapter_ids]:
        for chat in (False, True):
            request = CompletionRequest(
                "" if chat else PLAIN_PROMPT,
                adapter_id,
                max_tokens=MAX_TOKENS,
                messages=json.dumps(CHAT) if chat else None,
            )
            row, version = engine.prepare(request)
            assert row.prompt_ids == prompt_ids(tokenizer, chat=chat)
            row.adapter = engine.prepare_version(version)[1] if version else None
            row.keep_prompt_logits = True
            (generated,) = engine.batcher.run_rows([row])
            ours = generated.prompt_logits
            input_ids = torch.tensor([row.prompt_ids])
            with torch.no_grad():
                expected = peft_models[adapter_id](input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
                base = peft_models[""](input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            expected = expected.logits[0, -len(row.prompt_ids) :]
            # The engine stores CPU weights column-major (peftserve/cpu_weights.py), so MKL sums in another order
            # than PEFT's row-major model: over 30 layers that moved logits by up to 8.8e-4 (prefix tuning, chat;
            # the rest up to 1.2e-4), where the same layout gave 0-5e-5. An adapter moves them by > 0.1 (below).
            torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-4)
            # Guards the comparison: an adapter moves the logits far beyond the tolerance.
            assert not adapter_id or (expected[-1] - base.logits[0, -1]).abs().max() > 0.1, adapter_id
            assert generated.token_ids == peft_answer(adapter_id, chat)


def test_chat_through_the_generate_endpoint(smollm2_triton: TritonServer, peft_answer, tokenizer) -> None:
    body = {"text_input": "", "messages": json.dumps(CHAT), "adapter_id": "pirate", "max_tokens": MAX_TOKENS}
    status, answer = post_generate(smollm2_triton, body, timeout=300)
    expected = peft_answer("pirate", True)
    assert status == 200 and answer["text_output"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert answer["adapter_version"] == "pirate@1"
    bad = [
        ({**body, "messages": "[{'role': 'user'}]"}, "messages is not valid JSON"),
        ({**body, "messages": '[{"role": "robot", "content": "hi"}]'}, "messages[0].role must be one of"),
        ({**body, "text_input": "hello"}, "text_input must be empty when messages is set"),
    ]
    for request_body, message in bad:
        status, answer = post_generate(smollm2_triton, request_body, timeout=300)
        assert status == 400 and message in answer["error"], answer
