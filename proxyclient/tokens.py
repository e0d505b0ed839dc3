"""TokenSpace: the one owner of tokenization for a base and its proxies.

It holds the proxies' tokenizer (the anti-expert's; the expert's must match it), the expert's own
(for its chat template), and the base's, adopted from the adapter when the adapter carries one
(OpenAI, TGI, chat: they name tokens by text and cannot work without it), or given explicitly.
From them it derives, once, everything the loop needs: the vocabulary bridge between base ids and
proxy ids, the EOS ids, prompt encoding on both sides, decoding, single-token options, a realigner
per generation, and the check that a server without a known tokenizer tokenizes as we think.
Base and proxies with byte-for-byte the same vocabulary share ids: the bridge is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxyclient.adapters.base import BaseModel, TopLogprobs
from proxyclient.bridge import Realigner, VocabBridge
from proxyclient.bridge_cache import cached_bridge
from proxyclient.chat import Chat, has_template, plain_text, templated_text
from proxyclient.config import GenerationConfig
from proxyclient.constraints import Constraint
from proxyclient.errors import ConfigError
from proxyclient.masking import GrammarState, grammar_tokenizer
from proxyclient.tokenizer import BaseTokenizer, load_base_tokenizer
from proxyclient.vocab import ByteVocab, from_hf


@dataclass(frozen=True)
class PromptIds:
    """One prompt, encoded for each side."""

    base: list[int]  # what the base continues (the base's tokenizer)
    proxy: list[int]  # the anti-expert's prompt (and the expert's, without a chat template)
    expert: list[int]  # the expert's prompt
    # A chat prompt's checked messages and response prefix, which chat dialects send as they are
    # (``Prompt.messages``); None for a text prompt.
    messages: tuple[Mapping[str, str], ...] | None = None
    response_prefix: str = ""


class TokenSpace:
    """Tokenizers of the base and the proxies, and the bridge between them.

    ``tokenizer``: the proxies' (HF, fast). ``expert_tokenizer``: the expert's, same vocabulary.
    ``base_tokenizer``: explicit base tokenizer (folder, ``tiktoken:ENCODING``, object) or None.
    ``vocab_size``: ids both proxies score. ``proxy_eos``: the proxies' EOS ids.
    """

    def __init__(
        self,
        base: BaseModel,
        tokenizer: Any,
        expert_tokenizer: Any,
        *,
        base_tokenizer: Any = None,
        vocab_size: int,
        proxy_eos: frozenset[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.expert_tokenizer = expert_tokenizer
        self.vocab_size = vocab_size
        adopted = _adopt(base, base_tokenizer)
        self._proxy_vocab: ByteVocab | None = None
        # Checked once, on the first prompt, where nothing tells us how the server tokenizes.
        self._server_check_pending = adopted is None
        if adopted is not None:
            self._proxy_vocab = from_hf(tokenizer)
            if _same_vocabulary(adopted.vocab, self._proxy_vocab):
                adopted = None  # the same tokenizer under another name: ids are shared
        self.base_tokenizer: BaseTokenizer | None = adopted
        self.base_text_tokenizer = adopted if adopted is not None else BaseTokenizer(tokenizer)
        if adopted is None:
            self.bridge = VocabBridge.identity(vocab_size)
            self.eos_ids = proxy_eos
        else:
            assert self._proxy_vocab is not None
            self.bridge = cached_bridge(adopted, self._proxy_vocab, proxy_eos, vocab_size)
            base_eos = adopted.eos_token_id
            self.eos_ids = frozenset({base_eos} if base_eos is not None else set())

    def __repr__(self) -> str:
        base = self.base_tokenizer if self.base_tokenizer is not None else "shared"
        return f"TokenSpace(base={base!r}, shared_tokens={self.bridge.shared})"

    @property
    def bridged(self) -> bool:
        """True when base and proxies tokenize differently."""
        return self.base_tokenizer is not None

    # -- encoding and decoding ----------------------------------------------------------------

    def encode_prompt(self, prompt: str, *, expert_chat_template: bool = False) -> PromptIds:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
        proxy = list(self.tokenizer(prompt).input_ids)
        if not proxy:
            raise ConfigError("the prompt is empty and the tokenizer adds no BOS token")
        base = self.base_tokenizer.encode(prompt) if self.base_tokenizer is not None else proxy
        expert = self._encode_for_expert(prompt) if expert_chat_template else proxy
        return PromptIds(base=base, proxy=proxy, expert=expert)

    def encode(self, prompt: Any, config: GenerationConfig) -> tuple[str, PromptIds]:
        """A prompt as it is read: text (the expert's chat template if ``config`` asks), or a
        conversation (a ``Chat`` or its messages) rendered per side. Returns the base's text
        and the ids of every side."""
        if isinstance(prompt, str):
            ids = self.encode_prompt(prompt, expert_chat_template=config.expert_chat_template)
            return prompt, ids
        return self.encode_chat(Chat.of(prompt))

    def encode_chat(self, chat: Chat) -> tuple[str, PromptIds]:
        """A conversation, rendered and encoded for each side (``proxyclient.chat``): the base's
        text (the base's chat template when it has one and ``chat.base_template`` is not False,
        else plain text) and its ids on every side; the expert reads its own template. The
        messages travel with the ids, for chat dialects to send with their roles."""
        messages, response_prefix = chat.messages, chat.response_prefix
        base_chat_template = chat.base_template
        holder = self._base_template_holder()
        if base_chat_template and holder is None:
            raise ConfigError(
                "base_template=True but the base's tokenizer has no chat template; leave it "
                "out (plain text) or give the base's tokenizer (base_tokenizer=DIR)"
            )
        use_template = holder is not None if base_chat_template is None else base_chat_template
        base_text = (
            templated_text(holder, messages, response_prefix)
            if use_template
            else plain_text(messages, response_prefix)
        )
        expert_text = (
            templated_text(self.expert_tokenizer, messages, response_prefix)
            if has_template(self.expert_tokenizer)
            else base_text
        )
        proxy = _encode_rendered(self.tokenizer, base_text)
        if self.base_tokenizer is None:
            base = proxy
        elif self.base_tokenizer.is_tiktoken:
            base = self.base_tokenizer.encode(base_text)
        else:
            base = _encode_rendered(self.base_tokenizer.inner, base_text)
        expert = _encode_rendered(self.expert_tokenizer, expert_text)
        return base_text, PromptIds(
            base=base,
            proxy=proxy,
            expert=expert,
            messages=tuple(messages),
            response_prefix=response_prefix,
        )

    def _base_template_holder(self) -> Any:
        """The HF tokenizer whose chat template the base reads, or None: the base's own, or,
        when base and proxies share a tokenizer, the proxies'."""
        holder = self.base_tokenizer.inner if self.base_tokenizer is not None else self.tokenizer
        return holder if has_template(holder) else None

    def decode(self, base_ids: Sequence[int]) -> str:
        """Text of base ids, without special tokens."""
        return self.base_text_tokenizer.decode(list(base_ids))

    def grammar_state(self, constraint: Constraint) -> GrammarState:
        """A new generation's position in ``constraint``'s grammar, over the base's tokens."""
        base = self.base_text_tokenizer
        tokenizer = grammar_tokenizer(
            base.vocab, self.eos_ids, lambda text: base.encode(text, add_special_tokens=False)
        )
        return GrammarState(constraint, tokenizer, self.bridge.base_size)

    def token_text(self, base_id: int) -> str:
        """One base token's text (U+FFFD for a part of a character)."""
        return self.decode([base_id])

    def token_bytes(self, base_id: int) -> bytes:
        """One base token's bytes: for a part of a character, the raw bytes its decoded text
        shows as U+FFFD; for a special token, those of its decoded text (none)."""
        vocab = self.base_text_tokenizer.vocab
        data = vocab.token_bytes[base_id] if 0 <= base_id < len(vocab) else None
        return data if data is not None else self.decode([base_id]).encode()

    def single_token(self, option: str) -> int:
        """The base id of ``option``, which must be exactly one token."""
        if self.base_tokenizer is not None:
            ids = self.base_tokenizer.encode(option, add_special_tokens=False)
        else:
            ids = self.tokenizer(option, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(
                f"option {option!r} is {len(ids)} tokens {ids}; choose() compares single-token "
                f"options (try a shorter label, or one with a leading space such as ' A')"
            )
        return int(ids[0])

    def realigner(self) -> Realigner | None:
        """A fresh realigner for one generation; None when base and proxies share ids."""
        if self.base_tokenizer is None or self._proxy_vocab is None:
            return None
        return Realigner(
            self.base_tokenizer.vocab,
            self._proxy_vocab,
            lambda text: self.tokenizer(text, add_special_tokens=False).input_ids,
        )

    # -- checks -------------------------------------------------------------------------------

    async def check_server(self, base: BaseModel, prompt: str, base_ids: Sequence[int]) -> None:
        """Once: without a base tokenizer, the server must tokenize as the proxies do."""
        if not self._server_check_pending:
            return
        self._server_check_pending = False
        tokenize = getattr(base, "tokenize", None)
        server_ids = await tokenize(prompt) if tokenize is not None else None
        if server_ids is not None and list(server_ids) != list(base_ids):
            raise ConfigError(
                f"the base tokenizes the prompt differently from the proxies ({len(server_ids)} "
                f"vs {len(base_ids)} tokens): pass the base's tokenizer as base_tokenizer=... so "
                f"that the two are bridged"
            )

    def check_unresolved(self, top: TopLogprobs) -> None:
        """Most returned tokens unknown to the proxies' tokenizer: the base tokenizes otherwise."""
        if self.base_tokenizer is None and top.unresolved > len(top):
            raise ConfigError(
                f"{top.unresolved} of the base's {top.unresolved + len(top)} candidates are not "
                f"tokens of the proxies' tokenizer: the base tokenizes differently; pass its "
                f"tokenizer as base_tokenizer=..."
            )

    def _encode_for_expert(self, prompt: str) -> list[int]:
        tokenizer = self.expert_tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "expert_chat_template=True but the expert's tokenizer has no chat_template; "
                "drop the option or use an expert whose tokenizer_config.json defines one"
            )
        return _encode_rendered(
            tokenizer, templated_text(tokenizer, [{"role": "user", "content": prompt}])
        )


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """``text`` (a rendered template may begin with the BOS token itself) as ids, one BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = bool(bos) and text.startswith(bos)
    ids = list(tokenizer(text, add_special_tokens=not has_bos).input_ids)
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer adds no BOS token")
    return ids


def _adopt(base: BaseModel, explicit: Any) -> BaseTokenizer | None:
    """The base's tokenizer: the adapter's own, or the explicit one; both must agree."""
    carried = getattr(base, "tokenizer", None)
    given = load_base_tokenizer(explicit) if explicit is not None else None
    if carried is None or given is None:
        return given if given is not None else carried
    if given is not carried and given.vocab.token_bytes != carried.vocab.token_bytes:
        raise ConfigError(
            f"base_tokenizer={given!r} differs from the tokenizer the {base.name!r} adapter "
            f"already uses ({carried!r}): pass the base's tokenizer once, to connect(..., "
            f"tokenizer=...), and leave base_tokenizer out"
        )
    return carried


def _same_vocabulary(base: ByteVocab, proxy: ByteVocab) -> bool:
    return base.token_bytes == proxy.token_bytes and base.special_ids == proxy.special_ids
