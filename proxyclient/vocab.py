"""Token id <-> exact bytes, for Hugging Face tokenizers and tiktoken encodings. Pure: no I/O.

APIs return tokens as strings (OpenAI legacy, TGI) or bytes (OpenAI chat); the engine needs ids.
A token's bytes are its identity across any rendering: decode every vocabulary to bytes once.
- byte-level BPE (GPT-2, Llama-3, Qwen): token strings spell bytes through GPT-2's byte map;
- SentencePiece / Metaspace (Llama-2, Mistral): "▁" is a space, "<0xNN>" is a byte (byte fallback);
- tiktoken: the encoding knows each token's bytes.
Special tokens are kept apart (no bytes): they are never text.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from proxyclient.errors import ConfigError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_OPENAI_BYTES = re.compile(r"\\x([0-9a-fA-F]{2})")


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_values, chars = list(printable), list(printable)
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}


@dataclass(frozen=True)
class ByteVocab:
    """The bytes of every token of one tokenizer."""

    token_bytes: tuple[bytes | None, ...]  # [V] None for special tokens and unused ids
    special_ids: frozenset[int] = frozenset()
    # SentencePiece "<0xNN>" tokens: the tokenizer emits them only for bytes no piece covers
    fallback_ids: frozenset[int] = frozenset()
    _index: dict[bytes, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Several ids may spell the same bytes (Llama-2 has both "a" and "<0x61>"): the one the
        # tokenizer itself produces wins, i.e. a piece over a byte-fallback token, then the lowest.
        for token_id, data in enumerate(self.token_bytes):
            if data is not None and token_id not in self.fallback_ids:
                self._index.setdefault(data, token_id)
        for token_id in sorted(self.fallback_ids):
            data = self.token_bytes[token_id]
            if data is not None:
                self._index.setdefault(data, token_id)

    def __len__(self) -> int:
        return len(self.token_bytes)

    def id_of(self, data: bytes) -> int | None:
        """The id whose bytes are exactly ``data``, or None."""
        return self._index.get(data)

    def bytes_of(self, ids: list[int]) -> bytes:
        """The bytes of a sequence of ids (special tokens contribute nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)


def from_hf(tokenizer: Any) -> ByteVocab:
    """The byte vocabulary of a fast Hugging Face tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; proxyclient needs one "
            f"(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    if isinstance(model.get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    added_tokens = spec.get("added_tokens", [])
    special = {t["id"] for t in added_tokens if t.get("special")}
    added = {t["content"]: t["id"] for t in added_tokens if not t.get("special")}
    style = _style(spec)
    fallback: dict[int, bytes] = {}  # "<0xNN>" byte-fallback id -> its byte
    if style != "byte-level":
        pieces = list(vocab.items())
        if model.get("byte_fallback"):
            # The model emits "<0xNN>" for bytes no piece covers whatever the token's added-token
            # flags (the BPE trainer marks them special when given as its special tokens): bytes.
            pieces += [(t["content"], t["id"]) for t in added_tokens]
        fallback = {i: _piece_bytes(p, style) for p, i in pieces if _BYTE_FALLBACK.match(p)}
        if model.get("byte_fallback"):
            special -= fallback.keys()
        else:
            fallback = {i: data for i, data in fallback.items() if i not in special}
    size = max([*vocab.values(), *added.values(), *special, *fallback, -1]) + 1
    table: list[bytes | None] = [None] * size
    for piece, token_id in vocab.items():
        if token_id not in special:
            table[token_id] = _piece_bytes(piece, style)
    for content, token_id in added.items():
        table[token_id] = content.encode()
    for token_id, data in fallback.items():
        table[token_id] = data
    return ByteVocab(tuple(table), frozenset(special), frozenset(fallback))


def from_tiktoken(encoding: Any) -> ByteVocab:
    """The byte vocabulary of a ``tiktoken.Encoding`` (built offline from its ranks)."""
    special = set(encoding.special_tokens_set)
    special_ids = {encoding.encode_single_token(s) for s in special}
    size = encoding.n_vocab
    table: list[bytes | None] = [None] * size
    for token_id in range(size):
        if token_id in special_ids:
            continue
        with contextlib.suppress(KeyError):  # ids between ranks and specials may be unused
            table[token_id] = encoding.decode_single_token_bytes(token_id)
    return ByteVocab(tuple(table), frozenset(special_ids))


def bytes_of_token_string(token: str) -> bytes | None:
    """The bytes an API's token string stands for, or None when they cannot be known.

    OpenAI writes a token that is not valid UTF-8 alone as ``bytes:\\xe6\\x97``; other servers send
    "" or U+FFFD, which loses the bytes.
    """
    if token.startswith("bytes:") and _OPENAI_BYTES.search(token):
        return bytes(int(h, 16) for h in _OPENAI_BYTES.findall(token))
    if token == "" or "\ufffd" in token:
        return None
    return token.encode()


def _style(spec: dict) -> str:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if '"ByteLevel"' in text:
        return "byte-level"
    if '"Metaspace"' in text or "▁" in text or '"ByteFallback"' in text:
        return "metaspace"
    raise ConfigError(
        "this tokenizer is neither byte-level BPE nor SentencePiece/Metaspace; proxyclient cannot "
        "map its tokens to bytes exactly"
    )


def _piece_bytes(piece: str, style: str) -> bytes | None:
    if style == "byte-level":
        decoder = _byte_level_decoder()
        try:
            return bytes(decoder[c] for c in piece)
        except KeyError:
            return piece.encode()
    match = _BYTE_FALLBACK.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode()
