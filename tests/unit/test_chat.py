"""Chat requests (``messages``): parsing errors, rendering with the chat template, limits on the rendered prompt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftserve.chat import parse_messages
from peftserve.engine import Engine
from peftserve.errors import BlockedContentError, InvalidRequestError
from peftserve.requests import Completion, CompletionRequest
from tests.conftest import demo_config

# A ChatML-style template for the demo tokenizer, which ships none; it starts with the BOS token, as the
# templates of Llama-family models do, so the rendered text carries every special token itself.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat looks at"}]

BAD_MESSAGES = [
    ("not json", "{role: user}", r"messages is not valid JSON \(.* at character 1\)"),
    ("an object", '{"role": "user", "content": "hi"}', "non-empty JSON list .* got an object"),
    ("empty list", "[]", "non-empty JSON list .* got an empty list"),
    ("a string item", '["hi"]', r"messages\[0\] must be an object with role and content, got a string"),
    ("unknown role", '[{"role": "wizard", "content": "hi"}]', r"messages\[0\]\.role must be one of .* got 'wizard'"),
    ("missing role", '[{"content": "hi"}]', r"messages\[0\]\.role must be one of .* got None"),
    ("content a list", '[{"role": "user", "content": ["hi"]}]', r"messages\[0\]\.content must be a string"),
    ("content null", '[{"role": "user", "content": null}]', r"messages\[0\]\.content must be a string, got null"),
    (
        "extra key",
        '[{"role": "user", "content": "hi"}, {"role": "user", "content": "x", "name": "bob"}]',
        r"messages\[1\] has unsupported keys \['name'\]",
    ),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD_MESSAGES, ids=[case for case, _, _ in BAD_MESSAGES])
def test_malformed_messages_are_refused_saying_what_is_wrong(case: str, text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_messages(text, max_bytes=1000)


def test_a_tokenizer_without_a_template_refuses_messages(engine: Engine) -> None:
    assert not engine.tokenizer.chat_template
    (answer,) = engine.complete([CompletionRequest(text="", messages=json.dumps(HELLO))])
    assert isinstance(answer, InvalidRequestError)
    assert "no chat template; send the prompt in text_input instead" in str(answer)


@pytest.fixture
def chat_engine(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setattr(engine.tokenizer, "chat_template", TEMPLATE)
    return engine


def test_messages_are_rendered_with_the_template_and_answered_like_that_prompt(chat_engine: Engine) -> None:
    rendered = chat_engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><system> be brief</s><user> the cat looks at</s><assistant>"
    row, _ = chat_engine.prepare(CompletionRequest(text="", messages=json.dumps(HELLO), adapter_id="pirate"))
    # The rendered text brings its own BOS: encoded without adding another one.
    assert row.prompt_ids == chat_engine.tokenizer(rendered, add_special_tokens=False).input_ids
    assert row.prompt_ids.count(chat_engine.tokenizer.bos_token_id) == 1
    # The same prompt sent as text_input (whose BOS the tokenizer adds) gets the same answer, per adapter.
    as_text = rendered.removeprefix("<s>")
    for adapter_id in ["", "pirate", "poet"]:
        chat, plain = chat_engine.complete(
            [
                CompletionRequest(text="", messages=json.dumps(HELLO), adapter_id=adapter_id, max_tokens=12),
                CompletionRequest(text=as_text, adapter_id=adapter_id, max_tokens=12),
            ]
        )
        assert isinstance(chat, Completion) and chat == plain


def test_text_input_must_be_empty_when_messages_is_set(chat_engine: Engine) -> None:
    (answer,) = chat_engine.complete([CompletionRequest(text=b"a dog", messages=json.dumps(HELLO))])
    assert isinstance(answer, InvalidRequestError)
    assert "text_input must be empty when messages is set" in str(answer)


def test_empty_messages_means_text_input(chat_engine: Engine) -> None:
    with_empty, without = chat_engine.complete(
        [CompletionRequest(text="a dog", messages="", max_tokens=6), CompletionRequest(text="a dog", max_tokens=6)]
    )
    assert isinstance(with_empty, Completion) and with_empty == without


def test_a_template_that_raises_is_an_invalid_request(chat_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations start with user') }}{% endif %}"
    monkeypatch.setattr(chat_engine.tokenizer, "chat_template", strict + TEMPLATE)
    (answer,) = chat_engine.complete([CompletionRequest(text="", messages=json.dumps(HELLO))])
    assert isinstance(answer, InvalidRequestError)
    assert "the chat template refused these messages: conversations start with user" in str(answer)


# Like the default system prompt of many instruct templates: rendered prompts are longer than the contents.
PREAMBLE = "{{ bos_token }}<system> you are a helpful assistant who answers in a few words</s>"


@pytest.fixture
def limited(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    parameters = {"max_prompt_tokens": "64", "max_prompt_bytes": "160", "blocked_patterns": '["<system> be brief"]'}
    engine = Engine(demo_config(model_dir, **parameters))
    monkeypatch.setattr(engine.tokenizer, "chat_template", PREAMBLE + TEMPLATE.removeprefix("{{ bos_token }}"))
    return engine


def request(*messages: dict[str, str]) -> CompletionRequest:
    return CompletionRequest(text="", messages=json.dumps(list(messages)), max_tokens=4)


def test_the_limits_apply_to_the_rendered_prompt(limited: Engine) -> None:
    (ok,) = limited.complete([request({"role": "user", "content": "a dog"})])
    assert isinstance(ok, Completion)
    # Contents well within the limits; the template's own text takes the rendered prompt over them.
    words = {"role": "user", "content": "the cat looks at the market"}
    assert len(limited.tokenizer(words["content"]).input_ids) < 20
    (tokens,) = limited.complete([request(words, words)])
    assert isinstance(tokens, InvalidRequestError)
    assert re.search(r"the rendered messages has \d+ tokens, more than max_prompt_tokens \(64\)", str(tokens))
    letters = {"role": "user", "content": "a" * 80}
    assert len(json.dumps([letters]).encode()) < 160
    (size,) = limited.complete([request(letters)])
    assert isinstance(size, InvalidRequestError)
    assert re.search(r"the rendered messages has \d+ bytes, more than max_prompt_bytes \(160\)", str(size))
    # JSON beyond the byte limit is refused before it is parsed.
    (raw,) = limited.complete([request({"role": "user", "content": "a" * 200})])
    assert isinstance(raw, InvalidRequestError) and "messages has 233 bytes, more than max_prompt_bytes" in str(raw)
    # Blocked patterns see the rendered prompt: the role tag comes from the template, the words from the message.
    (blocked,) = limited.complete([request({"role": "system", "content": "be brief"})])
    assert isinstance(blocked, BlockedContentError) and "the rendered messages refused" in str(blocked)
