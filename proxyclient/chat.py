"""Chat prompts: messages checked, and rendered as each side reads them (no I/O, no models).

As in the paper's chat experiments, the expert (a chat-tuned model) reads the conversation in its
own chat template, while the base and the anti-expert (untuned models of the base's family) read
it in the base's template when the base is a chat model, else as plain text. The paper's
``chat_response_prefix`` goes after the generation prompt on every side. How a conversation is
read travels with it (:class:`Chat`), not with the generation options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxyclient.errors import ConfigError

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant")
# The plain-text rendering: a base model without a chat template reads this.
PLAIN_ROLES = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Chat:
    """A conversation to continue, and how the sides read it.

    ``messages``: ``{"role": "system"|"user"|"assistant", "content": ...}`` objects (a plain list
    of them is a ``Chat`` with the defaults). ``response_prefix``: the text the answer starts with,
    on every side (chat dialects send it as the start of the assistant's turn).
    ``base_template``: the base and the anti-expert read the base's chat template (None: when its
    tokenizer has one) or plain text (``User: ...`` lines, ``Assistant:``).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    response_prefix: str = ""
    base_template: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", check_messages(self.messages))
        if not isinstance(self.response_prefix, str):
            raise ConfigError(f"response_prefix must be a string, got {self.response_prefix!r}")
        if self.base_template not in (None, True, False):
            raise ConfigError(
                f"base_template must be None (auto), True or False, got {self.base_template!r}"
            )

    @classmethod
    def of(cls, prompt: Any) -> Chat:
        """``prompt`` as a Chat: itself, or a list of messages with the defaults."""
        return prompt if isinstance(prompt, Chat) else cls(prompt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "response_prefix": self.response_prefix,
            "base_template": self.base_template,
        }


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
