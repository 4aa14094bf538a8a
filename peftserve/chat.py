"""Chat requests: the optional ``messages`` input, checked and rendered with the tokenizer's chat template.

``messages`` is JSON text of an OpenAI-style list, ``[{"role": "user", "content": "..."}]``. Instruct models
expect their own template around each turn (special tokens, a default system prompt); the engine renders
it with ``apply_chat_template(..., add_generation_prompt=True)`` so clients never hand-write it.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from peftserve.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256


def parse_messages(text: str, *, max_bytes: int) -> list[dict[str, str]]:
    """The messages of a request, or :class:`InvalidRequestError` saying what is wrong with them.

    JSON above ``max_bytes`` (the prompt's byte limit) is refused before it is parsed.
    """
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidRequestError(f"messages has {size} bytes, more than max_prompt_bytes ({max_bytes})")
    try:
        messages: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"messages is not valid JSON ({exc.msg} at character {exc.pos}); expected a list like "
            '[{"role": "user", "content": "Hello"}]'
        ) from exc
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            f"messages must be a non-empty JSON list of {{role, content}} objects, got {_kind(messages)}"
        )
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"messages has {len(messages)} entries, at most {MAX_MESSAGES} allowed")
    for index, message in enumerate(messages):
        _check_message(index, message)
    return messages


def _check_message(index: int, message: Any) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be an object with role and content, got {_kind(message)}")
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise InvalidRequestError(f"{where} has unsupported keys {unknown}; only role and content are accepted")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise InvalidRequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string, got {_kind(content)}")


def render_messages(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages`` in the tokenizer's chat template, ending where the answer starts.

    The text already holds every special token the template wants: encode it without adding any.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "messages cannot be used: the base model's tokenizer has no chat template; send the prompt in "
            "text_input instead"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:  # templates refuse some conversations (e.g. roles out of order)
        raise InvalidRequestError(f"the chat template refused these messages: {exc}") from exc


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    names = {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
