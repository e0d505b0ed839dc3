"""Chat prompts: messages checked, and rendered as each side reads them (no I/O, no models).

As in the paper's chat experiments, the expert (a chat-tuned model) reads the conversation in its
own chat template, while the base and the anti-expert (untuned models of the base's family) read
it in the base's template when the base is a chat model, else as plain text. The paper's
``chat_response_prefix`` goes after the generation prompt on every side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxyclient.errors import ConfigError

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant")
# The plain-text rendering: a base model without a chat template reads this.
PLAIN_ROLES = {"user": "User", "assistant": "Assistant"}


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` with string content (OpenAI's text
    parts joined), or a ConfigError naming the message at fault."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError(
            'messages must be a non-empty list of {"role": ..., "content": ...} objects'
        )
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"messages[{index}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ConfigError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        checked.append({"role": role, "content": _text(message.get("content"), index)})
    if not any(m["role"] == "user" for m in checked):
        raise ConfigError("messages need at least one user turn; add {'role': 'user', ...}")
    return checked


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ConfigError(
        f"messages[{index}].content must be a string or a list of text parts, got {content!r}"
    )


def plain_text(messages: Sequence[Message], response_prefix: str = "") -> str:
    """The conversation for a model without a chat template: the system text, then
    ``User: ...`` / ``Assistant: ...`` lines, then ``Assistant:`` and the response prefix."""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(f"{message['content']}\n")
        else:
            lines.append(f"{PLAIN_ROLES[message['role']]}: {message['content']}")
    return "\n".join([*lines, "Assistant:"]) + response_prefix


def templated_text(tokenizer: Any, messages: Sequence[Message], response_prefix: str = "") -> str:
    """The conversation in ``tokenizer``'s chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return text + response_prefix


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
