"""The base model's tokenizer, whatever its kind: a local Hugging Face tokenizer or tiktoken.

Adapters that exchange text or token strings with a server (OpenAI, chat, TGI) need it to turn the
ids the loop tracks into text, and the server's token strings or bytes back into ids.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from proxyclient.errors import ConfigError, ModelLoadError
from proxyclient.vocab import ByteVocab, from_hf, from_tiktoken

TIKTOKEN_PREFIX = "tiktoken:"
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# transformers' fast tokenizer class: 5.x's name, then 4.x's.
_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


class BaseTokenizer:
    """encode/decode plus the byte vocabulary, over an HF tokenizer or a tiktoken Encoding."""

    def __init__(self, inner: Any, *, name: str = "") -> None:
        self.inner = inner
        self.is_tiktoken = hasattr(inner, "decode_single_token_bytes")
        self.name = name or getattr(inner, "name_or_path", None) or getattr(inner, "name", "")

    def __repr__(self) -> str:
        kind = "tiktoken" if self.is_tiktoken else "hf"
        return f"BaseTokenizer({kind}:{self.name!s})"

    @cached_property
    def vocab(self) -> ByteVocab:
        return from_tiktoken(self.inner) if self.is_tiktoken else from_hf(self.inner)

    @cached_property
    def special_tokens(self) -> dict[bytes, int]:
        """Special tokens by the bytes of their text, as servers write them ("</s>")."""
        if self.is_tiktoken:
            return {
                s.encode(): self.inner.encode_single_token(s) for s in self.inner.special_tokens_set
            }
        return {
            t.encode(): i
            for t, i in zip(self.inner.all_special_tokens, self.inner.all_special_ids, strict=True)
        }

    def token_id(self, data: bytes | None) -> int | None:
        """The id of the token a server names by these bytes (its text, for special tokens)."""
        if data is None:
            return None
        token_id = self.vocab.id_of(data)
        return token_id if token_id is not None else self.special_tokens.get(data)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.is_tiktoken:
            return list(self.inner.encode(text, disallowed_special=()))
        return list(self.inner(text, add_special_tokens=add_special_tokens).input_ids)

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """Text of ``ids`` without special tokens; bytes that are not valid UTF-8 become U+FFFD."""
        if self.is_tiktoken:
            data = self.vocab.bytes_of(list(ids))
            return data.decode("utf-8", errors="replace")
        hidden = self._hidden_ids
        return self._decode_ids([i for i in ids if i not in hidden], skip_special_tokens=False)

    @cached_property
    def _decode_ids(self) -> Any:
        """The HF tokenizer's decode, or its Rust backend's where that is all the decode does
        (a fast tokenizer that overrides neither ``decode`` nor ``_decode`` and cleans up no
        spaces): the same text in a third of the time, twice per generated token."""
        from transformers import PreTrainedTokenizerBase

        kind = type(self.inner)
        fast = next((c for c in kind.__mro__ if c.__name__ in _FAST_TOKENIZERS), None)
        backend = getattr(self.inner, "_tokenizer", None)
        plain = (
            fast is not None
            and backend is not None
            and kind.decode is PreTrainedTokenizerBase.decode
            and kind._decode is fast._decode
            and not getattr(self.inner, "clean_up_tokenization_spaces", True)
        )
        return backend.decode if plain else self.inner.decode

    @cached_property
    def _hidden_ids(self) -> frozenset[int]:
        """Special ids that are no text. Not ``skip_special_tokens``: a tokenizer trained with its
        ``<0xNN>`` byte-fallback tokens as special tokens would lose every byte they spell. Read
        from the added tokens, not the byte vocabulary, which takes ~1 s on a 128k vocabulary."""
        added = getattr(self.inner, "added_tokens_decoder", {})
        return frozenset(
            i
            for i, token in added.items()
            if token.special and not _BYTE_TOKEN.match(token.content)
        )

    @property
    def eos_token_id(self) -> int | None:
        if self.is_tiktoken:
            try:  # OpenAI's encodings end documents with <|endoftext|>
                return self.inner.encode_single_token("<|endoftext|>")
            except KeyError:
                return None
        return self.inner.eos_token_id


def load_base_tokenizer(spec: Any) -> BaseTokenizer:
    """From ``tiktoken:ENCODING``, a local HF tokenizer folder, or a tokenizer object."""
    if isinstance(spec, BaseTokenizer):
        return spec
    if not isinstance(spec, str | Path):
        return BaseTokenizer(spec)
    text = str(spec)
    if text.startswith(TIKTOKEN_PREFIX):
        import tiktoken

        name = text[len(TIKTOKEN_PREFIX) :]
        try:
            return BaseTokenizer(tiktoken.get_encoding(name), name=name)
        except ValueError as exc:
            raise ConfigError(f"unknown tiktoken encoding {name!r}: {exc}") from None
        except Exception as exc:  # tiktoken fetches its ranks over the network on first use
            raise ModelLoadError(
                f"tiktoken could not load {name!r} ({type(exc).__name__}: {exc}); it downloads the "
                f"encoding on first use: run once with network access, or set TIKTOKEN_CACHE_DIR "
                f"to a folder that holds it"
            ) from None
    if not Path(text).expanduser().is_dir():
        raise ModelLoadError(
            f"base tokenizer {text!r} is neither tiktoken:ENCODING nor a folder holding a "
            f"Hugging Face tokenizer (tokenizer.json)"
        )
    from transformers import AutoTokenizer

    try:
        return BaseTokenizer(AutoTokenizer.from_pretrained(Path(text).expanduser()), name=text)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {text!r}: {exc}") from None


def tiktoken_for_model(model: str) -> str | None:
    """The tiktoken encoding name OpenAI uses for ``model`` (no download needed), or None."""
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None


def tiktoken_spec_for_model(model: str) -> str | None:
    """``tiktoken:ENCODING`` for one of OpenAI's model names (as ``load_base_tokenizer`` takes it),
    or None."""
    encoding = tiktoken_for_model(model)
    return f"{TIKTOKEN_PREFIX}{encoding}" if encoding is not None else None
